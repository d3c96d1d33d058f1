package clock_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/pkg/clock"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func fired(t *testing.T, tm clock.Timer) (time.Time, bool) {
	t.Helper()
	select {
	case v := <-tm.C():
		return v, true
	default:
		return time.Time{}, false
	}
}

func TestFakeTimerFiresOnlyWhenDue(t *testing.T) {
	f := clock.NewFake(t0)
	tm := f.NewTimer(10 * time.Second)
	f.Advance(9 * time.Second)
	if _, ok := fired(t, tm); ok {
		t.Fatal("fired 1s early")
	}
	if got := f.Now(); !got.Equal(t0.Add(9 * time.Second)) {
		t.Fatalf("Now = %v", got)
	}
	f.Advance(time.Second)
	v, ok := fired(t, tm)
	if !ok || !v.Equal(t0.Add(10*time.Second)) {
		t.Fatalf("fired %v %v, want the deadline", v, ok)
	}
	if n := len(f.Armed()); n != 0 {
		t.Errorf("%d timers still armed after firing", n)
	}
	f.Advance(time.Hour)
	if _, ok := fired(t, tm); ok {
		t.Error("a fired timer fired again")
	}
}

func TestFakeResetAndStopLeaveNoStaleValue(t *testing.T) {
	f := clock.NewFake(t0)
	tm := f.NewTimer(time.Second)
	f.Advance(time.Second) // fired, value waiting in C
	tm.Reset(5 * time.Second)
	if _, ok := fired(t, tm); ok {
		t.Fatal("stale value left in C after Reset")
	}
	f.Advance(4 * time.Second)
	if _, ok := fired(t, tm); ok {
		t.Fatal("Reset timer fired early: its deadline counts from the time of Reset")
	}
	tm.Stop()
	f.Advance(time.Hour)
	if _, ok := fired(t, tm); ok {
		t.Fatal("stopped timer fired")
	}
	tm.Reset(0)
	if _, ok := fired(t, tm); !ok {
		t.Fatal("Reset(0) did not fire at once")
	}
}

func TestFakeAdvanceToNextFiresInOrder(t *testing.T) {
	f := clock.NewFake(t0)
	late := f.NewTimer(3 * time.Second)
	early := f.NewTimer(time.Second)
	if got := f.Armed(); len(got) != 2 || !got[0].Equal(t0.Add(time.Second)) {
		t.Fatalf("armed %v, want 2 earliest first", got)
	}
	d, ok := f.AdvanceToNext()
	if !ok || d != time.Second {
		t.Fatalf("AdvanceToNext = %v %v, want 1s", d, ok)
	}
	if _, ok := fired(t, early); !ok {
		t.Error("early timer did not fire")
	}
	if _, ok := fired(t, late); ok {
		t.Error("late timer fired with the early one")
	}
	if d, ok := f.AdvanceToNext(); !ok || d != 2*time.Second {
		t.Fatalf("second AdvanceToNext = %v %v, want 2s", d, ok)
	}
	if _, ok := f.AdvanceToNext(); ok {
		t.Error("AdvanceToNext reported a timer when none is armed")
	}
}

