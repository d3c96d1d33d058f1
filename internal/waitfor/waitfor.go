// Package waitfor is the tests' one wait with a deadline, for state that has no notification to
// wait on (a REST view, a log observer, a fake broker's counters). Prefer waiting on an event or
// channel; where a test must look again and again, it looks here: an interval growing from 1 ms
// to 50 ms, and a deadline that fails the test naming what did not happen. The deadline is a
// bound on a hang, not a timing assertion.
package waitfor

import (
	"testing"
	"time"
)

// Timeout bounds every wait: long enough for a loaded CI machine, short enough to fail.
const Timeout = 20 * time.Second

// True waits until cond returns true, or fails t with "what" after Timeout.
func True(t testing.TB, what string, cond func() bool) {
	t.Helper()
	NoError(t, what, func() error {
		if cond() {
			return nil
		}
		return errNotYet
	})
}

// NoError waits until f returns nil, or fails t with "what" and f's last error after Timeout.
func NoError(t testing.TB, what string, f func() error) {
	t.Helper()
	poll(t, what, f, Timeout)
}

func poll(t testing.TB, what string, f func() error, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	interval := time.Millisecond
	for {
		err := f()
		if err == nil {
			return
		}
		if !time.Now().Before(deadline) {
			if err == errNotYet {
				t.Fatalf("waiting for %s: not within %v", what, timeout)
			}
			t.Fatalf("waiting for %s: not within %v: %v", what, timeout, err)
			return
		}
		time.Sleep(interval) // polling state that has no notification, bounded by the deadline
		interval = min(2*interval, 50*time.Millisecond)
	}
}

type notYet struct{}

func (notYet) Error() string { return "condition not met" }

var errNotYet error = notYet{}
