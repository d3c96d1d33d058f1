package agent

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/iothubby/iothubby/pkg/hub"
)

// The device's loop is event-driven: while a session is up no goroutine of the device waits
// for its next event. A fleet holds thousands of devices, and a waiting goroutine costs its
// stack (4 KiB at least for this one) and its descriptor. What the loop waits for (Run's
// context, the session's end, a reprovision or simulated reboot asked for, a reload of the
// telemetry settings, the next telemetry tick) each wakes it through a callback, and the loop's
// work then runs on a short-lived goroutine, one at a time: sending telemetry, or ending the
// session and going on to the next one (a simulated boot, provisioning again) or to the end of
// the run. Run is Start and a wait for the end.

// run is one Run of the device, from Start to its end.
type run struct {
	d       *Device
	ctx     context.Context
	release func()
	exit    func(error)
	// DPS only: the current provisioning, and whether the next one ignores the cache.
	p     *provisioned
	force bool
}

// Start starts the device as Run does, but returns once its first session has started (or
// the device has failed to start: with DPS, after provisioning), and calls exit with what Run
// would have returned when the device has stopped. No goroutine of the device's own waits
// while the session is up. Like Run, a device starts once: a second Start (or Run), or one
// after Close, calls exit with an error at once.
func (d *Device) Start(ctx context.Context, exit func(error)) {
	if !d.started.CompareAndSwap(false, true) {
		exit(errors.New("agent: device is already running, has run, or was closed"))
		return
	}
	ru := &run{d: d, exit: exit}
	var err error
	ru.ctx, ru.release, err = d.startRun(ctx)
	if err != nil {
		ru.finish(err)
		return
	}
	if d.dpsEnabled() {
		ru.force = d.cfg.DPS.Reprovision
		ru.provision()
		return
	}
	ru.session(ru.hubConfig())
}

// finish ends the run: what startRun set up is undone, Run's done is closed, exit is called.
func (ru *run) finish(err error) {
	ru.release()
	close(ru.d.done)
	ru.exit(err)
}

// provision provisions (DPS) and starts a session with the result.
func (ru *run) provision() {
	p, err := ru.d.provisionForRun(ru.ctx, ru.force)
	if p == nil {
		ru.finish(err)
		return
	}
	ru.p = p
	ru.session(&p.hc)
}

// session starts a session with hc and arms its waits, or goes on to what follows a session
// that could not start.
func (ru *run) session(hc *hub.Config) {
	r, err := ru.d.startSession(hc)
	if err != nil {
		ru.hubEnded(err)
		return
	}
	w := &waiter{ru: ru, r: r}
	w.arm()
}

// sessionEnded runs when the session's loop has ended with why (nil: Run's context ended):
// it drains and closes the session, then goes on with a simulated boot, provisioning again or
// the end of the run.
func (ru *run) sessionEnded(r *sessionRun, why error) {
	err := ru.d.endSession(r, why)
	if errors.Is(err, errSimulatedReboot) {
		if !ru.d.reboot.simulateBoot(ru.ctx) {
			ru.hubEnded(nil)
			return
		}
		ru.session(ru.hubConfig())
		return
	}
	ru.hubEnded(err)
}

// hubConfig is the configuration of the run's next session: the provisioning's (DPS), or made
// again from the device's configuration (not kept while the session runs: it has its copy).
func (ru *run) hubConfig() *hub.Config {
	if ru.p != nil {
		return &ru.p.hc
	}
	return ru.d.hubConfig()
}

// hubEnded decides, once sessions with one hub configuration are over (err: why), between
// provisioning again (DPS) and the end of the run.
func (ru *run) hubEnded(err error) {
	if ru.p == nil {
		ru.finish(err)
		return
	}
	again, err := ru.d.afterDPSHub(ru.ctx, ru.p, err)
	if !again {
		ru.finish(err)
		return
	}
	ru.force = true
	ru.provision()
}

// waiter is one session's loop: the events it waits for arrive by callbacks (see above).
type waiter struct {
	ru *run
	r  *sessionRun

	mu       sync.Mutex
	busy     bool // a goroutine is in step
	again    bool // woken while busy: step looks again before it returns
	ended    bool // the loop has ended: later wakes are ignored
	tickDue  bool // the telemetry timer fired
	tickAt   time.Time
	next     time.Time   // when the next tick is due
	timer    *time.Timer // the telemetry timer; nil: none (no interval, or the count reached)
	stopCtx  func() bool // stops the wake at Run's context's end
	interval time.Duration
}