func TestFakeWaitArmedSynchronisesOnArming(t *testing.T) {
	f := clock.NewFake(t0)
	got := make(chan time.Time, 1)
	go func() {
		tm := f.NewTimer(2 * time.Second)
		got <- <-tm.C()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := f.WaitArmed(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := f.WaitTimer(ctx, t0.Add(2*time.Second)); err != nil {
		t.Fatal(err)
	}
	f.Advance(2 * time.Second)
	select {
	case v := <-got:
		if !v.Equal(t0.Add(2 * time.Second)) {
			t.Errorf("fired with %v", v)
		}
	case <-ctx.Done():
		t.Fatal("goroutine's timer never fired")
	}
}

func TestFakeWaitArmedEndsWithContext(t *testing.T) {
	f := clock.NewFake(t0)
	f.NewTimer(time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := f.WaitArmed(ctx, 2)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if err := f.WaitTimer(ctx, t0); !errors.Is(err, context.Canceled) {
		t.Fatalf("WaitTimer for a deadline nobody armed: %v, want context.Canceled", err)
	}
}

func TestRealClockTimer(t *testing.T) {
	c := clock.Real()
	tm := c.NewTimer(time.Millisecond)
	defer tm.Stop()
	select {
	case v := <-tm.C():
		if v.Before(c.Now().Add(-time.Minute)) {
			t.Errorf("fired with %v", v)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("real timer never fired")
	}
}

// calls returns an AfterFunc function that reports each call on the returned channel.
func calls() (func(), chan struct{}) {
	ch := make(chan struct{}, 8)
	return func() { ch <- struct{}{} }, ch
}

func wantCall(t *testing.T, ch chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: the function was not called", what)
	}
}

// noCall checks that no call has been made. The fake starts f on a goroutine of its own as it
// fires; fired timers leave Armed at once, so a timer still armed has not started f.
func noCall(t *testing.T, ch chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
		t.Fatalf("%s: the function was called", what)
	default:
	}
}

func TestFakeAfterFuncFiresWhenDueAndIsCounted(t *testing.T) {
	f := clock.NewFake(t0)
	fn, ch := calls()
	tm := f.AfterFunc(10*time.Second, fn)
	if tm.C() != nil {
		t.Error("an AfterFunc timer has a channel")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := f.WaitTimer(ctx, t0.Add(10*time.Second)); err != nil {
		t.Fatal(err)
	}
	f.Advance(9 * time.Second)
	if got := f.Armed(); len(got) != 1 || !got[0].Equal(t0.Add(10*time.Second)) {
		t.Fatalf("armed %v after 9s, want the AfterFunc at 10s", got)
	}
	noCall(t, ch, "1s early")
	f.Advance(time.Second)
	wantCall(t, ch, "due")
	if n := len(f.Armed()); n != 0 {
		t.Errorf("%d timers armed after the AfterFunc fired", n)
	}
	f.Advance(time.Hour)
	tm.Reset(time.Second)
	if d, ok := f.AdvanceToNext(); !ok || d != time.Second {
		t.Fatalf("AdvanceToNext = %v %v, want the re-armed AfterFunc 1s away", d, ok)
	}
	wantCall(t, ch, "after Reset")
	noCall(t, ch, "called twice for one arming")
}

func TestFakeAfterFuncStopAndImmediate(t *testing.T) {
	f := clock.NewFake(t0)
	fn, ch := calls()
	tm := f.AfterFunc(time.Second, fn)
	tm.Stop()
	if n := len(f.Armed()); n != 0 {
		t.Fatalf("%d timers armed after Stop", n)
	}
	f.Advance(time.Hour)
	if _, ok := f.AdvanceToNext(); ok {
		t.Fatal("a stopped AfterFunc is still armed")
	}
	noCall(t, ch, "stopped")
	tm.Reset(0)
	wantCall(t, ch, "Reset(0)")
	f.AfterFunc(-time.Second, fn)
	wantCall(t, ch, "AfterFunc with a negative duration")
}

// The function runs without the fake's lock held: it may use the clock (re-arm itself).
func TestFakeAfterFuncMayUseTheClock(t *testing.T) {
	f := clock.NewFake(t0)
	done := make(chan time.Time, 1)
	var tm clock.Timer
	n := 0
	armed := make(chan struct{})
	tm = f.AfterFunc(time.Second, func() {
		<-armed
		n++
		if n < 3 {
			tm.Reset(time.Second)
			return
		}
		done <- f.Now()
	})
	close(armed)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := 1; i <= 3; i++ {
		if err := f.WaitTimer(ctx, t0.Add(time.Duration(i)*time.Second)); err != nil {
			t.Fatal(err)
		}
		f.Advance(time.Second)
	}
	select {
	case at := <-done:
		if !at.Equal(t0.Add(3 * time.Second)) {
			t.Errorf("third call at %v, want t0+3s", at)
		}
	case <-ctx.Done():
		t.Fatal("the self-re-arming function did not run three times")
	}
}

func TestRealClockAfterFunc(t *testing.T) {
	fn, ch := calls()
	tm := clock.Real().AfterFunc(time.Millisecond, fn)
	defer tm.Stop()
	if tm.C() != nil {
		t.Error("a real AfterFunc timer has a channel")
	}
	wantCall(t, ch, "real AfterFunc")
}
