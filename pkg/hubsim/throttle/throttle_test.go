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

func TestAllowNCountsMetersAndCapsAtTheBucket(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l, err := NewTier("s1", 1, clk)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		size int64
		want int
	}{{0, 1}, {1, 1}, {4096, 1}, {4097, 2}, {160 * 1024, 40}, {1 << 20, 256}} {
		if got := MethodUnits(c.size); got != c.want {
			t.Errorf("MethodUnits(%d) = %d, want %d", c.size, got, c.want)
		}
	}
	// S1 x1: 40 meters a second. A 12 KB call takes 3; 13 of them use 39, the 14th is refused.
	for i := range 13 {
		if !l.AllowN(Method, 3) {
			t.Fatalf("call %d of 3 meters refused with %d meters used", i+1, 3*i)
		}
	}
	if l.AllowN(Method, 3) {
		t.Fatal("a 3-meter call allowed with 1 meter left")
	}
	if !l.AllowN(Method, 1) {
		t.Fatal("a 1-meter call refused with 1 meter left")
	}
	// A call larger than the bucket needs a full bucket, not more: it passes after a second.
	clk.Advance(time.Second)
	if !l.AllowN(Method, 256) || l.AllowN(Method, 1) {
		t.Fatal("a 1 MB call on a full 40-meter bucket: want allowed, emptying it")
	}
	st := l.Status()
	if st.Tier != "S1" || st.Units != 1 || len(st.Operations) != len(Ops) {
		t.Fatalf("status %+v", st)
	}
	var m Counter
	for _, c := range st.Operations {
		if c.Op == Method {
			m = c
		}
	}
	if m.Allowed != 15 || m.Throttled != 2 || m.PerSecond != 40 {
		t.Fatalf("method counters %+v, want 15 allowed, 2 throttled, 40/s", m)
	}
	if q, _ := ForTier("S3", 2); q[Query] != 2000.0/60 {
		t.Fatalf("S3 x2 queries %v/s, want 1,000/min/unit", q[Query])
	}
	if s := (*Limiter)(nil).Status(); s.Tier != "" || s.Operations == nil {
		t.Fatalf("nil limiter status %+v", s)
	}
}

func TestSetTierSwitchesAtRuntime(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l := Off(clk)
	for range 1000 {
		if !l.Allow(Connect) {
			t.Fatal("an off limiter refused")
		}
	}
	if st := l.Status(); st.Tier != "" || len(st.Operations) != 0 {
		t.Fatalf("off: status %+v, want no tier and no rows", st)
	}
	if err := l.SetTier("S9", 1); err == nil {
		t.Fatal("SetTier(S9) accepted")
	}
	if err := l.SetTier("s1", 1); err != nil {
		t.Fatal(err)
	}
	if !l.Allow(Registry) || l.Allow(Registry) {
		t.Fatal("S1 registry after SetTier: want one allowed, then refused")
	}
	if st := l.Status(); st.Tier != "S1" || st.Operations[2].Throttled != 1 {
		t.Fatalf("status after SetTier %+v", st)
	}
	if err := l.SetTier("S3", 1); err != nil || !l.Allow(Registry) {
		t.Fatalf("S3 (83/s) after S1: %v, want a fresh bucket", err)
	}
	if st := l.Status(); st.Operations[2].Allowed != 1 || st.Operations[2].Throttled != 0 {
		t.Fatalf("counters not restarted by SetTier: %+v", st.Operations[2])
	}
	if err := l.Set(Request{Tier: "S3", Units: 1, Limits: Limits{Connect: 1, "bogus": 2}}); err == nil {
		t.Fatal("Set with an unknown operation accepted")
	}
	if err := l.Set(Request{Tier: "S3", Units: 1, Limits: Limits{Connect: 1}}); err != nil {
		t.Fatal(err)
	}
	if !l.Allow(Connect) || l.Allow(Connect) || l.Rate(Connect) != 1 || l.Rate(D2C) != 6000 {
		t.Fatal("S3 with connect overridden to 1/s: want one connect, then refused; D2C at S3's 6000/s")
	}
	if err := l.SetTier("", 0); err != nil {
		t.Fatal(err)
	}
	for range 10 {
		if !l.Allow(Registry) {
			t.Fatal("refused after SetTier(\"\")")
		}
	}
}

func TestParseRequest(t *testing.T) {
	for _, c := range []struct {
		in    string
		tier  string
		units int
	}{{`{"tier":"s2","units":3}`, "S2", 3}, {`{"tier":"F1"}`, "F1", 1}, {` {"tier":"B3","units":1} `, "B3", 1},
		{`{"tier":"S1","limits":{"connect":1,"d2c":0.5}}`, "S1", 1}} {
		r, err := ParseRequest([]byte(c.in))
		if err != nil || r.Tier != c.tier || r.Units != c.units {
			t.Errorf("ParseRequest(%s) = %+v, %v", c.in, r, err)
		}
	}
	for _, bad := range []string{``, `null`, `[]`, `{"tier":"S4"}`, `{"tier":"S1","units":-1}`, `{"tier":"F1","units":2}`,
		`{"tier":"S1","unit":2}`, `{"tier":"S1"} {}`, `{"tier":1}`, "{\"tier\":\"S1\xff\"}", `{"tier":""}`,
		`{"tier":"S1","limits":{"connects":1}}`, `{"tier":"S1","limits":{"connect":0}}`, `{"tier":"S1","limits":{"connect":-1}}`,
		`{"tier":"S1","limits":{"connect":1e7}}`, `{"tier":"S1","limits":[]}`} {
		if r, err := ParseRequest([]byte(bad)); err == nil {
			t.Errorf("ParseRequest(%q) accepted: %+v", bad, r)
		}
	}
}

func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{`{"tier":"S1","units":1}`, `{"tier":"f1"}`, `{"tier":"S2","limits":{"connect":2}}`, `{"tier":"S3","units":200}`, `{`, `{"tier":"S1","x":1}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		if err != nil {
			return
		}
		if _, err := ForTier(r.Tier, r.Units); err != nil || r.Units < 1 {
			t.Fatalf("accepted %q as %+v, which ForTier refuses: %v", b, r, err)
		}
		if err := Off(clock.Real()).Set(r); err != nil {
			t.Fatalf("accepted %q as %+v, which Set refuses: %v", b, r, err)
		}
	})
}

// BenchmarkAllow measures what a throttle check costs an operation: off (no --tier: one atomic
// load) and on (S3 x10, a bucket that never runs dry here: a mutex and a map lookup), from
// parallel goroutines as hubsim's connections call it.
func BenchmarkAllow(b *testing.B) {
	on, err := NewTier("S3", 10, clock.Real())
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name string
		l    *Limiter
	}{{"off", Off(clock.Real())}, {"S3x10", on}} {
		b.Run(c.name, func(b *testing.B) {
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					c.l.Allow(D2C)
				}
			})
		})
	}
}
