package hub_test

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/wire"
)

// A connected, idle session parks its supervisor: no goroutine of the session's own runs until
// an event comes. These tests count goroutines, so the ones that do are not parallel (the
// package's parallel tests run after them).

// goroutineStacks returns the stacks of every live goroutine.
func goroutineStacks() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	return strings.Split(string(buf), "\n\n")
}

// startedBySession reports whether pkg/hub started the goroutine (its supervisor, dispatcher,
// dial, or AfterDone's functions); paho's and the test broker's (pkg/hub/hubtest) are not.
func startedBySession(stack string) bool {
	i := strings.LastIndex(stack, "\ncreated by ")
	return i >= 0 && strings.Contains(stack[i:], "iothubby/pkg/hub.")
}

func stackID(stack string) string {
	id, _, _ := strings.Cut(stack, " [")
	return id
}

// sessionGoroutineIDs is the set of goroutines pkg/hub has started that are alive now: left by
// earlier tests and still exiting, they are not the next session's.
func sessionGoroutineIDs() map[string]bool {
	ids := map[string]bool{}
	for _, g := range goroutineStacks() {
		if startedBySession(g) {
			ids[stackID(g)] = true
		}
	}
	return ids
}

// waitParked waits until no goroutine started by pkg/hub is alive except those in before, and
// fails naming the ones left (their stacks).
func waitParked(t *testing.T, before map[string]bool, after string) {
	t.Helper()
	waitfor.NoError(t, "no goroutine of the session's own "+after, func() error {
		var own []string
		for _, g := range goroutineStacks() {
			if startedBySession(g) && !before[stackID(g)] {
				own = append(own, g)
			}
		}
		if len(own) > 0 {
			return fmt.Errorf("%d goroutines of the session's own:\n%s", len(own), strings.Join(own, "\n\n"))
		}
		return nil
	})
}

