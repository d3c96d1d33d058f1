package agent

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/iothubby/iothubby/pkg/clock"
)

// Loops watched by a device's Liveness.
const (
	// LoopSupervisor is the hub session's delivery of status changes and inbound messages to
	// the device (hub.Config.OnStatus, OnC2D, OnDesired, OnMethod).
	LoopSupervisor = "supervisor"
	// LoopTwin is the twin sync: its desired-property handlers and its twin requests.
	LoopTwin = "twin"
	// LoopTelemetry is the device's telemetry loop: rendering and queueing a message.
	LoopTelemetry = "telemetry"
)

// ErrWedged is returned by Liveness.Check when a loop has been busy with one piece of work for
// longer than allowed.
var ErrWedged = errors.New("agent: loop not making progress")

// Liveness tells whether a device's loops make progress, for /healthz and the systemd
// watchdog. The loops are event-driven (they sleep while there is nothing to do), so an idle
// loop is healthy however long it sleeps; a loop is wedged when one piece of work it started
// has not finished within the allowed time.
//
// A loop marks each piece of work with Enter, and calls the function Enter returns when it is
// done:
//
//	done := lv.Enter(agent.LoopTelemetry)
//	defer done()
//
// Check (or Wedged) then reports the loops with work older than a bound. Use it as:
//
//	if err := dev.Liveness().Check(watchdogInterval / 2); err == nil { notify("WATCHDOG=1") }
//
// Liveness keeps no goroutine; its methods are cheap, safe for concurrent use, and do no I/O.
type Liveness struct {
	clock clock.Clock

	mu     sync.Mutex
	nextID uint64
	busy   map[uint64]work // work entered and not yet done
	beats  map[string]time.Time
}

type work struct {
	loop string
	at   time.Time
}

// NewLiveness returns an empty Liveness on clock c (nil: the real clock).
func NewLiveness(c clock.Clock) *Liveness {
	if c == nil {
		c = clock.Real()
	}
	return &Liveness{clock: c, busy: map[uint64]work{}, beats: map[string]time.Time{}}
}

// Enter marks the start of a piece of work on loop; call the returned function (once) when it
// is done.
func (l *Liveness) Enter(loop string) (done func()) {
	now := l.clock.Now()
	l.mu.Lock()
	l.nextID++
	id := l.nextID
	l.busy[id] = work{loop, now}
	l.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			end := l.clock.Now()
			l.mu.Lock()
			delete(l.busy, id)
			l.beats[loop] = end
			l.mu.Unlock()
		})
	}
}

// LastProgress returns when loop last finished a piece of work (zero if never).
func (l *Liveness) LastProgress(loop string) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.beats[loop]
}

// Wedged returns the loops (sorted, each once) with a piece of work entered more than max ago.
func (l *Liveness) Wedged(max time.Duration) []string {
	now := l.clock.Now()
	seen := map[string]bool{}
	l.mu.Lock()
	for _, w := range l.busy {
		if now.Sub(w.at) > max {
			seen[w.loop] = true
		}
	}
	l.mu.Unlock()
	out := make([]string, 0, len(seen))
	for k := range seen {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Check returns nil when every loop makes progress, or an error matching ErrWedged that names
// the loops busy with one piece of work for more than max.
func (l *Liveness) Check(max time.Duration) error {
	if w := l.Wedged(max); len(w) > 0 {
		return fmt.Errorf("%w for more than %s: %s", ErrWedged, max, strings.Join(w, ", "))
	}
	return nil
}

// ErrNotReady is returned by Device.Ready while the device is not connected or its twin not
// synced.
var ErrNotReady = errors.New("agent: not ready")

// Liveness returns the device's loop progress (see Liveness).
func (d *Device) Liveness() *Liveness { return d.live }

// Ready returns nil when the device is connected to its hub and the twin sync's full GET after
// that connection succeeded; otherwise an error matching ErrNotReady that says which is missing.
func (d *Device) Ready() error {
	switch {
	case !d.connected.Load():
		return fmt.Errorf("%w: not connected to the hub", ErrNotReady)
	case !d.synced.Load():
		return fmt.Errorf("%w: connected, twin not synced yet", ErrNotReady)
	}
	return nil
}
