package faults

import (
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/clock"
)

type nopConns struct{}

func (nopConns) Drop(string) int                   { return 0 }
func (nopConns) ExpireToken(string) int            { return 0 }
func (nopConns) Stall(string, <-chan struct{}) int { return 0 }

// ruleInBounds checks an accepted rule against the documented bounds of its action.
func ruleInBounds(r Rule) error {
	switch r.Action {
	case ActionRefuseConnect:
		if r.Code < 1 || r.Code > 5 {
			return errors.New("CONNACK code")
		}
	case ActionRESTError, ActionDPSError:
		if r.Code != 429 && r.Code != 500 && r.Code != 503 {
			return errors.New("HTTP status")
		}
		if r.RetryAfterSecs < 0 || r.RetryAfterSecs > maxSeconds {
			return errors.New("retry-after")
		}
	case ActionPubackDelay, ActionRESTDelay, ActionDPSDelay:
		if !(r.DelaySecs > 0 && r.DelaySecs <= maxSeconds) {
			return errors.New("delay")
		}
	case ActionC2DDuplicate:
		if r.Count < 1 || r.Count > 1000 {
			return errors.New("count")
		}
	case ActionTokenExpire, ActionStall:
		return nil
	default:
		return fmt.Errorf("unexpected action %q", r.Action)
	}
	if !(r.Probability > 0 && r.Probability <= 1) {
		return errors.New("probability")
	}
	return nil
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func ptr(i int) *int { return &i }

func TestApplyValidation(t *testing.T) {
	in := New(clock.NewFake(t0), nil)
	defer in.Close()
	bad := []struct {
		req  RuleRequest
		want string
	}{
		{RuleRequest{Action: ActionPubackDelay, DurationSecs: 10}, "delaySecs must be in (0, 3600]"},
		{RuleRequest{Action: ActionPubackDrop}, "durationSecs must be in (0, 3600]"},
		{RuleRequest{Action: ActionRESTError, Code: 404, DurationSecs: 1}, "code 404: want 429, 500 or 503"},
		{RuleRequest{Action: ActionRESTError, RetryAfterSecs: ptr(-1), DurationSecs: 1}, "retryAfterSecs -1"},
		{RuleRequest{Action: ActionRESTError, PathPrefix: "devices", DurationSecs: 1}, "must start with /"},
		{RuleRequest{Action: ActionRESTDelay, Method: "BREW", DelaySecs: 1, DurationSecs: 1}, `method "BREW"`},
		{RuleRequest{Action: ActionDPSError, PathPrefix: "/x", DurationSecs: 1}, "pathPrefix and method apply to rest-error and rest-delay only"},
		{RuleRequest{Action: ActionTokenExpire, DelaySecs: 4000}, "delaySecs must be in [0, 3600]"},
		{RuleRequest{Action: ActionTokenExpire, DurationSecs: 3}, "durationSecs does not apply to token-expire"},
		{RuleRequest{Action: ActionStall}, "durationSecs must be in (0, 3600]"},
		{RuleRequest{Action: ActionStall, DurationSecs: 1, Probability: 0.5}, "probability and seed do not apply"},
		{RuleRequest{Action: ActionC2DDuplicate, Count: 1001}, "count 1001"},
		{RuleRequest{Action: ActionPubackDrop, DurationSecs: 1, Code: 3}, "code does not apply to puback-drop"},
		{RuleRequest{Action: ActionPubackDrop, DurationSecs: 1, Probability: 1.5}, "probability must be in (0, 1]"},
		{RuleRequest{Action: "puback"}, `action "puback"`},
	}
	for _, c := range bad {
		_, err := in.Apply(c.req)
		if !errors.Is(err, ErrBadRule) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Apply(%+v) = %v, want an error naming %q", c.req, err, c.want)
		}
	}
	r, err := in.Apply(RuleRequest{Action: ActionRESTError, DurationSecs: 5})
	if err != nil || r.Code != 503 || r.RetryAfterSecs != 1 || r.Probability != 1 || r.Seed != 1 || !r.Until.Equal(t0.Add(5*time.Second)) {
		t.Fatalf("defaults: %+v %v", r, err)
	}
	r, err = in.Apply(RuleRequest{Action: ActionC2DDuplicate})
	if err != nil || r.Count != 1 || !r.Until.Equal(t0.Add(time.Hour)) {
		t.Fatalf("c2d defaults: %+v %v", r, err)
	}
}

