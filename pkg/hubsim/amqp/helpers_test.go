package amqp_test

import (
	"context"
	"crypto/tls"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	goamqp "github.com/Azure/go-amqp"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/iothubby/iothubby/pkg/clock"
	hubamqp "github.com/iothubby/iothubby/pkg/hubsim/amqp"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// waitTimeout bounds every wait; it is a deadline, not a timing assertion.
const waitTimeout = 20 * time.Second

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

// recordingC2D stands in for the broker in the endpoint's own tests (the broker path is tested
// end to end in c2d_test.go).
type recordingC2D struct {
	mu   sync.Mutex
	msgs []broker.C2DMessage
	err  error
}

func (r *recordingC2D) SendC2D(id string, m broker.C2DMessage) (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err != nil {
		return "", r.err
	}
	r.msgs = append(r.msgs, m)
	return m.MessageID, nil
}

// eventLog records endpoint events and lets a test wait for one.
type eventLog struct {
	mu      sync.Mutex
	list    []hubamqp.Event
	changed chan struct{}
}

func (e *eventLog) add(ev hubamqp.Event) {
	e.mu.Lock()
	e.list = append(e.list, ev)
	close(e.changed)
	e.changed = make(chan struct{})
	e.mu.Unlock()
}

func (e *eventLog) wait(t *testing.T, what string, pred func(hubamqp.Event) bool) hubamqp.Event {
	t.Helper()
	deadline := time.After(waitTimeout)
	for {
		e.mu.Lock()
		for _, ev := range e.list {
			if pred(ev) {
				e.mu.Unlock()
				return ev
			}
		}
		ch := e.changed
		e.mu.Unlock()
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("no %s event within %s; have %+v", what, waitTimeout, e.list)
		}
	}
}

type env struct {
	t     *testing.T
	srv   *hubamqp.Server
	reg   *registry.Registry
	c2d   *recordingC2D
	clock *clock.Fake
	ev    *eventLog
	tls   *tls.Config
}

// newEnv starts the endpoint alone on a free port, with a registry, a fake clock and a
// recording C2D sink.
func newEnv(t *testing.T, mutate ...func(*hubamqp.Config)) *env {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pki.LoadOrCreateServer(dir, ca, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	reg, err := registry.Open(filepath.Join(dir, "reg.db"), zaptest.NewLogger(t), registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, reg: reg, c2d: &recordingC2D{}, clock: clock.NewFake(time.Now()), ev: &eventLog{changed: make(chan struct{})},
		tls: &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost", MinVersion: tls.VersionTLS12}}
	cfg := hubamqp.Config{
		Addr: "127.0.0.1:0", TLS: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		HostName: "localhost", Policies: reg, C2D: e.c2d, Clock: e.clock, OnEvent: e.ev.add,
	}
	for _, m := range mutate {
		m(&cfg)
	}
	e.srv, err = hubamqp.Start(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = e.srv.Close()
		_ = reg.Close()
	})
	return e
}

func (e *env) dial(opts *goamqp.ConnOptions) *goamqp.Conn {
	e.t.Helper()
	if opts == nil {
		opts = &goamqp.ConnOptions{}
	}
	opts.TLSConfig = e.tls
	c, err := goamqp.Dial(ctxT(e.t), "amqps://"+e.srv.Addr().String(), opts)
	if err != nil {
		e.t.Fatalf("dial: %v", err)
	}
	e.t.Cleanup(func() { _ = c.Close() })
	return c
}

func (e *env) session(c *goamqp.Conn) *goamqp.Session {
	e.t.Helper()
	s, err := c.NewSession(ctxT(e.t), nil)
	if err != nil {
		e.t.Fatalf("session: %v", err)
	}
	return s
}

// serviceToken signs a hub-scoped token with a policy's primary key, as azure-iothub does.
func serviceToken(t *testing.T, reg *registry.Registry, host, policy string, expiry time.Time) string {
	t.Helper()
	p, ok := reg.Policy(policy)
	if !ok {
		t.Fatalf("no policy %s", policy)
	}
	k, _ := sas.ParseKey(p.PrimaryKey)
	tok, err := sas.Build(context.Background(), k, sas.Params{Resource: host, KeyName: policy, Expiry: expiry, RawResource: true})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// cbs is azure-iothub's $cbs pair: a sender and a receiver on the same session.
type cbs struct {
	snd *goamqp.Sender
	rcv *goamqp.Receiver
	n   int
}

func newCBS(t *testing.T, s *goamqp.Session) *cbs {
	t.Helper()
	snd, err := s.NewSender(ctxT(t), "$cbs", nil)
	if err != nil {
		t.Fatalf("$cbs sender: %v", err)
	}
	rcv, err := s.NewReceiver(ctxT(t), "$cbs", &goamqp.ReceiverOptions{Credit: 10})
	if err != nil {
		t.Fatalf("$cbs receiver: %v", err)
	}
	return &cbs{snd: snd, rcv: rcv}
}

// put sends put-token and returns the reply's status code and description.
func (c *cbs) put(t *testing.T, audience, token string) (int32, string) {
	t.Helper()
	c.n++
	id := "req-" + string(rune('a'+c.n))
	replyTo := "cbs"
	err := c.snd.Send(ctxT(t), &goamqp.Message{
		Properties: &goamqp.MessageProperties{MessageID: id, ReplyTo: &replyTo},
		ApplicationProperties: map[string]any{
			"operation": "put-token", "type": "servicebus.windows.net:sastoken", "name": audience,
		},
		Value: token,
	}, nil)
	if err != nil {
		t.Fatalf("put-token send: %v", err)
	}
	m, err := c.rcv.Receive(ctxT(t), nil)
	if err != nil {
		t.Fatalf("put-token reply: %v", err)
	}
	_ = c.rcv.AcceptMessage(ctxT(t), m)
	if m.Properties == nil || m.Properties.CorrelationID != id {
		t.Fatalf("reply correlation-id %+v, want %q (same type as the message-id)", m.Properties, id)
	}
	code, ok := m.ApplicationProperties["status-code"].(int32)
	if !ok {
		t.Fatalf("status-code is %T, want an AMQP int", m.ApplicationProperties["status-code"])
	}
	desc, _ := m.ApplicationProperties["status-description"].(string)
	return code, desc
}

// linkErr returns the AMQP error a refused or detached link carries.
func linkErr(t *testing.T, err error) *goamqp.Error {
	t.Helper()
	var le *goamqp.LinkError
	if errors.As(err, &le) && le.RemoteErr != nil {
		return le.RemoteErr
	}
	var ae *goamqp.Error // a refused attach
	if errors.As(err, &ae) {
		return ae
	}
	t.Fatalf("error %v (%T) is not a link error from the server", err, err)
	return nil
}
