package hub_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/backoff"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Renewal, backoff and expiry on a fake clock: the session's timers are armed on it and the test
// moves time, so nothing waits through real seconds (the 1s backoff floor still applies).

// startFake starts a session on a fake clock that reads a whole second (so SAS expiries, which
// have second precision, are exact).
func startFake(t *testing.T, b *hubtest.Broker, mutate func(*hub.Config)) (*fixture, *clock.Fake) {
	t.Helper()
	clk := clock.NewFake(time.Now().Truncate(time.Second))
	f := start(t, b, func(c *hub.Config) {
		c.Clock = clk
		if mutate != nil {
			mutate(c)
		}
	})
	return f, clk
}

// retry waits until the supervisor has armed its timer for the retry that st announces, checks
// that it does not fire early, then lets the delay pass.
func retry(t *testing.T, clk *clock.Fake, st hub.Status) {
	t.Helper()
	at := st.At.Add(st.RetryIn)
	if err := clk.WaitTimer(ctxT(t), at); err != nil {
		t.Fatal(err)
	}
	if st.RetryIn > time.Millisecond {
		clk.Advance(at.Sub(clk.Now()) - time.Millisecond)
		if armed := clk.Armed(); len(armed) == 0 || !armed[0].Equal(at) {
			t.Fatalf("retry timer fired early: armed %v, want %v", armed, at)
		}
	}
	clk.Advance(at.Sub(clk.Now()))
}