// arm makes the device's events wake w and looks once for what is already pending (a
// reprovision asked for before the session started, a reload).
func (w *waiter) arm() {
	w.mu.Lock()
	w.busy = true // wakes until step starts leave it to step
	w.startTicker()
	w.mu.Unlock()
	w.stopCtx = context.AfterFunc(w.ru.ctx, w.wake)
	w.r.sess.AfterDone(w.wake)
	w.ru.d.waker.Store(w)
	go w.step()
}

// startTicker arms the telemetry timer for the current settings, unless telemetry.count
// messages went out already. w.mu is held.
func (w *waiter) startTicker() {
	d := w.ru.d
	cfg := d.tele.Load().cfg
	w.interval = cfg.Interval
	if cfg.Interval <= 0 || (cfg.Count > 0 && d.seq.Load() >= cfg.Count) {
		return
	}
	w.next = time.Now().Add(cfg.Interval)
	w.timer = time.AfterFunc(cfg.Interval, w.tick)
}

// stopTicker stops the telemetry timer. w.mu is held.
func (w *waiter) stopTicker() {
	if w.timer != nil {
		w.timer.Stop()
		w.timer = nil
	}
	w.tickDue = false
}

// tick is the telemetry timer's callback.
func (w *waiter) tick() {
	w.mu.Lock()
	w.tickDue, w.tickAt = true, time.Now()
	w.mu.Unlock()
	w.wake()
}

// wake has step look at the events, on a goroutine of its own unless one is already there.
func (w *waiter) wake() {
	w.mu.Lock()
	if w.ended {
		w.mu.Unlock()
		return
	}
	if w.busy {
		w.again = true
		w.mu.Unlock()
		return
	}
	w.busy = true
	w.mu.Unlock()
	go w.step()
}

// step handles what is pending until nothing is; when the loop ends it goes on, on the same
// goroutine, with the session's end (run.sessionEnded).
func (w *waiter) step() {
	for {
		if ended, why := w.poll(); ended {
			w.mu.Lock()
			w.ended = true
			w.stopTicker()
			w.mu.Unlock()
			w.stopCtx()
			w.ru.d.waker.CompareAndSwap(w, nil)
			w.ru.sessionEnded(w.r, why)
			return
		}
		w.mu.Lock()
		if !w.again {
			w.busy = false
			w.mu.Unlock()
			return
		}
		w.again = false
		w.mu.Unlock()
	}
}

// poll does what one turn of the device's loop did, without waiting: it reports whether the
// loop has ended and why (nil for Run's context and Close), and sends the telemetry that is
// due.
func (w *waiter) poll() (ended bool, why error) {
	d, r := w.ru.d, w.r
	for changed := true; changed; {
		select {
		case <-w.ru.ctx.Done():
			return true, nil
		case <-r.sess.Done():
			return true, r.sess.Err()
		case <-r.reprovision:
			return true, errReprovision
		case <-r.simReboot:
			d.log.Info(MsgSimRebootDisconnecting)
			return true, errSimulatedReboot
		case <-d.teleChanged:
			// Look again: select picks one ready case at random, and an end asked for at the
			// same time (pending before arm, whose wake found no waker) must not wait for a
			// later wake.
			w.mu.Lock()
			w.stopTicker()
			w.startTicker()
			w.mu.Unlock()
		default:
			changed = false
		}
	}
	w.mu.Lock()
	due, at := w.tickDue, w.tickAt
	w.tickDue = false
	w.mu.Unlock()
	if !due {
		return false, nil
	}
	done := d.telemetryTick(r.sess, at)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.timer == nil {
		return false, nil // stopped or replaced meanwhile (a reload: it armed its own)
	}
	if done {
		w.stopTicker()
		return false, nil
	}
	// As a time.Ticker: the next tick on the interval's grid, ticks missed are dropped.
	now := time.Now()
	for w.next = w.next.Add(w.interval); !w.next.After(now); w.next = w.next.Add(w.interval) {
	}
	w.timer.Reset(w.next.Sub(now))
	return false, nil
}

// wakeLoop wakes the running session's loop (after a reprovision or simulated reboot was
// asked for, or the telemetry settings changed); nothing when none is waiting.
func (d *Device) wakeLoop() {
	if w := d.waker.Load(); w != nil {
		w.wake()
	}
}
