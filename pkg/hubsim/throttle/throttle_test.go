package throttle

import (
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/clock"
)

func TestForTierFollowsTheQuotaTable(t *testing.T) {
	cases := []struct {
		tier  string
		units int
		op    Op
		want  float64
	}{
		{"S1", 1, Connect, 100}, {"S1", 10, Connect, 120}, {"s1", 1, TwinRead, 100},
		{"S1", 3, Registry, 5}, {"S1", 2, Method, 80}, {"F1", 1, TwinUpdate, 50},
		{"S2", 2, Connect, 240}, {"S2", 30, TwinRead, 300}, {"S2", 1, JobDeviceOps, 10},
		{"S3", 1, Connect, 6000}, {"S3", 2, TwinUpdate, 500}, {"S3", 1, JobOp, 5000.0 / 60},
	}
	for _, c := range cases {
		l, err := ForTier(c.tier, c.units)
		if err != nil {
			t.Fatalf("%s x%d: %v", c.tier, c.units, err)
		}
		if got := l[c.op]; got != c.want {
			t.Errorf("%s x%d %s = %v/s, want %v/s", c.tier, c.units, c.op, got, c.want)
		}
	}
	for _, bad := range []struct {
		tier  string
		units int
	}{{"S4", 1}, {"S1", 0}, {"F1", 2}, {"", 1}} {
		if _, err := ForTier(bad.tier, bad.units); err == nil {
			t.Errorf("ForTier(%q, %d) accepted", bad.tier, bad.units)
		}
	}
}

func TestLimiterRefusesOverTheRateAndRefillsWithTheClock(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l := New(Limits{Connect: 100, Registry: 100.0 / 60}, clk)
	for i := range 100 {
		if !l.Allow(Connect) {
			t.Fatalf("connect %d of the first second's 100 refused", i+1)
		}
	}
	if l.Allow(Connect) {
		t.Fatal("the 101st connect within the same instant was allowed")
	}
	clk.Advance(10 * time.Millisecond) // one token at 100/s
	if !l.Allow(Connect) {
		t.Fatal("a connect 10 ms later (one token refilled) was refused")
	}
	if l.Allow(Connect) {
		t.Fatal("a second connect on one refilled token was allowed")
	}
	// Registry at 100/min (1.67/s): a bucket of 1.67 tokens; one taken leaves 0.67, and the next
	// whole token is there 200 ms later.
	if !l.Allow(Registry) || l.Allow(Registry) {
		t.Fatal("registry bucket: want one allowed, then refused")
	}
	clk.Advance(190 * time.Millisecond)
	if l.Allow(Registry) {
		t.Fatal("registry allowed 190 ms later, before a whole token had refilled")
	}
	clk.Advance(20 * time.Millisecond)
	if !l.Allow(Registry) {
		t.Fatal("registry refused 210 ms later")
	}
	// Long idle: the bucket holds one second's worth, no more.
	clk.Advance(time.Hour)
	n := 0
	for l.Allow(Connect) {
		n++
	}
	if n != 100 {
		t.Fatalf("after an hour idle, %d connects allowed at once, want the bucket size 100", n)
	}
	// Unlisted operations and a nil Limiter are never throttled.
	if !l.Allow(D2C) || !(*Limiter)(nil).Allow(Connect) {
		t.Fatal("an unthrottled operation was refused")
	}
	snap := l.Snapshot()
	if len(snap) != len(Ops) || snap[0].Op != Connect {
		t.Fatalf("snapshot %+v", snap)
	}
	if c := snap[0]; c.Allowed != 201 || c.Throttled != 3 || c.PerSecond != 100 {
		t.Fatalf("connect counters %+v, want allowed 201, throttled 3, 100/s", c)
	}
}