func TestTokenRenewal(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	f, clk := startFake(t, b, nil) // default TokenTTL 1h, RenewAt 0.85
	ctx := ctxT(t)
	t0 := clk.Now()
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	for i := range 3 {
		// Renewal at 85% of the token's life: 51 minutes after the connect.
		renewAt := clk.Now().Add(51 * time.Minute)
		if err := clk.WaitTimer(ctx, renewAt); err != nil {
			t.Fatal(err)
		}
		clk.Advance(renewAt.Sub(clk.Now()) - time.Second)
		if got := f.s.Stats().Renewals; got != uint64(i) {
			t.Fatalf("renewed %d times a second before renewal %d was due", got, i+1)
		}
		clk.Advance(time.Second)
		f.status.wait(t, hub.DisconnectedRetrying, hub.ExpiredSASToken)
		f.status.wait(t, hub.Connected, hub.ConnectionOK)
		if err := f.s.Send(ctx, &hub.Message{Body: []byte("x"), MessageID: fmt.Sprint("r", i)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.s.TwinGet(ctx); err != nil {
		t.Fatal(err)
	}
	// A renewal disconnects cleanly. The broker handles each connection on its own goroutine:
	// when it takes the next CONNECT before reading the previous connection's DISCONNECT, it
	// reports that one as taken over instead.
	var clean, takenOver int
	waitFor(t, func() bool {
		b.With(func(h *hubtest.Hook) { clean, takenOver = h.CleanDisconnect, h.TakenOver })
		return clean+takenOver == 3
	}, "3 renewed connections ended")
	t.Logf("renewed connections: %d ended by DISCONNECT, %d taken over", clean, takenOver)
	b.With(func(h *hubtest.Hook) {
		if h.ExpiredDrops != 0 {
			t.Errorf("%d connections outlived their token", h.ExpiredDrops)
		}
		if len(h.Connects) != 4 {
			t.Fatalf("connects = %d, want 4", len(h.Connects))
		}
		for i, r := range h.Connects {
			if r.Refused != 0 {
				t.Errorf("connect %d refused with %d", i, r.Refused)
			}
			// Each token is fresh: built at its connect's time, living exactly TokenTTL.
			want := t0.Add(time.Duration(i)*51*time.Minute + time.Hour)
			if r.Token == nil || !r.Token.Expiry.Equal(want) {
				t.Errorf("connect %d token %+v, want expiry %v", i, r.Token, want)
			}
		}
	})
	if st := f.s.Stats(); st.Renewals != 3 || st.ConnectionsLost != 0 || st.Sent != 3 {
		t.Errorf("stats %+v, want 3 renewals, no loss, 3 sent", st)
	}
}

func TestRenewalWaitsForPendingRequest(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	b.With(func(h *hubtest.Hook) { h.Twin = hubtest.TwinHold })
	f, clk := startFake(t, b, nil)
	ctx := ctxT(t)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	renewAt := clk.Now().Add(51 * time.Minute)
	if err := clk.WaitTimer(ctx, renewAt); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := f.s.TwinGet(ctx)
		errc <- err
	}()
	b.WaitEvent(t, "twin-request")
	clk.Advance(renewAt.Sub(clk.Now()))
	// The connection drains: the renewal waits (at most OperationTimeout) for the answer.
	if err := clk.WaitTimer(ctx, renewAt.Add(hub.DefaultOperationTimeout)); err != nil {
		t.Fatal(err)
	}
	if n := len(b.ConnectRecords()); n != 1 {
		t.Fatalf("reconnected (%d connects) with a request pending", n)
	}
	if held := b.AnswerHeld(); len(held) != 1 {
		t.Fatalf("answered %d held requests", len(held))
	}
	if err := <-errc; err != nil {
		t.Fatalf("request pending at renewal: %v", err)
	}
	f.status.wait(t, hub.DisconnectedRetrying, hub.ExpiredSASToken)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	if st := f.s.Stats(); st.Renewals != 1 || st.UnknownResponses != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestBackoffGrowsAndResetsOnFakeClock(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	b.With(func(h *hubtest.Hook) { h.Refuse = []byte{3, 3, 3, 3} })
	const r = 0.999
	f, clk := startFake(t, b, func(c *hub.Config) { c.Rand = func() float64 { return r } })
	policy := backoff.Policy{Min: hub.DefaultBackoffMin, Max: hub.DefaultBackoffMax}
	for i := range 4 {
		st := f.status.wait(t, hub.DisconnectedRetrying, hub.CommunicationError)
		if want := policy.Delay(i, r); st.Attempt != i+1 || st.RetryIn != want {
			t.Fatalf("refusal %d: attempt %d retry in %v, want attempt %d in %v", i, st.Attempt, st.RetryIn, i+1, want)
		}
		if n := len(b.ConnectRecords()); n != i+1 {
			t.Fatalf("connects = %d before retry %d's delay passed, want %d", n, i+1, i+1)
		}
		retry(t, clk, st)
	}
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	// A connection that drops at once does not reset the backoff...
	b.Drop("dev1")
	st := f.status.wait(t, hub.DisconnectedRetrying, hub.CommunicationError)
	if want := policy.Delay(4, r); st.Attempt != 5 || st.RetryIn != want {
		t.Fatalf("drop after a short connection: attempt %d retry in %v, want 5 in %v", st.Attempt, st.RetryIn, want)
	}
	retry(t, clk, st)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	// ...one that stayed up for StableAfter does.
	clk.Advance(hub.StableAfter)
	b.Drop("dev1")
	st = f.status.wait(t, hub.DisconnectedRetrying, hub.CommunicationError)
	if st.Attempt != 1 || st.RetryIn != time.Second {
		t.Fatalf("drop after a stable connection: attempt %d retry in %v, want 1 in 1s", st.Attempt, st.RetryIn)
	}
	retry(t, clk, st)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	if n := len(b.ConnectRecords()); n != 7 {
		t.Errorf("connects = %d, want 7", n)
	}
}

func TestRetryTimeoutExpiresOnFakeClock(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	d := &offlineDialer{}
	d.offline.Store(true)
	f, clk := startFake(t, b, func(c *hub.Config) {
		c.Dial = d.dial
		c.RetryTimeout = 5 * time.Second
		c.Rand = func() float64 { return 0 } // every retry after the 1s floor
	})
	t0 := clk.Now()
	for range 5 {
		retry(t, clk, f.status.wait(t, hub.DisconnectedRetrying, hub.NoNetwork))
	}
	st := f.status.wait(t, hub.Disconnected, hub.RetryExpired)
	<-f.s.Done()
	if !errors.Is(f.s.Err(), hub.ErrRetryExpired) || !errors.Is(st.Err, hub.ErrRetryExpired) {
		t.Fatalf("err = %v, status err %v, want ErrRetryExpired", f.s.Err(), st.Err)
	}
	if got := clk.Now().Sub(t0); got != 5*time.Second {
		t.Errorf("expired after %v of fake time, want 5s", got)
	}
	if n := d.attempts.Load(); n != 6 {
		t.Errorf("dial attempts = %d, want 6 (at 0s..5s)", n)
	}
}

func TestMessageTimeoutOnFakeClock(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	d := &offlineDialer{}
	d.offline.Store(true)
	f, clk := startFake(t, b, func(c *hub.Config) {
		c.Dial = d.dial
		c.MessageTimeout = 10 * time.Second
		c.BackoffMin, c.BackoffMax = time.Minute, time.Minute // no retry before the expiry
	})
	f.status.wait(t, hub.DisconnectedRetrying, hub.NoNetwork)
	t0 := clk.Now()
	done := make(chan error, 1)
	if err := f.s.Enqueue(&hub.Message{MessageID: "exp"}, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	if err := clk.WaitTimer(ctx, t0.Add(10*time.Second)); err != nil {
		t.Fatal(err)
	}
	clk.Advance(10*time.Second - time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("failed before its timeout: %v", err)
	default:
	}
	clk.Advance(time.Millisecond)
	select {
	case err := <-done:
		if !errors.Is(err, hub.ErrMessageExpired) {
			t.Fatalf("err = %v, want ErrMessageExpired", err)
		}
	case <-ctx.Done():
		t.Fatal("message not expired at its timeout")
	}
	if st := f.s.Stats(); st.Queued != 0 || st.Failed != 1 {
		t.Errorf("stats %+v", st)
	}
	if n := d.attempts.Load(); n != 1 {
		t.Errorf("dial attempts = %d, want 1 (the retry is a minute away)", n)
	}
}

func TestServerUnavailableIsRetried(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	b.With(func(h *hubtest.Hook) { h.Refuse = []byte{3} })
	var rolls atomic.Int32
	f, clk := startFake(t, b, func(c *hub.Config) {
		c.Rand = func() float64 { rolls.Add(1); return 0 } // jitter source is injectable
	})
	st := f.status.wait(t, hub.DisconnectedRetrying, hub.CommunicationError)
	var ce *hub.ConnackError
	if !errors.As(st.Err, &ce) || ce.Code != 3 {
		t.Errorf("err = %v, want CONNACK 3", st.Err)
	}
	if st.RetryIn != time.Second || st.Attempt != 1 {
		t.Fatalf("retry in %v attempt %d, want the 1s floor on attempt 1", st.RetryIn, st.Attempt)
	}
	retry(t, clk, st)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	if n := len(b.ConnectRecords()); n != 2 {
		t.Errorf("connects = %d, want 2", n)
	}
	if rolls.Load() != 1 {
		t.Errorf("jitter rolled %d times, want 1", rolls.Load())
	}
}

func TestRespondMethodFailsFastWhenDisconnected(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	d := &offlineDialer{}
	methods := make(chan *hub.MethodRequest, 1)
	f, _ := startFake(t, b, func(c *hub.Config) {
		c.Dial = d.dial
		c.OnMethod = func(_ context.Context, r *hub.MethodRequest) { methods <- r }
	})
	ctx := ctxT(t)
	if err := f.s.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	b.Publish(wire.MethodRequest("slow", "m1"), nil, 0)
	r := <-methods
	d.offline.Store(true)
	b.Drop("dev1")
	f.status.wait(t, hub.DisconnectedRetrying, hub.CommunicationError)
	// The fake clock never moves, so the session stays disconnected: an answer must not wait
	// for a connection (the request died with the one that delivered it).
	err := f.s.RespondMethod(ctx, r.RequestID, 200, nil)
	if !errors.Is(err, hub.ErrNotConnected) || !errors.Is(err, hub.ErrStaleRequest) {
		t.Fatalf("RespondMethod while disconnected: %v, want ErrStaleRequest and ErrNotConnected", err)
	}
	if err := f.s.RespondMethodAsync(r.RequestID, 501, nil); !errors.Is(err, hub.ErrNotConnected) {
		t.Fatalf("RespondMethodAsync while disconnected: %v, want ErrNotConnected", err)
	}
}

func TestRespondMethodAsyncFromTheDeliveryGoroutine(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	c2d := make(chan string, 4)
	var s *hub.Session
	asyncErr := make(chan error, 4)
	f, _ := startFake(t, b, func(c *hub.Config) {
		c.OnMethod = func(_ context.Context, r *hub.MethodRequest) {
			// A refusal sent on the goroutine that delivers C2D: it returns at once.
			asyncErr <- s.RespondMethodAsync(r.RequestID, 429, []byte(`{"message":"busy"}`))
		}
		c.OnC2D = func(_ context.Context, m *hub.C2DMessage) { c2d <- m.MessageID }
	})
	s = f.s
	if err := s.WaitConnected(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	b.Publish(wire.MethodRequest("busy", "r1"), nil, 0)
	b.Publish("devices/dev1/messages/devicebound/%24.mid=after", []byte("x"), 1)
	if err := <-asyncErr; err != nil {
		t.Fatalf("RespondMethodAsync: %v", err)
	}
	if got := <-c2d; got != "after" {
		t.Fatalf("C2D %q", got)
	}
	b.WaitEvent(t, "method-response")
	b.With(func(h *hubtest.Hook) {
		if len(h.MethodResponses) != 1 || h.MethodResponses[0].RequestID != "r1" || h.MethodResponses[0].Status != 429 ||
			h.MethodBodies[0] != `{"message":"busy"}` {
			t.Errorf("method responses %+v %q", h.MethodResponses, h.MethodBodies)
		}
	})
	if err := s.RespondMethodAsync("r1", 200, nil); !errors.Is(err, hub.ErrStaleRequest) {
		t.Errorf("second answer: %v, want ErrStaleRequest", err)
	}
}

func TestRenewalWaitsForMethodAnswer(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	methods := make(chan *hub.MethodRequest, 1)
	var connects atomic.Int32
	f, clk := startFake(t, b, func(c *hub.Config) {
		c.OnMethod = func(_ context.Context, r *hub.MethodRequest) { methods <- r }
		// The renewal's CONNECT waits until the hub has read the answer written on the old
		// connection: the test broker (mochi) closes a connection taken over by a new CONNECT
		// of the same client without reading what is still buffered on it, which lost the
		// answer about once in 75 runs under -race. An answer never written is never read,
		// and the check at the end fails.
		c.BeforeConnect = func(ctx context.Context) error {
			if connects.Add(1) == 1 {
				return nil
			}
			return answerRead(ctx, b)
		}
	})
	ctx := ctxT(t)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	renewAt := clk.Now().Add(51 * time.Minute)
	if err := clk.WaitTimer(ctx, renewAt); err != nil {
		t.Fatal(err)
	}
	b.Publish(wire.MethodRequest("m", "k1"), nil, 0)
	r := <-methods
	clk.Advance(renewAt.Sub(clk.Now()))
	// Draining: the renewal waits (at most OperationTimeout) for the method's answer.
	if err := clk.WaitTimer(ctx, renewAt.Add(hub.DefaultOperationTimeout)); err != nil {
		t.Fatal(err)
	}
	if n := len(b.ConnectRecords()); n != 1 {
		t.Fatalf("reconnected (%d connects) with a method unanswered", n)
	}
	if err := f.s.RespondMethod(ctx, r.RequestID, 200, []byte(`{"ok":1}`)); err != nil {
		t.Fatalf("answer on the draining connection: %v", err)
	}
	f.status.wait(t, hub.DisconnectedRetrying, hub.ExpiredSASToken)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	b.WaitEvent(t, "method-response")
	b.With(func(h *hubtest.Hook) {
		if len(h.MethodResponses) != 1 || h.MethodResponses[0].RequestID != "k1" || h.MethodBodies[0] != `{"ok":1}` {
			t.Errorf("method responses %+v %q: the answer must reach the hub before the renewal", h.MethodResponses, h.MethodBodies)
		}
	})
}

// answerRead waits (10 s at most) until the broker has read a method answer.
func answerRead(ctx context.Context, b *hubtest.Broker) error {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(10 * time.Second)
	for {
		n := 0
		b.With(func(h *hubtest.Hook) { n = len(h.MethodResponses) })
		if n > 0 {
			return nil
		}
		select {
		case <-tick.C:
		case <-deadline:
			return errors.New("the hub did not read the method's answer")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
