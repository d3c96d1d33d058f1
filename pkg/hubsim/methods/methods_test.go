package methods

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func ptr(v int) *int { return &v }

func TestValidate(t *testing.T) {
	r := Request{MethodName: "m"}
	if err := r.Validate(); err != nil || *r.ResponseTimeoutInSeconds != 30 || *r.ConnectTimeoutInSeconds != 0 {
		t.Fatalf("defaults: %v %+v", err, r)
	}
	for name, r := range map[string]Request{
		"no name":        {},
		"bad name":       {MethodName: "a b"},
		"response 4":     {MethodName: "m", ResponseTimeoutInSeconds: ptr(4)},
		"response 301":   {MethodName: "m", ResponseTimeoutInSeconds: ptr(301)},
		"connect -1":     {MethodName: "m", ConnectTimeoutInSeconds: ptr(-1)},
		"connect 301":    {MethodName: "m", ConnectTimeoutInSeconds: ptr(301)},
		"payload 128 KB": {MethodName: "m", Payload: make([]byte, MaxPayload+1)},
	} {
		if err := r.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// fakeSender is offline until online is closed; it then delivers to deliver.
type fakeSender struct {
	mu      sync.Mutex
	online  bool
	signal  chan struct{}
	deliver chan string
}

func (f *fakeSender) SendMethodRequest(_, _, rid string, _ []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.online {
		return broker.ErrNotSubscribed
	}
	f.deliver <- rid
	return nil
}

func (f *fakeSender) SubscriptionSignal() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.signal
}

func (f *fakeSender) goOnline() {
	f.mu.Lock()
	f.online = true
	close(f.signal)
	f.signal = make(chan struct{})
	f.mu.Unlock()
}

// A call waits through the connect timeout for a subscription, then completes with the first
// answer; a cancelled caller ends the wait.
func TestInvokeWaitsForSubscription(t *testing.T) {
	s := New(nil)
	f := &fakeSender{signal: make(chan struct{}), deliver: make(chan string, 1)}
	s.SetSender(f)
	type out struct {
		r   Result
		err error
	}
	done := make(chan out, 1)
	go func() {
		r, err := s.Invoke(context.Background(), "d1", Request{MethodName: "m", ResponseTimeoutInSeconds: ptr(30), ConnectTimeoutInSeconds: ptr(60)})
		done <- out{r, err}
	}()
	f.goOnline()
	var rid string
	select {
	case rid = <-f.deliver:
	case <-time.After(10 * time.Second):
		t.Fatal("not delivered after the device subscribed")
	}
	s.MethodResponse(broker.Caller{DeviceID: "d1"}, rid, 207, []byte(`{"x":1}`))
	s.MethodResponse(broker.Caller{DeviceID: "d1"}, rid, 500, nil)
	o := <-done
	if o.err != nil || o.r.Status != 207 || string(o.r.Payload) != `{"x":1}` {
		t.Fatalf("result %+v %v", o.r, o.err)
	}
	if s.Ignored() != 1 {
		t.Fatalf("ignored %d", s.Ignored())
	}

	ctx, cancel := context.WithCancel(context.Background())
	f2 := &fakeSender{signal: make(chan struct{}), deliver: make(chan string, 1)}
	s.SetSender(f2)
	go func() {
		_, err := s.Invoke(ctx, "d2", Request{MethodName: "m", ResponseTimeoutInSeconds: ptr(30), ConnectTimeoutInSeconds: ptr(300)})
		done <- out{err: err}
	}()
	cancel()
	if o := <-done; !errors.Is(o.err, context.Canceled) {
		t.Fatalf("cancelled call: %v", o.err)
	}
}