// TestPubackFaultSeeded: puback-drop with probability 0.3 drops the same publishes for the
// same seed; puback-delay applies to the rest; both are counted.
func TestPubackFaultSeeded(t *testing.T) {
	run := func(seed uint64) (drops []bool, delayed int, st Status) {
		in := New(clock.NewFake(t0), nil)
		defer in.Close()
		if _, err := in.Apply(RuleRequest{Action: ActionPubackDrop, DeviceID: "d", DurationSecs: 60, Probability: 0.3, Seed: seed}); err != nil {
			t.Fatal(err)
		}
		if _, err := in.Apply(RuleRequest{Action: ActionPubackDelay, DelaySecs: 2.5, DurationSecs: 60}); err != nil {
			t.Fatal(err)
		}
		for range 50 {
			d, drop := in.PubackFault("d")
			drops = append(drops, drop)
			if !drop {
				if d != 2500*time.Millisecond {
					t.Fatalf("delay %v, want 2.5s", d)
				}
				delayed++
			}
		}
		if d, drop := in.PubackFault("other"); drop || d != 2500*time.Millisecond {
			t.Fatalf("other device: drop %v delay %v; the drop rule names d only, the delay rule all", drop, d)
		}
		return drops, delayed, in.Status()
	}
	a, na, st := run(5)
	b, _, _ := run(5)
	c, _, _ := run(6)
	if !slices.Equal(a, b) || slices.Equal(a, c) {
		t.Fatal("drops are not a function of the seed")
	}
	if na == 0 || na == 50 {
		t.Fatalf("probability 0.3 dropped %d of 50", 50-na)
	}
	if st.Counters["admin:puback-drop/puback-dropped"] != int64(50-na) || st.Counters["admin:puback-delay/puback-delayed"] != int64(na+1) {
		t.Fatalf("counters %v (dropped %d)", st.Counters, 50-na)
	}
}

type recConns struct {
	expired chan string
	stalled chan (<-chan struct{})
}

func (*recConns) Drop(string) int                           { return 0 }
func (c *recConns) ExpireToken(id string) int               { c.expired <- id; return 1 }
func (c *recConns) Stall(_ string, rel <-chan struct{}) int { c.stalled <- rel; return 2 }

