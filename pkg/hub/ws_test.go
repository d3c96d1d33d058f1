package hub_test

import (
	"context"
	"errors"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/iothubby/iothubby/internal/connectproxy"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
)

// wsHost is hubsim's host name in these tests. Nothing resolves it but the test's dialer and
// proxy, so a connection that reaches hubsim went the way the test intended.
const wsHost = "hubsim.test"

type wsFixture struct {
	srv    *hubsim.Server
	dev    registry.Device
	port   string
	target string // wsHost:port, the address sessions dial

	mu     sync.Mutex
	dialed []string
}

func newWSFixture(t *testing.T) *wsFixture {
	t.Helper()
	srv, err := hubsim.Start(context.Background(), hubsim.Config{
		StateDir: t.TempDir(), HostName: wsHost, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0",
	}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	dev, err := srv.Registry().Create(registry.Device{DeviceID: "dev-ws"})
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(srv.Endpoints().HTTPSAddress)
	return &wsFixture{srv: srv, dev: dev, port: port, target: net.JoinHostPort(wsHost, port)}
}

// resolve maps wsHost to 127.0.0.1 (for the session's dialer and the proxy).
func (f *wsFixture) resolve(addr string) string {
	h, p, _ := net.SplitHostPort(addr)
	if h == wsHost {
		return net.JoinHostPort("127.0.0.1", p)
	}
	return addr
}

func (f *wsFixture) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	f.mu.Lock()
	f.dialed = append(f.dialed, addr)
	f.mu.Unlock()
	var d net.Dialer
	return d.DialContext(ctx, network, f.resolve(addr))
}

func (f *wsFixture) dialedAddrs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.dialed...)
}

func (f *wsFixture) config(t *testing.T) hub.Config {
	key, err := sas.ParseKey(f.dev.Authentication.SymmetricKey.PrimaryKey)
	if err != nil {
		t.Fatal(err)
	}
	return hub.Config{
		Host: wsHost, Address: f.target, DeviceID: f.dev.DeviceID, Signer: key,
		RootCAs: f.srv.CA().Pool(), Transport: hub.TransportMQTTWS, Dial: f.dial,
		OperationTimeout: 10 * time.Second, RetryTimeout: 15 * time.Second, LeanMQTT: *lean,
	}
}

// sendOne connects a session with cfg, sends one message and closes.
func sendOne(t *testing.T, cfg hub.Config, body string) error {
	t.Helper()
	s, err := hub.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Close(ctx)
	}()
	return s.Send(ctxT(t), &hub.Message{Body: []byte(body)})
}

func (f *wsFixture) bodies(t *testing.T) []string {
	t.Helper()
	msgs, err := f.srv.Broker().Telemetry(f.dev.DeviceID)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range msgs {
		out = append(out, string(m.Body))
	}
	return out
}

func TestMQTTOverWebSocket(t *testing.T) {
	f := newWSFixture(t)
	cfg := f.config(t)
	cfg.Proxy = func(*url.URL) (*url.URL, error) { return nil, nil }
	if err := sendOne(t, cfg, "direct"); err != nil {
		t.Fatal(err)
	}
	if got := f.bodies(t); len(got) != 1 || got[0] != "direct" {
		t.Fatalf("telemetry %q", got)
	}
	if d := f.dialedAddrs(); len(d) != 1 || d[0] != f.target {
		t.Fatalf("dialed %v, want only %s (the HTTPS port)", d, f.target)
	}
	if c, err := hub.Validate(hub.Config{Host: "h.example", DeviceID: "d", Signer: sas.Key("k"), Transport: hub.TransportMQTTWS}); err != nil || c.Address != "h.example:443" {
		t.Fatalf("default mqtt-ws address %q, %v; want port 443", c.Address, err)
	}
	if _, err := hub.Validate(hub.Config{Host: "h", DeviceID: "d", Signer: sas.Key("k"), Transport: "amqp"}); !errors.Is(err, hub.ErrConfig) || !strings.Contains(err.Error(), "Transport") {
		t.Fatalf("unknown transport: %v", err)
	}
}

func TestMQTTOverWebSocketThroughProxy(t *testing.T) {
	f := newWSFixture(t)
	px, err := connectproxy.Start(connectproxy.Config{Resolve: f.resolve, User: "u", Password: "p w"})
	if err != nil {
		t.Fatal(err)
	}
	defer px.Close()

	// HTTPS_PROXY from the environment (ProxyFromEnvironment, the default).
	t.Setenv("HTTPS_PROXY", px.URL("u", "p%20w"))
	t.Setenv("NO_PROXY", "")
	t.Setenv("https_proxy", "")
	t.Setenv("no_proxy", "")
	cfg := f.config(t)
	if err := sendOne(t, cfg, "via proxy"); err != nil {
		t.Fatal(err)
	}
	if got := px.Targets(); len(got) != 1 || got[0] != f.target {
		t.Fatalf("proxy tunnels %v, want one to %s", got, f.target)
	}
	if d := f.dialedAddrs(); len(d) != 1 || d[0] != px.Addr() {
		t.Fatalf("dialed %v, want only the proxy %s", d, px.Addr())
	}

	// NO_PROXY names the hub: direct.
	t.Setenv("NO_PROXY", "example.com,"+wsHost)
	if err := sendOne(t, f.config(t), "no proxy"); err != nil {
		t.Fatal(err)
	}
	if got := px.Targets(); len(got) != 1 {
		t.Fatalf("NO_PROXY ignored: tunnels %v", got)
	}
	if d := f.dialedAddrs(); d[len(d)-1] != f.target {
		t.Fatalf("NO_PROXY: last dial %v, want %s", d, f.target)
	}
	if got := f.bodies(t); len(got) != 2 || got[0] != "via proxy" || got[1] != "no proxy" {
		t.Fatalf("telemetry %q", got)
	}

	// Wrong credentials: 407, and the error says so.
	t.Setenv("NO_PROXY", "")
	t.Setenv("HTTPS_PROXY", px.URL("u", "wrong"))
	cfg = f.config(t)
	cfg.RetryTimeout = 2 * time.Second
	// The retries until RetryTimeout run on a fake clock: a goroutine moves it to each retry.
	clk := clock.NewFake(time.Now())
	cfg.Clock = clk
	ctx, cancel := context.WithCancel(context.Background())
	advanced := make(chan struct{})
	go func() {
		defer close(advanced)
		for clk.WaitArmed(ctx, 1) == nil {
			clk.AdvanceToNext()
		}
	}()
	err = sendOne(t, cfg, "refused")
	cancel()
	<-advanced
	if err == nil || !strings.Contains(err.Error(), "407") {
		t.Fatalf("wrong proxy credentials: %v, want a 407 error", err)
	}
	if px.Refused() == 0 {
		t.Fatal("proxy refused nothing")
	}
}
