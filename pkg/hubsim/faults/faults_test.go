package faults

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/pkg/clock"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func props(kv ...string) func(string) (string, bool) {
	return func(k string) (string, bool) {
		for i := 0; i+1 < len(kv); i += 2 {
			if kv[i] == k {
				return kv[i+1], true
			}
		}
		return "", false
	}
}

func TestParse(t *testing.T) {
	cases := []struct {
		name  string
		get   func(string) (string, bool)
		ok    bool
		kind  Kind
		delay time.Duration
		dur   time.Duration
		err   string
	}{
		{"none", props("x", "y"), false, 0, 0, 0, ""},
		{"node killtcp", props(PropType, "KillTcp", PropCloseReason, " severs the TCP connection ", PropDelay, "1"), true, KindKill, time.Second, 0, ""},
		{"c lowercase link", props(PropType, "KillAmqpc2dLink", PropDelay, "1", PropDuration, "20"), true, KindKill, time.Second, 20 * time.Second, ""},
		{"shutdown", props(PropType, "ShutDownMqtt", PropCloseReason, "byebye", PropDelay, "2"), true, KindShutdown, 2 * time.Second, 0, ""},
		{"decimal", props(PropType, "InvokeAuthError", PropDelay, "0.5", PropDuration, "5"), true, KindAuth, 500 * time.Millisecond, 5 * time.Second, ""},
		{"throttle", props(PropType, "InvokeThrottling"), true, KindThrottle, 0, 0, ""},
		{"quota", props(PropType, "InvokeMaxMessageQuota"), true, KindQuota, 0, 0, ""},
		{"unknown", props(PropType, "Explode"), true, 0, 0, 0, "unknown fault operation type"},
		{"bad delay", props(PropType, "KillTcp", PropDelay, "soon"), true, KindKill, 0, 0, PropDelay},
		{"negative", props(PropType, "KillTcp", PropDuration, "-1"), true, KindKill, 0, 0, PropDuration},
		{"huge", props(PropType, "KillTcp", PropDelay, "1e9"), true, KindKill, 0, 0, PropDelay},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, ok, err := Parse(c.get)
			if ok != c.ok {
				t.Fatalf("ok = %v, want %v", ok, c.ok)
			}
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("err = %v, want it to mention %q", err, c.err)
				}
				if c.name == "unknown" && !errors.Is(err, ErrUnknownType) {
					t.Fatalf("err = %v, want ErrUnknownType", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if ok && (s.Kind != c.kind || s.Delay != c.delay || s.Duration != c.dur) {
				t.Fatalf("got %+v, want kind %v delay %v duration %v", s, c.kind, c.delay, c.dur)
			}
		})
	}
}

// waitArmed waits until the fake clock has n armed timers.
func waitArmed(t *testing.T, clk *clock.Fake, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := clk.WaitArmed(ctx, n); err != nil {
		t.Fatalf("timers armed: %d, want %d", len(clk.Armed()), n)
	}
}

func TestScheduleAfterDelayOpensWindow(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	in := New(clk, nil)
	defer in.Close()
	applied := make(chan Spec, 1)
	spec := Spec{Type: "InvokeAuthError", Kind: KindAuth, Delay: 2 * time.Second, Duration: 5 * time.Second, CloseReason: "boom"}
	in.Schedule("dev1", spec, func(s Spec) string { applied <- s; return "dropped" })
	waitArmed(t, clk, 1)
	clk.Advance(time.Second)
	select {
	case <-applied:
		t.Fatal("applied before the delay")
	default:
	}
	if _, ok := in.ActiveFor("dev1", KindAuth); ok {
		t.Fatal("window open before the fault started")
	}
	clk.Advance(time.Second)
	select {
	case <-applied:
	case <-time.After(10 * time.Second):
		t.Fatal("fault not applied after its delay")
	}
	// The record is written right after apply returns.
	deadline := time.Now().Add(10 * time.Second)
	for len(in.Status().Log) == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	st := in.Status()
	if len(st.Log) != 1 || st.Log[0].Action != "dropped" || st.Log[0].DeviceID != "dev1" || st.Log[0].Reason != "boom" {
		t.Fatalf("log = %+v", st.Log)
	}
	if st.Counters["InvokeAuthError/requested"] != 1 || st.Counters["InvokeAuthError/dropped"] != 1 {
		t.Fatalf("counters = %v", st.Counters)
	}
	if len(st.Active) != 1 || st.Active[0].DeviceID != "dev1" || st.Active[0].Kind != "auth" {
		t.Fatalf("active = %+v", st.Active)
	}
	if _, ok := in.ActiveFor("dev1", KindAuth); !ok {
		t.Fatal("auth window not open during the duration")
	}
	if _, ok := in.ActiveFor("dev2", KindAuth); ok {
		t.Fatal("window leaked to another device")
	}
	clk.Advance(5 * time.Second)
	if _, ok := in.ActiveFor("dev1", KindAuth); ok {
		t.Fatal("auth window still open after its duration")
	}
	if a := in.Status().Active; len(a) != 0 {
		t.Fatalf("active after expiry = %+v", a)
	}
}

