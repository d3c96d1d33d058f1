package soak

import (
	"math"
	"strings"
	"testing"
	"time"
)

// TestLogTime: the agent's "ts" in UTC and in another zone (as zap's ISO8601 encoder writes it on
// a machine whose local time is not UTC) name the same instant.
func TestLogTime(t *testing.T) {
	want := time.Date(2026, 12, 2, 11, 43, 40, 123e6, time.UTC)
	for _, s := range []string{"2026-12-02T11:43:40.123Z", "2026-12-02T12:43:40.123+0100", "2026-12-02T06:13:40.123-0530"} {
		if got, err := LogTime(s); err != nil || !got.Equal(want) {
			t.Errorf("LogTime(%q) = %v, %v; want %v", s, got, err, want)
		}
	}
	if _, err := LogTime("not a time"); err == nil {
		t.Error("LogTime took a line without a time")
	}
}

func TestParseMsgID(t *testing.T) {
	id, err := ParseMsgID("soak-1-9cc760a2-285")
	if err != nil || id != (MsgID{"soak-1", "9cc760a2", 285}) {
		t.Fatalf("got %+v, %v", id, err)
	}
	if id.String() != "soak-1-9cc760a2-285" {
		t.Fatalf("round trip: %s", id)
	}
	for _, bad := range []string{"", "x", "dev-run-", "dev-run-0", "dev-run-x", "-run-1", "dev--1", "run-1"} {
		if _, err := ParseMsgID(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func TestLedger(t *testing.T) {
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	l := NewLedger()
	// Run r1 of dev-a handed 6 messages (seq 1..5 certainly accepted): 1, 2 recorded (2 twice,
	// a resend), 3 failed with a reason, 4 refused, 5 acknowledged just before a hubsim SIGKILL
	// after its last poll, and nothing known about 6 (it may still have been inside Enqueue).
	l.Handed("dev-a", "r1", 6)
	l.Record("dev-a-r1-1", "0/t1")
	l.Record("dev-a-r1-1", "0/t1") // the same record read by two polls
	l.Record("dev-a-r1-2", "0/t2")
	l.Record("dev-a-r1-2", "1/t9") // resent to the next hubsim instance
	l.Failed("dev-a-r1-3", "message too large")
	l.Refused("dev-a-r1-4")
	l.Acked("dev-a-r1-5", base.Add(5*time.Second))
	l.Unobserved(base.Add(4*time.Second), base.Add(6*time.Second))
	// Run r2 of dev-b: 1 recorded, 2 acknowledged outside any unobserved window and never
	// recorded: lost. 3 mentioned only by the agent (kept on disk): lost too.
	l.Record("dev-b-r2-1", "0/t3")
	l.Acked("dev-b-r2-2", base.Add(10*time.Second))
	l.Seen("dev-b-r2-3")
	l.Record("garbage", "0/t4")

	got := l.Tally()
	if len(got) != 2 {
		t.Fatalf("%d devices: %+v", len(got), got)
	}
	a, b := got[0], got[1]
	if a.Device != "dev-a" || a.Accepted != 4 || a.Refused != 1 || a.Received != 2 || a.Duplicates != 1 ||
		a.Failed != 1 || a.AckedUnrecorded != 1 || a.MissingCount != 0 || a.Runs != 1 ||
		strings.Join(a.FailedReasons, ",") != "message too large" {
		t.Errorf("dev-a: %+v", a)
	}
	if b.Device != "dev-b" || b.Accepted != 3 || b.Received != 1 || b.MissingCount != 2 ||
		strings.Join(b.Missing, " ") != "dev-b-r2-2 dev-b-r2-3" {
		t.Errorf("dev-b: %+v", b)
	}
	if l.Missing() != 2 {
		t.Errorf("missing %d, want 2", l.Missing())
	}
	if bad := l.BadIDs(); len(bad) != 1 || bad[0] != "garbage" {
		t.Errorf("bad ids %q", bad)
	}
}

func TestCheckDesiredOrder(t *testing.T) {
	ap := func(v int64) DesiredEvent { return DesiredEvent{Kind: Applied, Version: v} }
	for _, c := range []struct {
		name string
		evs  []DesiredEvent
		n    int
		err  string
	}{
		{"increasing", []DesiredEvent{ap(1), ap(2), ap(5)}, 3, ""},
		{"repeat", []DesiredEvent{ap(1), ap(2), ap(2)}, 3, "desired version 2 applied after 2"},
		{"backwards", []DesiredEvent{ap(3), ap(2)}, 2, "desired version 2 applied after 3"},
		{"back after the hub went back", []DesiredEvent{ap(3), {Kind: WentBack}, ap(2), ap(3)}, 3, ""},
		{"again after a restart", []DesiredEvent{ap(3), {Kind: Restart}, ap(3), ap(4)}, 3, ""},
		{"back after a restart", []DesiredEvent{ap(3), {Kind: Restart}, ap(2)}, 2, "desired version 2 applied after 3"},
		{"a restart excuses one repeat only", []DesiredEvent{ap(3), {Kind: Restart}, ap(3), ap(3)}, 3, "applied after 3"},
	} {
		n, err := CheckDesiredOrder(c.evs)
		if n != c.n || (err == nil) != (c.err == "") || (err != nil && !strings.Contains(err.Error(), c.err)) {
			t.Errorf("%s: %d, %v; want %d, %q", c.name, n, err, c.n, c.err)
		}
	}
}

func TestSlopeAndGrowth(t *testing.T) {
	var ts []time.Duration
	var flat, rising []float64
	for i := 0; i < 30; i++ {
		ts = append(ts, time.Duration(i)*2*time.Second)
		flat = append(flat, 100+float64(i%3)) // noise, no trend
		rising = append(rising, 100+0.5*float64(i*2))
	}
	if s := Slope(ts, rising); math.Abs(s-0.5) > 1e-9 {
		t.Errorf("slope %v, want 0.5 per second", s)
	}
	if g := FitGrowth("p", "x", ts, rising, 20); g.OK() || math.Abs(g.Growth-29) > 1e-9 || g.Span != 58*time.Second {
		t.Errorf("rising: %+v", g)
	}
	if g := FitGrowth("p", "x", ts, flat, 20); !g.OK() || math.Abs(g.Growth) > 2 {
		t.Errorf("flat: %+v", g)
	}
	if Slope(ts[:2], rising[:2]) != 0 || Slope(ts, rising[:3]) != 0 {
		t.Error("too few points or mismatched series should give 0")
	}
}

func TestPercentile(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	if p := Percentile(ds, 50); p != 50*time.Millisecond {
		t.Errorf("p50 %v", p)
	}
	if p := Percentile(ds, 99); p != 99*time.Millisecond {
		t.Errorf("p99 %v", p)
	}
	if p := Percentile(ds, 100); p != 100*time.Millisecond {
		t.Errorf("max %v", p)
	}
	if Percentile(nil, 50) != 0 {
		t.Error("empty")
	}
	if ds[0] != 100*time.Millisecond {
		t.Error("Percentile sorted its input in place")
	}
}

func TestReportWrite(t *testing.T) {
	r := &Report{Seed: 7, Duration: time.Minute, Agents: 3, Faults: map[string]int{"drop": 2},
		Skipped: map[string]int{"stall": 1}, SkipWhy: map[string]string{"stall": "unknown action"},
		Recoveries: []time.Duration{time.Second}, Methods: map[string]int{"200": 5},
		RecoveryByKind: map[string][]time.Duration{"hubsim-kill": {1500 * time.Millisecond}},
		Telemetry:      []DeviceTally{{Device: "d", Accepted: 3, Received: 3}},
		Invariants:     []Invariant{{Name: "a", OK: true}, {Name: "b", OK: false, Detail: "why"}}}
	var sb strings.Builder
	r.Write(&sb)
	out := sb.String()
	for _, want := range []string{"seed 7", "drop", "stall", "unknown action", "p50=1s", "hubsim-kill", "1.5s", "200 5", "FAIL", "why"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	if f := r.Failed(); len(f) != 1 || f[0].Name != "b" {
		t.Errorf("failed %+v", f)
	}
}

func TestKillAllowance(t *testing.T) {
	k := time.Date(2026, 12, 2, 8, 0, 0, 0, time.UTC) // the kill
	t0 := k.Add(-2 * time.Second)
	own := func(seq uint64, at time.Time) Delivery { return Delivery{MsgID{"soak-1", "r2", seq}, at} }
	steady := func(n int, gap time.Duration, skip uint64) []Delivery {
		var ds []Delivery
		for i := range n {
			if uint64(i+1) == skip {
				continue
			}
			ds = append(ds, own(uint64(i+1), k.Add(-time.Duration(n-1-i)*gap)))
		}
		return ds
	}
	cases := []struct {
		name      string
		resent    int
		delivered []Delivery
		reloaded  int
		want      int
	}{
		// 5 a second, the last one at the kill: the 10 after t0 may be unrecorded.
		{"steady", 0, steady(20, 200*time.Millisecond, 0), -1, 10},
		// A backlog of 60 drained in the last 300 ms: all 60 (the old bound said 6).
		{"backlog", 0, steady(60, 5*time.Millisecond, 0), -1, 60},
		// Seq 5 never acknowledged (its PUBACK dropped): every later acknowledgement, even those
		// long before t0, is beyond the cursor.
		{"hole", 0, steady(30, 200*time.Millisecond, 5), -1, 25},
		// Started with 4 records from an earlier run, whose acknowledgements are not logged: the
		// hole may be among them, so all 20 own and a second resend of the 4.
		{"loaded", 4, steady(20, 200*time.Millisecond, 0), -1, 24},
		// ...but no more than the next process resent; a repeated line counts once.
		{"loaded, 9 resent after", 4, append(steady(20, 200*time.Millisecond, 0), own(20, k)), 9, 9},
		// Another run's line (not the killed process's own) is not its acknowledgement.
		{"foreign line", 0, append(steady(20, 200*time.Millisecond, 0), Delivery{MsgID{"soak-1", "r1", 3}, k}), -1, 10},
		{"nothing resent after", 0, steady(20, 200*time.Millisecond, 0), 0, 0},
		{"nothing", 0, nil, -1, 0},
	}
	for _, c := range cases {
		if got := KillAllowance("r2", c.resent, c.delivered, t0, c.reloaded); got != c.want {
			t.Errorf("%s: allowance %d, want %d", c.name, got, c.want)
		}
	}
}
