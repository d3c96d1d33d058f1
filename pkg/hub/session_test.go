package hub_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// statusLog records status events and lets a test wait for one.
type statusLog struct {
	mu  sync.Mutex
	all []hub.Status
	ch  chan hub.Status
}

func newStatusLog() *statusLog { return &statusLog{ch: make(chan hub.Status, 256)} }

func (l *statusLog) record(st hub.Status) {
	l.mu.Lock()
	l.all = append(l.all, st)
	l.mu.Unlock()
	l.ch <- st
}

func (l *statusLog) wait(t *testing.T, state hub.ConnState, reason hub.Reason) hub.Status {
	t.Helper()
	deadline := time.After(15 * time.Second)
	for {
		select {
		case st := <-l.ch:
			if st.State == state && st.Reason == reason {
				return st
			}
		case <-deadline:
			t.Fatalf("status %v/%v not reported; saw %v", state, reason, l.snapshot())
		}
	}
}

func (l *statusLog) snapshot() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, st := range l.all {
		out = append(out, st.State.String()+"/"+st.Reason.String())
	}
	return out
}

type fixture struct {
	b      *hubtest.Broker
	s      *hub.Session
	status *statusLog
	cfg    hub.Config
}

// lean runs the session tests with the lean MQTT client (internal/mqttc) instead of paho's:
// `go test ./pkg/hub -args -lean` (make test-unit runs the package both ways).
var lean = flag.Bool("lean", false, "connect with the lean MQTT client (hub.Config.LeanMQTT)")

func baseConfig(b *hubtest.Broker) hub.Config {
	return hub.Config{
		Host:     hubtest.Host,
		Address:  b.Addr,
		DeviceID: "dev1",
		Signer:   b.Key,
		RootCAs:  b.CAPool,
		LeanMQTT: *lean,
	}
}