// TestTokenExpireAndStallOnClock: token-expire acts when its delay has passed on the clock, not
// before; a stall is released when its duration passes, or at once by DELETE.
func TestTokenExpireAndStallOnClock(t *testing.T) {
	clk := clock.NewFake(t0)
	in := New(clk, nil)
	defer in.Close()
	c := &recConns{expired: make(chan string, 2), stalled: make(chan (<-chan struct{}), 2)}
	in.SetConns(c)
	if _, err := in.Apply(RuleRequest{Action: ActionTokenExpire, DeviceID: "d", DelaySecs: 30}); err != nil {
		t.Fatal(err)
	}
	if n := len(in.Status().Rules); n != 1 {
		t.Fatalf("pending token-expire not listed: %d rules", n)
	}
	clk.Advance(29 * time.Second)
	if armed := clk.Armed(); !slices.ContainsFunc(armed, func(at time.Time) bool { return at.Equal(t0.Add(30 * time.Second)) }) {
		t.Fatalf("token expiry timer not armed for t0+30s after 29s: %v", armed)
	}
	select {
	case id := <-c.expired:
		t.Fatalf("token of %s expired before its delay", id)
	default:
	}
	clk.Advance(time.Second)
	select {
	case id := <-c.expired:
		if id != "d" {
			t.Fatalf("expired %q", id)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("token not expired 30s after the rule")
	}

	r, err := in.Apply(RuleRequest{Action: ActionStall, DurationSecs: 10})
	if err != nil || r.Count != 2 {
		t.Fatalf("stall: %+v %v", r, err)
	}
	rel := <-c.stalled
	clk.Advance(9 * time.Second)
	select {
	case <-rel:
		t.Fatal("stall released before its duration")
	default:
	}
	clk.Advance(time.Second)
	select {
	case <-rel:
	case <-time.After(10 * time.Second):
		t.Fatal("stall not released after its duration")
	}
	if _, err := in.Apply(RuleRequest{Action: ActionStall, DurationSecs: 100}); err != nil {
		t.Fatal(err)
	}
	rel = <-c.stalled
	if n := in.ClearRules(); n != 1 {
		t.Fatalf("cleared %d", n)
	}
	select {
	case <-rel:
	default:
		t.Fatal("DELETE did not release the stall")
	}
}

// TestRESTAndDPSFaultFilters: rest rules match by path prefix, method and device; dps rules by
// registration ID; C2D duplicates count down.
func TestRESTAndDPSFaultFilters(t *testing.T) {
	in := New(clock.NewFake(t0), nil)
	defer in.Close()
	if _, err := in.Apply(RuleRequest{Action: ActionRESTError, Code: 429, RetryAfterSecs: ptr(7), PathPrefix: "/twins/", Method: "patch", DurationSecs: 60}); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Apply(RuleRequest{Action: ActionRESTDelay, DeviceID: "d1", DelaySecs: 3, DurationSecs: 60}); err != nil {
		t.Fatal(err)
	}
	if f := in.RESTFault(http.MethodPatch, "/twins/d2", "d2"); f.Status != 429 || f.RetryAfter != 7 || f.Delay != 0 {
		t.Fatalf("PATCH /twins/d2: %+v", f)
	}
	if f := in.RESTFault(http.MethodGet, "/twins/d2", "d2"); f.Status != 0 {
		t.Fatalf("GET matched a PATCH rule: %+v", f)
	}
	if f := in.RESTFault(http.MethodPatch, "/devices/d1", "d1"); f.Status != 0 || f.Delay != 3*time.Second {
		t.Fatalf("PATCH /devices/d1: %+v", f)
	}
	if _, err := in.Apply(RuleRequest{Action: ActionDPSError, DeviceID: "reg1", Code: 500, RetryAfterSecs: ptr(0), DurationSecs: 60}); err != nil {
		t.Fatal(err)
	}
	if f := in.DPSFault("reg1"); f.Status != 500 || f.RetryAfter != 0 {
		t.Fatalf("dps reg1: %+v", f)
	}
	if f := in.DPSFault("reg2"); f.Status != 0 {
		t.Fatalf("dps reg2: %+v", f)
	}
	if _, err := in.Apply(RuleRequest{Action: ActionC2DDuplicate, DeviceID: "d1", Count: 2}); err != nil {
		t.Fatal(err)
	}
	got := []bool{in.C2DDuplicate("d2", "m0"), in.C2DDuplicate("d1", "m1"), in.C2DDuplicate("d1", "m2"), in.C2DDuplicate("d1", "m3")}
	if !slices.Equal(got, []bool{false, true, true, false}) {
		t.Fatalf("duplicates %v", got)
	}
	st := in.Status()
	if st.Counters["admin:c2d-duplicate/duplicated"] != 2 || st.Counters["admin:rest-error/answered 429"] != 1 || st.Counters["admin:dps-error/answered 500"] != 1 {
		t.Fatalf("counters %v", st.Counters)
	}
}
