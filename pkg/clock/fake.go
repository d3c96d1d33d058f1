package clock

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"
)

// Fake is a Clock for tests: time stands still until Advance moves it, and a test waits for the
// code under test to arm its timers (WaitArmed, WaitTimer) instead of sleeping. It is safe for
// concurrent use.
type Fake struct {
	mu      sync.Mutex
	now     time.Time
	timers  []*fakeTimer  // armed timers
	changed chan struct{} // closed and replaced whenever a timer is armed
}

// NewFake returns a fake clock that reads t0 until advanced.
func NewFake(t0 time.Time) *Fake {
	return &Fake{now: t0, changed: make(chan struct{})}
}

// Now returns the fake time.
func (f *Fake) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

// NewTimer returns a timer that fires when the fake time reaches Now()+d. A timer with d <= 0
// fires at once.
func (f *Fake) NewTimer(d time.Duration) Timer {
	t := &fakeTimer{f: f, c: make(chan time.Time, 1)}
	t.Reset(d)
	return t
}

// AfterFunc returns a timer that calls f, on a goroutine of its own, when the fake time reaches
// Now()+d (at once for d <= 0), as time.AfterFunc does. It is armed, and counted by Armed,
// WaitArmed and WaitTimer, like the timers of NewTimer; Advance and AdvanceToNext fire it.
func (f *Fake) AfterFunc(d time.Duration, fn func()) Timer {
	t := &fakeTimer{f: f, fn: fn}
	t.Reset(d)
	return t
}

// Advance moves the fake time forward by d and fires, in deadline order, every timer due by
// then. A fired timer's channel receives its deadline.
func (f *Fake) Advance(d time.Duration) {
	if d < 0 {
		panic("clock: Advance with a negative duration")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(d)
	f.fireLocked()
}

// AdvanceToNext moves the fake time to the earliest armed timer's deadline and fires the timers
// due then; it returns how far time moved and false when no timer is armed (time stays put).
func (f *Fake) AdvanceToNext() (time.Duration, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.timers) == 0 {
		return 0, false
	}
	at := f.timers[0].at
	for _, t := range f.timers[1:] {
		if t.at.Before(at) {
			at = t.at
		}
	}
	d := max(at.Sub(f.now), 0)
	f.now = f.now.Add(d)
	f.fireLocked()
	return d, true
}

// Armed returns the deadlines of the armed timers, earliest first.
func (f *Fake) Armed() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.armedLocked()
}

func (f *Fake) armedLocked() []time.Time {
	out := make([]time.Time, len(f.timers))
	for i, t := range f.timers {
		out[i] = t.at
	}
	slices.SortFunc(out, func(a, b time.Time) int { return a.Compare(b) })
	return out
}

// WaitArmed waits until at least n timers are armed, or ctx ends.
func (f *Fake) WaitArmed(ctx context.Context, n int) error {
	return f.wait(ctx, fmt.Sprintf("%d armed timers", n), func(at []time.Time) bool { return len(at) >= n })
}

// WaitTimer waits until a timer is armed to fire exactly at at, or ctx ends. Code that re-arms
// one timer for several purposes (a supervisor's single timer) is observed this way: the test
// computes the deadline it expects (from a reported retry delay, say) and waits for it.
func (f *Fake) WaitTimer(ctx context.Context, at time.Time) error {
	return f.wait(ctx, "a timer at "+at.Format(time.RFC3339Nano), func(armed []time.Time) bool {
		for _, t := range armed {
			if t.Equal(at) {
				return true
			}
		}
		return false
	})
}

func (f *Fake) wait(ctx context.Context, what string, cond func([]time.Time) bool) error {
	for {
		f.mu.Lock()
		ok := cond(f.armedLocked())
		ch := f.changed
		f.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("clock: waiting for %s (armed: %v): %w", what, f.Armed(), ctx.Err())
		}
	}
}

// fireLocked fires the timers due at f.now, earliest first.
func (f *Fake) fireLocked() {
	var due []*fakeTimer
	kept := f.timers[:0]
	for _, t := range f.timers {
		if !t.at.After(f.now) {
			due = append(due, t)
		} else {
			kept = append(kept, t)
		}
	}
	clear(f.timers[len(kept):])
	f.timers = kept
	slices.SortStableFunc(due, func(a, b *fakeTimer) int { return a.at.Compare(b.at) })
	for _, t := range due {
		t.armed = false
		if t.fn != nil {
			go t.fn() // never under f.mu: fn may use the clock
			continue
		}
		select {
		case t.c <- t.at:
		default:
		}
	}
}

func (f *Fake) removeLocked(t *fakeTimer) {
	if !t.armed {
		return
	}
	t.armed = false
	if i := slices.Index(f.timers, t); i >= 0 {
		f.timers = slices.Delete(f.timers, i, i+1)
	}
}

type fakeTimer struct {
	f     *Fake
	c     chan time.Time // nil for AfterFunc
	fn    func()         // AfterFunc's function; nil for NewTimer
	at    time.Time      // guarded by f.mu
	armed bool           // guarded by f.mu
}

func (t *fakeTimer) C() <-chan time.Time { return t.c }

func (t *fakeTimer) Reset(d time.Duration) {
	f := t.f
	f.mu.Lock()
	defer f.mu.Unlock()
	f.removeLocked(t)
	t.drain()
	t.at = f.now.Add(d)
	t.armed = true
	f.timers = append(f.timers, t)
	close(f.changed)
	f.changed = make(chan struct{})
	if d <= 0 {
		f.fireLocked()
	}
}

func (t *fakeTimer) Stop() {
	f := t.f
	f.mu.Lock()
	defer f.mu.Unlock()
	f.removeLocked(t)
	t.drain()
}

// drain empties the channel, so no stale value is left after Reset or Stop (as with time.Timer
// since Go 1.23).
func (t *fakeTimer) drain() {
	if t.c == nil {
		return
	}
	select {
	case <-t.c:
	default:
	}
}