// start creates a session against b; mutate adjusts the config first.
func start(t *testing.T, b *hubtest.Broker, mutate func(*hub.Config)) *fixture {
	t.Helper()
	f := &fixture{b: b, status: newStatusLog()}
	cfg := baseConfig(b)
	cfg.OnStatus = f.status.record
	if mutate != nil {
		mutate(&cfg)
	}
	s, err := hub.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	f.s, f.cfg = s, cfg
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Close(ctx)
	})
	return f
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestConnectPacketFormat(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	f := start(t, b, nil)
	if err := f.s.WaitConnected(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	recs := b.ConnectRecords()
	if len(recs) != 1 {
		t.Fatalf("connects = %d, want 1", len(recs))
	}
	r := recs[0]
	if r.ClientID != "dev1" {
		t.Errorf("client id %q", r.ClientID)
	}
	if want := "hub.test/dev1/?api-version=2021-04-12"; r.Username != want {
		t.Errorf("username %q, want %q", r.Username, want)
	}
	if r.Clean {
		t.Error("CleanSession = true, want false")
	}
	if r.Keepalive != 120 {
		t.Errorf("keepalive %d, want 120", r.Keepalive)
	}
	if !strings.HasPrefix(r.Password, "SharedAccessSignature sr=hub.test%2Fdevices%2Fdev1&sig=") {
		t.Errorf("password shape: %.60s…", r.Password)
	}
	if r.Token == nil || r.Token.KeyName != "" || r.Token.Resource != "hub.test/devices/dev1" {
		t.Fatalf("token %+v", r.Token)
	}
	if err := r.Token.Verify(b.Key, time.Now()); err != nil {
		t.Error(err)
	}
	if ttl := time.Until(r.Token.Expiry); ttl < 59*time.Minute || ttl > 61*time.Minute {
		t.Errorf("token ttl %v, want about 1h", ttl)
	}
}

func TestModuleAndModelIDUsername(t *testing.T) {
	t.Parallel()
	cfg := hub.Config{Host: "h.example", DeviceID: "d1", ModuleID: "m1", ModelID: "dtmi:com:example:Thermostat;1"}
	if got, want := cfg.Username(), "h.example/d1/m1/?api-version=2021-04-12&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1"; got != want {
		t.Errorf("username %q, want %q", got, want)
	}
	if cfg.ClientID() != "d1/m1" {
		t.Errorf("client id %q", cfg.ClientID())
	}
	if cfg.Resource() != "h.example/devices/d1/modules/m1" {
		t.Errorf("resource %q", cfg.Resource())
	}
}

func TestSubscribedBeforeFirstRequest(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	f := start(t, b, nil)
	resp, err := f.s.TwinGet(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status != 200 || !bytes.Contains(resp.Body, []byte(`"desired":{"$version":1}`)) {
		t.Fatalf("response %d %s", resp.Status, resp.Body)
	}
	log := b.ClientLog("dev1")
	want := map[string]bool{"sub:devices/dev1/messages/devicebound/#": false, "sub:" + wire.TwinResponseFilter: false,
		"sub:" + wire.TwinDesiredFilter: false, "sub:" + wire.MethodsFilter: false}
	for _, e := range log {
		if strings.HasPrefix(e, "pub:") {
			break
		}
		if _, ok := want[e]; ok {
			want[e] = true
		}
	}
	for f, seen := range want {
		if !seen {
			t.Errorf("%s not subscribed before the first publish; log %v", f, log)
		}
	}
}

func TestRequestCorrelationConcurrent(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	b.With(func(h *hubtest.Hook) { h.Twin = hubtest.TwinHold })
	f := start(t, b, nil)
	ctx := ctxT(t)
	if err := f.s.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	const n = 20
	type result struct {
		resp hub.Response
		err  error
	}
	results := make(chan result, n)
	for range n {
		go func() {
			r, err := f.s.TwinGet(ctx)
			results <- result{r, err}
		}()
	}
	for range n {
		b.WaitEvent(t, "twin-request")
	}
	// An answer for a $rid nobody asked for is dropped and counted.
	b.SendTo(b.Client("dev1"), wire.TwinResponse(200, "no-such-rid", -1), []byte(`{}`))
	rids := b.AnswerHeld()
	if len(rids) != n {
		t.Fatalf("held %d requests, want %d", len(rids), n)
	}
	seen := map[string]bool{}
	for range n {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		var body struct{ Rid string }
		if err := json.Unmarshal(r.resp.Body, &body); err != nil {
			t.Fatal(err)
		}
		if body.Rid != r.resp.RequestID {
			t.Errorf("request $rid=%s got the answer for %s", r.resp.RequestID, body.Rid)
		}
		if seen[body.Rid] {
			t.Errorf("$rid %s answered twice", body.Rid)
		}
		seen[body.Rid] = true
	}
	waitFor(t, func() bool { return f.s.Stats().UnknownResponses == 1 }, "unknown response counted")
}

func TestRequestDeadline(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	b.With(func(h *hubtest.Hook) { h.Twin = hubtest.TwinSilent })
	f := start(t, b, nil)
	if err := f.s.WaitConnected(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := f.s.TwinGet(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	// A late answer is dropped and counted, not delivered anywhere.
	b.SendTo(b.Client("dev1"), wire.TwinResponse(200, "1", -1), []byte(`{}`))
	waitFor(t, func() bool { return f.s.Stats().UnknownResponses == 1 }, "late response dropped")
}

func TestPendingRequestsFailOnDisconnect(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	b.With(func(h *hubtest.Hook) { h.Twin = hubtest.TwinHold })
	f, clk := startFake(t, b, nil)
	ctx := ctxT(t)
	if err := f.s.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := f.s.TwinGet(ctx)
		errc <- err
	}()
	b.WaitEvent(t, "twin-request")
	b.Drop("dev1")
	if err := <-errc; !errors.Is(err, hub.ErrConnectionLost) {
		t.Fatalf("err = %v, want ErrConnectionLost", err)
	}
	// After the reconnect, an answer to the old $rid on the new connection is dropped.
	f.status.wait(t, hub.Connected, hub.ConnectionOK) // first connection
	retry(t, clk, f.status.wait(t, hub.DisconnectedRetrying, hub.CommunicationError))
	f.status.wait(t, hub.Connected, hub.ConnectionOK) // reconnection
	var old []hubtest.HeldRequest
	b.With(func(h *hubtest.Hook) { old, h.Held = h.Held, nil })
	if len(old) != 1 {
		t.Fatalf("held %d", len(old))
	}
	b.SendTo(b.Client("dev1"), wire.TwinResponse(200, old[0].Topic.RequestID, -1), []byte(`{}`))
	waitFor(t, func() bool { return f.s.Stats().UnknownResponses == 1 }, "stale answer dropped")
}

func TestReconnectAfterDropWithBackoff(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	f, clk := startFake(t, b, nil)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	b.Drop("dev1")
	st := f.status.wait(t, hub.DisconnectedRetrying, hub.CommunicationError)
	if st.RetryIn < time.Second {
		t.Errorf("retry in %v, below the 1s minimum", st.RetryIn)
	}
	if st.Err == nil {
		t.Error("no error on an unplanned disconnect")
	}
	retry(t, clk, st)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	if n := len(b.ConnectRecords()); n != 2 {
		t.Errorf("connects = %d, want 2", n)
	}
	if got := f.s.Stats(); got.Connects != 2 || got.ConnectionsLost != 1 {
		t.Errorf("stats %+v", got)
	}
}

func TestNotAuthorizedStops(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	b.With(func(h *hubtest.Hook) { h.RefuseAll = 5 })
	f := start(t, b, nil)
	select {
	case <-f.s.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("session did not stop")
	}
	err := f.s.Err()
	if !errors.Is(err, hub.ErrNotAuthorized) {
		t.Fatalf("err = %v, want ErrNotAuthorized", err)
	}
	st := f.status.wait(t, hub.Disconnected, hub.BadCredential)
	if !errors.Is(st.Err, hub.ErrNotAuthorized) {
		t.Errorf("status err %v", st.Err)
	}
	if n := len(b.ConnectRecords()); n != 1 {
		t.Errorf("connect attempts = %d, want exactly 1", n)
	}
	if err := f.s.Enqueue(&hub.Message{Body: []byte("x")}, nil); !errors.Is(err, hub.ErrNotAuthorized) {
		t.Errorf("Enqueue after stop: %v", err)
	}
	if _, err := f.s.TwinGet(ctxT(t)); !errors.Is(err, hub.ErrNotAuthorized) {
		t.Errorf("TwinGet after stop: %v", err)
	}
}

func TestWrongKeyIsNotAuthorized(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	f := start(t, b, func(c *hub.Config) { c.Signer = sas.Key(bytes.Repeat([]byte{9}, 32)) })
	<-f.s.Done()
	if !errors.Is(f.s.Err(), hub.ErrNotAuthorized) {
		t.Fatalf("err = %v", f.s.Err())
	}
}

func TestTLSVerifyFailure(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	otherCA, _ := hubtest.NewCA(t, "other CA")
	other := x509.NewCertPool()
	other.AddCert(otherCA)
	for name, mutate := range map[string]func(*hub.Config){
		"untrusted CA": func(c *hub.Config) { c.RootCAs = other },
		"wrong name":   func(c *hub.Config) { c.ServerName = "not-the-hub.test" },
	} {
		t.Run(name, func(t *testing.T) {
			f := start(t, b, mutate)
			<-f.s.Done()
			if !errors.Is(f.s.Err(), hub.ErrTLSVerify) {
				t.Fatalf("err = %v, want ErrTLSVerify", f.s.Err())
			}
			f.status.wait(t, hub.Disconnected, hub.CommunicationError)
		})
	}
}

func TestTelemetryOrderAndProperties(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	f := start(t, b, func(c *hub.Config) { c.MaxInFlight = 4 })
	const n = 50
	var wg sync.WaitGroup
	var failures atomic.Int32
	for i := range n {
		wg.Add(1)
		err := f.s.Enqueue(&hub.Message{
			Body: []byte(`{"n":1}`), MessageID: fmt.Sprintf("m%03d", i), CorrelationID: "c1",
			ContentType: "application/json", ContentEncoding: "utf-8",
			Properties: map[string]string{"b": "2 two", "a": "1"},
		}, func(err error) {
			if err != nil {
				failures.Add(1)
			}
			wg.Done()
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	if failures.Load() != 0 {
		t.Fatalf("%d failures", failures.Load())
	}
	mids := b.TelemetryMIDs()
	if len(mids) != n {
		t.Fatalf("broker got %d messages", len(mids))
	}
	for i, mid := range mids {
		if want := fmt.Sprintf("m%03d", i); mid != want {
			t.Fatalf("message %d is %s, want %s (order)", i, mid, want)
		}
	}
	var topic string
	b.With(func(h *hubtest.Hook) {
		for _, e := range h.Log["dev1"] {
			if strings.HasPrefix(e, "pub:devices/") {
				topic = strings.TrimPrefix(e, "pub:")
				break
			}
		}
	})
	if want := "devices/dev1/messages/events/%24.mid=m000&%24.cid=c1&%24.ct=application%2Fjson&%24.ce=utf-8&a=1&b=2%20two"; topic != want {
		t.Errorf("topic\n got %s\nwant %s", topic, want)
	}
	if st := f.s.Stats(); st.Sent != n || st.Queued != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestTelemetryRefusals(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	f := start(t, b, nil)
	big := &hub.Message{Body: make([]byte, hub.MaxMessageSize+1)}
	if err := f.s.Send(ctxT(t), big); !errors.Is(err, hub.ErrMessageTooLarge) {
		t.Errorf("oversize: %v", err)
	}
	// 22,000 bytes of properties, well under 256 KB, but percent-encoded to a 66 KB topic: no
	// MQTT broker can take it, so it is refused at once instead of re-sent after each reconnect.
	wide := &hub.Message{Properties: map[string]string{"p": strings.Repeat("%", 22_000)}}
	if err := f.s.Enqueue(wide, nil); !errors.Is(err, hub.ErrMessageTooLarge) || !strings.Contains(err.Error(), "65535-byte limit") {
		t.Errorf("over-long topic: %v", err)
	}
	bad := &hub.Message{Properties: map[string]string{"$.mid": "x"}}
	if err := f.s.Enqueue(bad, nil); !errors.Is(err, hub.ErrInvalidMessage) {
		t.Errorf("system-named property: %v", err)
	}
	if b.TelemetryMIDs() != nil {
		t.Error("a refused message reached the broker")
	}
}

// offlineDialer fails while offline is set, so a session can be kept disconnected.
type offlineDialer struct {
	offline  atomic.Bool
	attempts atomic.Int32
}

func (d *offlineDialer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.attempts.Add(1)
	if d.offline.Load() {
		return nil, errors.New("test: network unreachable")
	}
	var nd net.Dialer
	return nd.DialContext(ctx, network, addr)
}

func TestOfflineQueueThenDelivery(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	d := &offlineDialer{}
	d.offline.Store(true)
	f, clk := startFake(t, b, func(c *hub.Config) { c.Dial = d.dial; c.QueueCapacity = 5 })
	st := f.status.wait(t, hub.DisconnectedRetrying, hub.NoNetwork)
	results := make(chan error, 5)
	for i := range 5 {
		if err := f.s.Enqueue(&hub.Message{MessageID: fmt.Sprint("q", i)}, func(err error) { results <- err }); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.s.Enqueue(&hub.Message{MessageID: "q5"}, nil); !errors.Is(err, hub.ErrQueueFull) {
		t.Fatalf("6th message: %v, want ErrQueueFull", err)
	}
	d.offline.Store(false)
	retry(t, clk, st)
	for range 5 {
		if err := <-results; err != nil {
			t.Fatal(err)
		}
	}
	if got := strings.Join(b.TelemetryMIDs(), ","); got != "q0,q1,q2,q3,q4" {
		t.Errorf("delivered %s", got)
	}
}

func TestInFlightResentAfterDrop(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	b.With(func(h *hubtest.Hook) { h.DropOnMID["m3"] = true })
	f, clk := startFake(t, b, func(c *hub.Config) { c.MaxInFlight = 1 })
	ctx := ctxT(t)
	sent := make(chan error, 1)
	go func() {
		for i := range 6 {
			if err := f.s.Send(ctx, &hub.Message{MessageID: fmt.Sprint("m", i)}); err != nil {
				sent <- fmt.Errorf("m%d: %w", i, err)
				return
			}
		}
		sent <- nil
	}()
	retry(t, clk, f.status.wait(t, hub.DisconnectedRetrying, hub.CommunicationError))
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(b.TelemetryMIDs(), ","); got != "m0,m1,m2,m3,m4,m5" {
		t.Errorf("delivered %s", got)
	}
	if n := len(b.ConnectRecords()); n != 2 {
		t.Errorf("connects = %d, want 2", n)
	}
}

func TestMessageExpiresWhileOffline(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	d := &offlineDialer{}
	d.offline.Store(true)
	f := start(t, b, func(c *hub.Config) { c.Dial = d.dial })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := f.s.Send(ctx, &hub.Message{MessageID: "late"})
	if err == nil {
		t.Fatal("sent while offline")
	}
	done := make(chan error, 1)
	if err := f.s.Enqueue(&hub.Message{MessageID: "exp", Deadline: time.Now().Add(100 * time.Millisecond)},
		func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, hub.ErrMessageExpired) {
		t.Fatalf("err = %v, want ErrMessageExpired", err)
	}
	waitFor(t, func() bool { return f.s.Stats().Queued == 0 }, "queue empty")
}

func TestCloseDrainsThenFailsTheRest(t *testing.T) {
	t.Parallel()
	t.Run("drains", func(t *testing.T) {
		b := hubtest.NewBroker(t)
		f := start(t, b, nil)
		if err := f.s.WaitConnected(ctxT(t)); err != nil {
			t.Fatal(err)
		}
		var failed atomic.Int32
		for i := range 20 {
			_ = f.s.Enqueue(&hub.Message{MessageID: fmt.Sprint("d", i)}, func(err error) {
				if err != nil {
					failed.Add(1)
				}
			})
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := f.s.Close(ctx); err != nil {
			t.Fatal(err)
		}
		if failed.Load() != 0 || len(b.TelemetryMIDs()) != 20 {
			t.Errorf("failed %d, delivered %d", failed.Load(), len(b.TelemetryMIDs()))
		}
		f.status.wait(t, hub.Disabled, hub.ClientClose)
		waitFor(t, func() bool {
			var n int
			b.With(func(h *hubtest.Hook) { n = h.CleanDisconnect })
			return n == 1
		}, "MQTT DISCONNECT seen by the broker")
		if err := f.s.Enqueue(&hub.Message{}, nil); !errors.Is(err, hub.ErrClosed) {
			t.Errorf("Enqueue after Close: %v", err)
		}
	})
	t.Run("fails the rest", func(t *testing.T) {
		b := hubtest.NewBroker(t)
		d := &offlineDialer{}
		d.offline.Store(true)
		f := start(t, b, func(c *hub.Config) { c.Dial = d.dial })
		var errs []error
		var mu sync.Mutex
		for i := range 3 {
			_ = f.s.Enqueue(&hub.Message{MessageID: fmt.Sprint("x", i)}, func(err error) {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			})
		}
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		if err := f.s.Close(ctx); !errors.Is(err, hub.ErrClosed) {
			t.Fatalf("Close: %v, want ErrClosed", err)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(errs) != 3 {
			t.Fatalf("%d callbacks, want 3", len(errs))
		}
		for _, err := range errs {
			if !errors.Is(err, hub.ErrClosed) || !strings.Contains(err.Error(), "shutdown deadline") {
				t.Errorf("reason %v", err)
			}
		}
	})
}

func TestCloudToDevice(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	got := make(chan *hub.C2DMessage, 1)
	f := start(t, b, func(c *hub.Config) {
		c.OnC2D = func(_ context.Context, m *hub.C2DMessage) { got <- m }
	})
	if err := f.s.WaitConnected(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	topic := "devices/dev1/messages/devicebound/%24.mid=m-1&%24.cid=c-1&%24.ct=text%2Fplain&%24.ce=utf-8" +
		"&%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound&%24.exp=2030-01-02T03%3A04%3A05Z&iothub-ack=full&color=red&flag"
	b.Publish(topic, []byte("hello"), 1)
	var m *hub.C2DMessage
	select {
	case m = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("no C2D message")
	}
	if string(m.Body) != "hello" || m.MessageID != "m-1" || m.CorrelationID != "c-1" || m.ContentType != "text/plain" ||
		m.ContentEncoding != "utf-8" || m.To != "/devices/dev1/messages/deviceBound" ||
		!m.Expiry.Equal(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)) {
		t.Errorf("message %+v", m)
	}
	want := wire.Properties{{Key: "iothub-ack", Value: "full"}, {Key: "color", Value: "red"}, {Key: "flag", Null: true}}
	if fmt.Sprint(m.Properties) != fmt.Sprint(want) {
		t.Errorf("properties %v, want %v", m.Properties, want)
	}
}

func TestDesiredAndMethods(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	desired := make(chan *hub.DesiredPatch, 1)
	methods := make(chan *hub.MethodRequest, 4)
	f, clk := startFake(t, b, func(c *hub.Config) {
		c.OnDesired = func(_ context.Context, p *hub.DesiredPatch) { desired <- p }
		c.OnMethod = func(_ context.Context, r *hub.MethodRequest) { methods <- r }
	})
	ctx := ctxT(t)
	if err := f.s.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	b.Publish(wire.TwinDesired(5), []byte(`{"x":1,"$version":5}`), 0)
	if p := <-desired; p.Version != 5 || string(p.Body) != `{"x":1,"$version":5}` {
		t.Errorf("desired %+v", p)
	}
	b.Publish(wire.MethodRequest("reboot", "a1"), []byte(`{"delay":1}`), 0)
	r := <-methods
	if r.Name != "reboot" || r.RequestID != "a1" || string(r.Payload) != `{"delay":1}` {
		t.Errorf("method %+v", r)
	}
	if err := f.s.RespondMethod(ctx, "a1", 200, []byte(`{"ok":true}`)); err != nil {
		t.Fatal(err)
	}
	b.WaitEvent(t, "method-response")
	if err := f.s.RespondMethod(ctx, "a1", 200, nil); !errors.Is(err, hub.ErrStaleRequest) {
		t.Errorf("second response: %v, want ErrStaleRequest", err)
	}
	// A request from a connection that has since dropped is never answered.
	b.Publish(wire.MethodRequest("reboot", "a2"), nil, 0)
	<-methods
	b.Drop("dev1")
	retry(t, clk, f.status.wait(t, hub.DisconnectedRetrying, hub.CommunicationError))
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	if err := f.s.RespondMethod(ctx, "a2", 200, nil); !errors.Is(err, hub.ErrStaleRequest) {
		t.Errorf("response on a later connection: %v, want ErrStaleRequest", err)
	}
	b.With(func(h *hubtest.Hook) {
		if len(h.MethodResponses) != 1 || h.MethodResponses[0].RequestID != "a1" || h.MethodResponses[0].Status != 200 {
			t.Errorf("method responses %+v", h.MethodResponses)
		}
	})
}

func TestStatusSequence(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	f, clk := startFake(t, b, nil)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	b.Drop("dev1")
	retry(t, clk, f.status.wait(t, hub.DisconnectedRetrying, hub.CommunicationError))
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := f.s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(f.status.snapshot(), " ")
	want := "Connected/Connection_Ok Disconnected_Retrying/Communication_Error Connected/Connection_Ok Disabled/Client_Close"
	if got != want {
		t.Errorf("statuses\n got %s\nwant %s", got, want)
	}
}

func TestX509ClientCertificate(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	ca, caKey := hubtest.NewCA(t, "device CA")
	cert := hubtest.NewClientCert(t, ca, caKey, "dev1")
	f := start(t, b, func(c *hub.Config) { c.Signer, c.Certificate = nil, &cert })
	if err := f.s.WaitConnected(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	r := b.ConnectRecords()[0]
	if r.Password != "" || r.Username != "hub.test/dev1/?api-version=2021-04-12" {
		t.Errorf("X.509 connect: username %q, password set %v", r.Username, r.Password != "")
	}
	// No SAS token, so no planned renewals: the only status so far is Connected.
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
}

func TestCloseDuringHangingConnect(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	dialing := make(chan struct{}, 1)
	f := start(t, b, func(c *hub.Config) {
		c.Dial = func(ctx context.Context, _, _ string) (net.Conn, error) {
			dialing <- struct{}{}
			<-ctx.Done() // a network that never answers
			return nil, ctx.Err()
		}
	})
	<-dialing
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := f.s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if ctx.Err() != nil {
		t.Error("Close with an empty queue waited for its deadline instead of abandoning the connect")
	}
	f.status.wait(t, hub.Disabled, hub.ClientClose)
}

func TestConfigValidation(t *testing.T) {
	t.Parallel()
	key := sas.Key("k")
	for name, cfg := range map[string]hub.Config{
		"no host":          {DeviceID: "d", Signer: key},
		"no device":        {Host: "h", Signer: key},
		"no credential":    {Host: "h", DeviceID: "d"},
		"renew too late":   {Host: "h", DeviceID: "d", Signer: key, RenewAt: 0.9},
		"backoff under 1s": {Host: "h", DeviceID: "d", Signer: key, BackoffMin: 500 * time.Millisecond},
		"bad address":      {Host: "h", DeviceID: "d", Signer: key, Address: "nohostport"},
		"missing CA file":  {Host: "h", DeviceID: "d", Signer: key, CAFile: "/nonexistent/ca.pem"},
	} {
		if _, err := hub.New(cfg); !errors.Is(err, hub.ErrConfig) {
			t.Errorf("%s: err = %v, want ErrConfig", name, err)
		}
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	waitfor.True(t, what, cond)
}
