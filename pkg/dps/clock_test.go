package dps_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/backoff"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/dps"
)

// scriptedDPS answers from a script of "status retry-after body" (retry-after "-" for none).
func scriptedDPS(t *testing.T, script []string) (*httptest.Server, *atomic.Int64) {
	var n atomic.Int64
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := min(int(n.Add(1)-1), len(script)-1)
		f := strings.SplitN(script[i], " ", 3)
		w.Header().Set("Content-Type", "application/json")
		if f[1] != "-" {
			w.Header().Set("Retry-After", f[1])
		}
		code := map[string]int{"200": 200, "202": 202, "429": 429, "503": 503}[f[0]]
		w.WriteHeader(code)
		_, _ = w.Write([]byte(f[2]))
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

type registered struct {
	res *dps.Result
	err error
}

func registerAsync(t *testing.T, cfg dps.Config) <-chan registered {
	ch := make(chan registered, 1)
	ctx := ctxT(t)
	go func() {
		res, err := dps.Register(ctx, cfg)
		ch <- registered{res, err}
	}()
	return ch
}

// step waits until a timer is armed at at, checks that n requests were made meanwhile, then
// moves the clock there.
func step(t *testing.T, clk *clock.Fake, at time.Time, n *atomic.Int64, want int64) {
	t.Helper()
	if err := clk.WaitTimer(ctxT(t), at); err != nil {
		t.Fatal(err)
	}
	if got := n.Load(); got != want {
		t.Fatalf("%d requests before the wait ended, want %d", got, want)
	}
	clk.Advance(at.Sub(clk.Now()))
}

func TestRetryAfterAndPollWaitOnFakeClock(t *testing.T) {
	srv, n := scriptedDPS(t, []string{
		`503 3 {"errorCode":503000,"message":"busy"}`,
		`202 2 {"operationId":"o","status":"assigning"}`,
		`202 - {"operationId":"o","status":"assigning"}`,
		assigned[:4] + "- " + assigned[4:],
	})
	t0 := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	clk := clock.NewFake(t0)
	cfg := fakeCfg(t, srv)
	cfg.Clock = clk
	cfg.Rand = func() float64 { return 0.5 }
	cfg.BackoffMin, cfg.BackoffMax = time.Second, 30*time.Second
	done := registerAsync(t, cfg)
	// 503 with Retry-After 3: the backoff's 1 s floor is raised to the server's 3 s.
	at := t0.Add(3 * time.Second)
	step(t, clk, at, n, 1)
	// 202 with Retry-After 2: poll after 2 s plus 10 % of it times Rand (0.5): 2.1 s.
	at = at.Add(2100 * time.Millisecond)
	step(t, clk, at, n, 2)
	// 202 without Retry-After: the default 2 s interval, jittered the same way.
	at = at.Add(2100 * time.Millisecond)
	step(t, clk, at, n, 3)
	r := <-done
	if r.err != nil || r.res.AssignedHub != "h" {
		t.Fatalf("%+v %v", r.res, r.err)
	}
	if !r.res.Obtained.Equal(at) {
		t.Errorf("obtained %v, want the clock's %v", r.res.Obtained, at)
	}
	if n.Load() != 4 {
		t.Errorf("%d requests, want 4", n.Load())
	}
}

func TestBackoffPolicyOnFakeClock(t *testing.T) {
	srv, n := scriptedDPS(t, []string{
		`503 - {"errorCode":503000,"message":"busy"}`,
		`503 - {"errorCode":503000,"message":"busy"}`,
		`429 - {"errorCode":429001,"message":"slow down"}`,
		`503 - {"errorCode":503000,"message":"busy"}`,
		assigned[:4] + "- " + assigned[4:],
	})
	t0 := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	clk := clock.NewFake(t0)
	cfg := fakeCfg(t, srv)
	cfg.Clock = clk
	const r = 0.999
	cfg.Rand = func() float64 { return r }
	cfg.BackoffMin, cfg.BackoffMax = time.Second, 5*time.Second
	cfg.MaxWait = time.Second // the cap on waits is max(MaxWait, BackoffMax)
	policy := backoff.Policy{Min: time.Second, Max: 5 * time.Second}
	done := registerAsync(t, cfg)
	at := t0
	for i := range 4 {
		// The one policy: full jitter below min(Max, Min·2^i), never under Min.
		at = at.Add(policy.Delay(i, r))
		step(t, clk, at, n, int64(i+1))
	}
	if got := at.Sub(t0); got != time.Second+1998*time.Millisecond+3996*time.Millisecond+4995*time.Millisecond {
		t.Errorf("waited %v in all", got)
	}
	if res := <-done; res.err != nil {
		t.Fatal(res.err)
	}
}

func TestRegisterStopsWithContextWhileWaiting(t *testing.T) {
	srv, n := scriptedDPS(t, []string{`503 - {"errorCode":503000,"message":"busy"}`})
	clk := clock.NewFake(time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC))
	cfg := fakeCfg(t, srv)
	cfg.Clock = clk
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := dps.Register(ctx, cfg)
		errc <- err
	}()
	if err := clk.WaitArmed(ctxT(t), 1); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-errc; err == nil || !strings.Contains(err.Error(), context.Canceled.Error()) {
		t.Fatalf("err = %v, want the context's cancellation", err)
	}
	if n.Load() != 1 {
		t.Errorf("%d requests, want 1", n.Load())
	}
}