// startParked starts a session on a broker of its own and waits until it is connected and
// parked. before is the set of pkg/hub goroutines alive before it started (for waitParked).
func startParked(t *testing.T) (b *hubtest.Broker, f *fixture, before map[string]bool) {
	t.Helper()
	b = hubtest.NewBroker(t)
	before = sessionGoroutineIDs()
	f = start(t, b, nil)
	if err := f.s.WaitConnected(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	waitParked(t, before, "once connected")
	return b, f, before
}

// afterDoneCounter counts the calls of a function given to AfterDone.
type afterDoneCounter struct {
	n  atomic.Int32
	ch chan struct{}
}

func watchDone(s *hub.Session) *afterDoneCounter {
	a := &afterDoneCounter{ch: make(chan struct{}, 2)}
	s.AfterDone(func() {
		a.n.Add(1)
		a.ch <- struct{}{}
	})
	return a
}

func (a *afterDoneCounter) wait(t *testing.T) {
	t.Helper()
	select {
	case <-a.ch:
	case <-time.After(10 * time.Second):
		t.Fatal("AfterDone's function did not run")
	}
	if n := a.n.Load(); n != 1 {
		t.Fatalf("AfterDone's function ran %d times", n)
	}
}

func TestIdleSessionHoldsNoGoroutine(t *testing.T) {
	b, f, before := startParked(t)
	ctx := ctxT(t)
	for i := range 3 {
		if err := f.s.Send(ctx, &hub.Message{Body: []byte("x"), MessageID: fmt.Sprint("m", i)}); err != nil {
			t.Fatalf("send %d from a parked session: %v", i, err)
		}
		waitParked(t, before, fmt.Sprintf("after send %d", i))
	}
	if got := b.TelemetryMIDs(); !slices.Equal(got, []string{"m0", "m1", "m2"}) {
		t.Fatalf("hub received %v", got)
	}
	if st := f.s.Status(); st.State != hub.Connected {
		t.Fatalf("status %v/%v, want connected", st.State, st.Reason)
	}
}

// Each kind of event wakes a parked session, which handles it and parks again.
func TestParkedSessionReactsToEachEvent(t *testing.T) {
	b := hubtest.NewBroker(t)
	before := sessionGoroutineIDs()
	methods := make(chan *hub.MethodRequest, 1)
	f, clk := startFake(t, b, func(c *hub.Config) {
		c.OnMethod = func(_ context.Context, r *hub.MethodRequest) { methods <- r }
	})
	ctx := ctxT(t)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	waitParked(t, before, "once connected")

	// Telemetry.
	if err := f.s.Send(ctx, &hub.Message{Body: []byte("t"), MessageID: "t1"}); err != nil {
		t.Fatalf("telemetry from a parked session: %v", err)
	}
	if got := b.TelemetryMIDs(); !slices.Equal(got, []string{"t1"}) {
		t.Fatalf("hub received %v, want [t1]", got)
	}
	waitParked(t, before, "after telemetry")

	// A twin request (answered on paho's goroutine; the session stays parked throughout).
	if r, err := f.s.TwinGet(ctx); err != nil || !r.OK() {
		t.Fatalf("twin get on a parked session: %+v %v", r, err)
	}
	waitParked(t, before, "after a twin request")

	// A method answer, published by the supervisor.
	b.Publish(wire.MethodRequest("ping", "k1"), nil, 0)
	r := <-methods
	if err := f.s.RespondMethod(ctx, r.RequestID, 200, []byte(`{"ok":true}`)); err != nil {
		t.Fatalf("method answer from a parked session: %v", err)
	}
	b.WaitEvent(t, "method-response")
	b.With(func(h *hubtest.Hook) {
		if len(h.MethodResponses) != 1 || h.MethodResponses[0].RequestID != "k1" || h.MethodResponses[0].Status != 200 {
			t.Errorf("method responses %+v", h.MethodResponses)
		}
	})
	waitParked(t, before, "after a method answer")

	// A message past its deadline when it arrives expires, unsent.
	expired := make(chan error, 1)
	if err := f.s.Enqueue(&hub.Message{MessageID: "late", Deadline: clk.Now()}, func(err error) { expired <- err }); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-expired:
		if !errors.Is(err, hub.ErrMessageExpired) {
			t.Fatalf("message past its deadline: %v, want ErrMessageExpired", err)
		}
	case <-ctx.Done():
		t.Fatal("a message past its deadline was not failed by the parked session")
	}
	waitParked(t, before, "after an expired message")

	// Token renewal: the parked session's timer is on the fake clock.
	renewAt := b.ConnectRecords()[0].Token.Expiry.Add(-9 * time.Minute) // 85% of 1h after the connect
	if err := clk.WaitTimer(ctx, renewAt); err != nil {
		t.Fatal(err)
	}
	clk.Advance(renewAt.Sub(clk.Now()) - time.Second)
	if n := f.s.Stats().Renewals; n != 0 {
		t.Fatalf("renewed a second before the renewal was due")
	}
	clk.Advance(time.Second)
	f.status.wait(t, hub.DisconnectedRetrying, hub.ExpiredSASToken)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	waitParked(t, before, "after a renewal")

	// The connection dropped by the hub: reconnect after the backoff.
	b.Drop("dev1")
	st := f.status.wait(t, hub.DisconnectedRetrying, hub.CommunicationError)
	retry(t, clk, st)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	waitParked(t, before, "after a reconnect")
	if err := f.s.Send(ctx, &hub.Message{Body: []byte("t"), MessageID: "t2"}); err != nil {
		t.Fatalf("telemetry after the reconnect: %v", err)
	}
	if got := b.TelemetryMIDs(); !slices.Equal(got, []string{"t1", "t2"}) {
		t.Fatalf("hub received %v, want [t1 t2]", got)
	}
	if s := f.s.Stats(); s.Connects != 3 || s.Renewals != 1 || s.ConnectionsLost != 1 || s.Sent != 2 || s.Failed != 1 {
		t.Errorf("stats %+v, want 3 connects, 1 renewal, 1 lost, 2 sent, 1 failed", s)
	}
}