func TestKillOpensNoWindowAndCloseStopsPending(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	in := New(clk, nil)
	applied := make(chan struct{}, 2)
	in.Schedule("d", Spec{Type: "KillTcp", Kind: KindKill, Duration: time.Minute}, func(Spec) string { applied <- struct{}{}; return "tcp-reset" })
	select {
	case <-applied:
	case <-time.After(10 * time.Second):
		t.Fatal("zero-delay fault not applied")
	}
	if _, ok := in.ActiveFor("d", KindKill); ok {
		t.Fatal("a Kill fault must not open a window")
	}
	in.Schedule("d", Spec{Type: "KillTcp", Kind: KindKill, Delay: time.Hour}, func(Spec) string { applied <- struct{}{}; return "tcp-reset" })
	in.Close() // must return without the hour passing, and the fault never applies
	select {
	case <-applied:
		t.Fatal("pending fault applied after Close")
	default:
	}
	in.Schedule("d", Spec{Type: "KillTcp", Kind: KindKill}, func(Spec) string { applied <- struct{}{}; return "x" })
	if n := len(clk.Armed()); n > 1 {
		t.Fatalf("Schedule after Close armed a timer (%d armed)", n)
	}
}

func FuzzParse(f *testing.F) {
	f.Add("KillTcp", "boom", "2", "5")
	f.Add("killamqpc2dlink", "", "1.5", "")
	f.Add("x", "", "NaN", "-0")
	f.Fuzz(func(t *testing.T, typ, reason, delay, dur string) {
		s, ok, err := Parse(props(PropType, typ, PropCloseReason, reason, PropDelay, delay, PropDuration, dur))
		if !ok {
			t.Fatal("a fault type was present")
		}
		if err == nil && (s.Delay < 0 || s.Delay > maxSeconds*time.Second || s.Duration < 0 || s.Duration > maxSeconds*time.Second || s.Kind == 0) {
			t.Fatalf("accepted out-of-range %+v", s)
		}
	})
}

// TestRefuseConnectSeeded: a rule with probability 0.5 refuses the same CONNECTs for the same
// seed, and a different sequence for another seed.
func TestRefuseConnectSeeded(t *testing.T) {
	run := func(seed uint64) []bool {
		in := New(clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)), nil)
		defer in.Close()
		if _, err := in.Apply(RuleRequest{Action: ActionRefuseConnect, DurationSecs: 60, Probability: 0.5, Seed: seed}); err != nil {
			t.Fatal(err)
		}
		var out []bool
		for range 64 {
			_, _, refused := in.ConnectRefusal("d")
			out = append(out, refused)
		}
		return out
	}
	a, b, c := run(42), run(42), run(43)
	if !slices.Equal(a, b) {
		t.Fatal("same seed, different refusals")
	}
	if slices.Equal(a, c) {
		t.Fatal("different seeds, identical refusals over 64 draws")
	}
	n := 0
	for _, r := range a {
		if r {
			n++
		}
	}
	if n == 0 || n == 64 {
		t.Fatalf("probability 0.5 refused %d of 64", n)
	}
}

func TestRuleExpires(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	in := New(clk, nil)
	defer in.Close()
	if _, err := in.Apply(RuleRequest{Action: ActionRefuseConnect, DeviceID: "a", Code: 5, DurationSecs: 10}); err != nil {
		t.Fatal(err)
	}
	if code, _, ok := in.ConnectRefusal("a"); !ok || code != 5 {
		t.Fatalf("refusal = %d %v", code, ok)
	}
	if _, _, ok := in.ConnectRefusal("b"); ok {
		t.Fatal("rule for a refused b")
	}
	clk.Advance(10 * time.Second)
	if _, _, ok := in.ConnectRefusal("a"); ok {
		t.Fatal("rule still refusing after its duration")
	}
	if len(in.Status().Rules) != 0 {
		t.Fatal("expired rule still listed")
	}
}
