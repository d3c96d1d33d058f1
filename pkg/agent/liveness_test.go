package agent

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/clock"
)

func TestLiveness(t *testing.T) {
	c := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	l := NewLiveness(c)
	if err := l.Check(time.Second); err != nil {
		t.Fatalf("idle liveness: %v", err)
	}
	// An idle loop stays healthy however long it sleeps.
	c.Advance(time.Hour)
	if err := l.Check(time.Second); err != nil {
		t.Fatalf("after an idle hour: %v", err)
	}
	doneTel := l.Enter(LoopTelemetry)
	doneTwin := l.Enter(LoopTwin)
	c.Advance(time.Second)
	if err := l.Check(time.Second); err != nil {
		t.Fatalf("work exactly at the bound: %v", err)
	}
	doneTwin()
	if got := l.LastProgress(LoopTwin); !got.Equal(c.Now()) {
		t.Errorf("LastProgress(twin) = %v, want %v", got, c.Now())
	}
	c.Advance(time.Millisecond)
	err := l.Check(time.Second)
	if !errors.Is(err, ErrWedged) || !slices.Equal(l.Wedged(time.Second), []string{LoopTelemetry}) {
		t.Fatalf("Check = %v, Wedged = %v; want the telemetry loop wedged", err, l.Wedged(time.Second))
	}
	// Other work on the same loop, finishing quickly, does not hide the wedged piece.
	l.Enter(LoopTelemetry)()
	if l.Check(time.Second) == nil {
		t.Fatal("a quick piece of work hid a wedged one")
	}
	doneTel()
	doneTel() // idempotent
	if err := l.Check(time.Second); err != nil {
		t.Fatalf("after the work finished: %v", err)
	}
}