// Close wakes a parked session, which drains what was queued, disconnects cleanly and stops.
func TestCloseDrainsParkedSession(t *testing.T) {
	b, f, _ := startParked(t)
	ctx := ctxT(t)
	done := watchDone(f.s)
	acked := make(chan error, 1)
	if err := f.s.Enqueue(&hub.Message{Body: []byte("x"), MessageID: "last"}, func(err error) { acked <- err }); err != nil {
		t.Fatal(err)
	}
	if err := f.s.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-acked; err != nil {
		t.Fatalf("message queued before Close: %v, want delivered", err)
	}
	select {
	case <-f.s.Done():
	default:
		t.Fatal("Done not closed after Close returned")
	}
	done.wait(t)
	if err := f.s.Err(); err != nil {
		t.Errorf("Err after Close: %v", err)
	}
	if st := f.s.Status(); st.State != hub.Disabled || st.Reason != hub.ClientClose {
		t.Errorf("status %v/%v after Close, want Disabled/ClientClose", st.State, st.Reason)
	}
	waitFor(t, func() bool {
		var n int
		b.With(func(h *hubtest.Hook) { n = h.CleanDisconnect })
		return n == 1
	}, "a clean DISCONNECT")
	if got := b.TelemetryMIDs(); !slices.Equal(got, []string{"last"}) {
		t.Errorf("hub received %v, want [last]", got)
	}
	// Close again: waits again, returns the same.
	if err := f.s.Close(ctx); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if n := done.n.Load(); n != 1 {
		t.Errorf("AfterDone's function ran %d times", n)
	}
}

// Close with a context already ended aborts a parked session at once: it stops, with nothing
// left running and every message accounted for.
func TestCloseAbortsParkedSession(t *testing.T) {
	_, f, _ := startParked(t)
	done := watchDone(f.s)
	outcome := make(chan error, 1)
	if err := f.s.Enqueue(&hub.Message{Body: []byte("x"), MessageID: "m"}, func(err error) { outcome <- err }); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	cerr := f.s.Close(ctx)
	select {
	case <-f.s.Done():
	default:
		t.Fatal("Done not closed after Close returned")
	}
	// The message raced the abort: delivered, or failed and reported by Close.
	switch err := <-outcome; {
	case err == nil && cerr == nil:
	case err != nil && errors.Is(err, hub.ErrClosed) && errors.Is(cerr, hub.ErrClosed):
	default:
		t.Fatalf("message outcome %v with Close returning %v", err, cerr)
	}
	done.wait(t)
	for _, g := range goroutineStacks() {
		if strings.Contains(g, "iothubby/pkg/hub.(*Session).supervise") || strings.Contains(g, "iothubby/pkg/hub.(*Session).dispatch") {
			t.Fatalf("a session goroutine outlived Close:\n%s", g)
		}
	}
	if st := f.s.Status(); st.State != hub.Disabled {
		t.Errorf("status %v/%v after Close, want Disabled", st.State, st.Reason)
	}
}

// Wake-ups race parking: many senders, twin requests and method answers at once, each
// finding the session parked, running or about to park. A lost wake-up leaves a Send waiting
// until its deadline; two supervisors at once are a data race (-race).
func TestParkingUnderConcurrentEvents(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	var s *hub.Session
	var answered atomic.Int32
	f := start(t, b, func(c *hub.Config) {
		c.OnMethod = func(_ context.Context, r *hub.MethodRequest) {
			if s.RespondMethodAsync(r.RequestID, 200, nil) == nil {
				answered.Add(1)
			}
		}
	})
	s = f.s
	ctx := ctxT(t)
	if err := s.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	const senders, each, methods = 4, 40, 20
	var wg sync.WaitGroup
	errs := make(chan error, senders*each+2*methods)
	for g := range senders {
		wg.Go(func() {
			for i := range each {
				if err := s.Send(ctx, &hub.Message{Body: []byte("x"), MessageID: fmt.Sprintf("g%d-%d", g, i)}); err != nil {
					errs <- fmt.Errorf("send g%d-%d: %w", g, i, err)
				}
			}
		})
	}
	wg.Go(func() {
		for i := range methods {
			if _, err := s.TwinGet(ctx); err != nil {
				errs <- fmt.Errorf("twin get %d: %w", i, err)
			}
			b.Publish(wire.MethodRequest("m", fmt.Sprint("r", i)), nil, 0)
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	waitFor(t, func() bool { return answered.Load() == methods }, fmt.Sprintf("%d method answers queued", methods))
	waitFor(t, func() bool {
		var n int
		b.With(func(h *hubtest.Hook) { n = len(h.MethodResponses) })
		return n == methods
	}, fmt.Sprintf("%d method answers at the hub", methods))
	if st := s.Stats(); st.Sent != senders*each || st.Failed != 0 || st.Connects != 1 {
		t.Errorf("stats %+v, want %d sent, none failed, one connection", st, senders*each)
	}
	mids := b.TelemetryMIDs()
	slices.Sort(mids)
	if n := len(slices.Compact(mids)); n != senders*each {
		t.Errorf("hub received %d distinct messages, want %d", n, senders*each)
	}
}
