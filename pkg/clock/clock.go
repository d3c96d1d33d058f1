// Package clock is the time seam shared by every timer in the agent's client packages (pkg/hub,
// the twin sync, pkg/dps): production code takes a Clock and tests substitute a fake one, so
// renewal, backoff and expiry are tested without waiting through real seconds.
package clock

import "time"

// Clock is a source of time and timers.
type Clock interface {
	Now() time.Time
	NewTimer(d time.Duration) Timer
	// AfterFunc calls f on a goroutine of its own once d has passed, as time.AfterFunc does.
	// The returned Timer's C is nil; Reset arms it to call f again, Stop cancels a call not yet
	// started (one already started runs on).
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is a resettable timer as returned by Clock.NewTimer and Clock.AfterFunc.
type Timer interface {
	// C delivers the time when the timer fires; nil for a timer made by AfterFunc.
	C() <-chan time.Time
	// Reset re-arms the timer to fire d from now. As with time.Timer since Go 1.23, no stale
	// value is left in C after Reset or Stop.
	Reset(d time.Duration)
	Stop()
}

// Real returns the wall clock.
func Real() Clock { return realClock{} }

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }
func (realClock) NewTimer(d time.Duration) Timer {
	return realTimer{time.NewTimer(d)}
}

func (realClock) AfterFunc(d time.Duration, f func()) Timer {
	return realTimer{time.AfterFunc(d, f)}
}

type realTimer struct{ t *time.Timer }

func (r realTimer) C() <-chan time.Time   { return r.t.C }
func (r realTimer) Reset(d time.Duration) { r.t.Reset(d) }
func (r realTimer) Stop()                 { r.t.Stop() }
