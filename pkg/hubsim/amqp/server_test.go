package amqp_test

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	goamqp "github.com/Azure/go-amqp"

	"github.com/iothubby/iothubby/internal/waitfor"
	codec "github.com/iothubby/iothubby/pkg/amqp"
	hubamqp "github.com/iothubby/iothubby/pkg/hubsim/amqp"
	"github.com/iothubby/iothubby/pkg/wire"
)

func c2dMessage(to string) *goamqp.Message {
	return &goamqp.Message{Properties: &goamqp.MessageProperties{MessageID: "m1", To: &to}, Data: [][]byte{[]byte("hi")}}
}

// TestCBSRefusedAndAccepted: like azure-iothub (no SASL), links to the C2D node are refused
// without a put-token for the hub, with a bad one, or with one whose policy lacks
// ServiceConnect; a valid one lets the link attach; refusals keep the connection.
func TestCBSRefusedAndAccepted(t *testing.T) {
	e := newEnv(t)
	c := e.dial(nil)
	s := e.session(c)
	ctx := ctxT(t)

	_, err := s.NewSender(ctx, "/messages/devicebound", nil)
	if le := linkErr(t, err); le.Condition != "amqp:unauthorized-access" || !strings.Contains(le.Description, "$cbs") {
		t.Fatalf("no token: %+v", le)
	}
	cb := newCBS(t, s)
	for _, c := range []struct {
		name, audience, token, want string
	}{
		{"bad signature", "localhost", "SharedAccessSignature sr=localhost&sig=AAAA&se=99999999999&skn=iothubowner", "signature does not match"},
		{"expired", "localhost", serviceToken(t, e.reg, "localhost", "iothubowner", e.clock.Now().Add(-time.Minute)), "expired"},
		{"other hub", "otherhub.azure-devices.net", serviceToken(t, e.reg, "otherhub.azure-devices.net", "iothubowner", e.clock.Now().Add(time.Hour)), "no token is accepted"},
		{"resource not the hub", "localhost", serviceToken(t, e.reg, "elsewhere", "iothubowner", e.clock.Now().Add(time.Hour)), "is not this hub"},
		{"unknown policy", "localhost", strings.Replace(serviceToken(t, e.reg, "localhost", "iothubowner", e.clock.Now().Add(time.Hour)), "skn=iothubowner", "skn=nobody", 1), "unknown shared access policy"},
		{"not a token", "localhost", "hello", "malformed token"},
	} {
		code, desc := cb.put(t, c.audience, c.token)
		if code != 401 || !strings.Contains(desc, c.want) {
			t.Errorf("%s: put-token %d %q, want 401 with %q", c.name, code, desc, c.want)
		}
	}
	_, err = s.NewSender(ctx, "/messages/devicebound", nil)
	if le := linkErr(t, err); le.Condition != "amqp:unauthorized-access" {
		t.Fatalf("after refused tokens: %+v", le)
	}

	// a valid token of a policy without ServiceConnect
	if code, desc := cb.put(t, "localhost", serviceToken(t, e.reg, "localhost", "registryRead", e.clock.Now().Add(time.Hour))); code != 200 {
		t.Fatalf("registryRead put-token %d %s", code, desc)
	}
	_, err = s.NewSender(ctx, "/messages/devicebound", nil)
	if le := linkErr(t, err); le.Condition != "amqp:unauthorized-access" || !strings.Contains(le.Description, "ServiceConnect") {
		t.Fatalf("registryRead: %+v", le)
	}

	// the audience as azure-iothub sends it: HostName verbatim, with the port
	if code, desc := cb.put(t, "localhost:5671", serviceToken(t, e.reg, "localhost:5671", "service", e.clock.Now().Add(time.Hour))); code != 200 || desc != "OK" {
		t.Fatalf("put-token %d %s", code, desc)
	}
	snd, err := s.NewSender(ctx, "amqps://localhost:5671/messages/deviceBound", nil)
	if err != nil {
		t.Fatalf("sender after put-token: %v", err)
	}
	if err := snd.Send(ctx, c2dMessage("/devices/dev%201/messages/devicebound"), nil); err != nil {
		t.Fatalf("send: %v", err)
	}
	e.c2d.mu.Lock()
	got := e.c2d.msgs
	e.c2d.mu.Unlock()
	if len(got) != 1 || got[0].MessageID != "m1" || string(got[0].Body) != "hi" {
		t.Fatalf("queued %+v", got)
	}

	// a rejected message and an unknown address leave the link and connection usable
	e.c2d.mu.Lock()
	e.c2d.err = wire.ErrDeviceNotFound.WithText("Device nobody not registered")
	e.c2d.mu.Unlock()
	var ae *goamqp.Error
	if err := snd.Send(ctx, c2dMessage("/devices/nobody/messages/devicebound"), nil); !errors.As(err, &ae) || ae.Condition != "amqp:not-found" {
		t.Fatalf("unknown device: %v", err)
	}
	if err := snd.Send(ctx, c2dMessage("/devices/x/messages/events"), nil); !errors.As(err, &ae) || ae.Condition != "com.microsoft:argument-error" {
		t.Fatalf("bad to: %v", err)
	}
	_, err = s.NewReceiver(ctx, "/no/such/node", nil)
	if le := linkErr(t, err); le.Condition != "amqp:not-found" {
		t.Fatalf("unknown address: %+v", le)
	}
	e.c2d.mu.Lock()
	e.c2d.err = nil
	e.c2d.mu.Unlock()
	if err := snd.Send(ctx, c2dMessage("/devices/dev1/messages/devicebound"), nil); err != nil {
		t.Fatalf("send after refusals: %v", err)
	}
}

// TestTokenExpiryAndRenewal: a link lives as long as some token for it is valid; renewal
// (another put-token for the same audience) extends it, expiry detaches it.
func TestTokenExpiryAndRenewal(t *testing.T) {
	e := newEnv(t)
	s := e.session(e.dial(nil))
	ctx := ctxT(t)
	cb := newCBS(t, s)
	t0 := e.clock.Now()
	if code, _ := cb.put(t, "localhost", serviceToken(t, e.reg, "localhost", "service", t0.Add(time.Hour))); code != 200 {
		t.Fatal(code)
	}
	snd, err := s.NewSender(ctx, "/messages/devicebound", nil)
	if err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(30 * time.Minute)
	if code, _ := cb.put(t, "localhost", serviceToken(t, e.reg, "localhost", "service", t0.Add(2*time.Hour))); code != 200 {
		t.Fatal(code)
	}
	e.clock.Advance(time.Hour) // past the first token, within the renewed one
	if err := snd.Send(ctx, c2dMessage("/devices/d/messages/devicebound"), nil); err != nil {
		t.Fatalf("send with the renewed token: %v", err)
	}
	e.clock.Advance(time.Hour) // past both
	err = snd.Send(ctx, c2dMessage("/devices/d/messages/devicebound"), nil)
	if le := linkErr(t, err); le.Condition != "amqp:unauthorized-access" || !strings.Contains(le.Description, "expired") {
		t.Fatalf("after expiry: %+v", le)
	}
	e.ev.wait(t, "detached", func(ev hubamqp.Event) bool { return ev.Kind == "detached" && strings.Contains(ev.Reason, "expired") })
}

// TestSASLPlainAndAnonymous: the C service SDK's PLAIN (policy@sas.root.hub with a token as the
// password) authorises the connection without $cbs; a wrong password fails SASL; ANONYMOUS is
// offered (Event Hubs clients).
func TestSASLPlainAndAnonymous(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t)
	tok := serviceToken(t, e.reg, "localhost", "service", e.clock.Now().Add(time.Hour))
	c := e.dial(&goamqp.ConnOptions{SASLType: goamqp.SASLTypePlain("service@sas.root.localhost", tok)})
	if _, err := e.session(c).NewSender(ctx, "/messages/devicebound", nil); err != nil {
		t.Fatalf("PLAIN: %v", err)
	}
	_, err := goamqp.Dial(ctx, "amqps://"+e.srv.Addr().String(), &goamqp.ConnOptions{TLSConfig: e.tls,
		SASLType: goamqp.SASLTypePlain("service@sas.root.localhost", tok+"x")})
	if err == nil {
		t.Fatal("PLAIN with a bad token connected")
	}
	a := e.dial(&goamqp.ConnOptions{SASLType: goamqp.SASLTypeAnonymous()})
	cb := newCBS(t, e.session(a))
	if code, _ := cb.put(t, "localhost", tok); code != 200 {
		t.Fatal(code)
	}
}

// streamNode registers test/stream: each attached receiver link is handed to the test.
func streamNode(e *env) chan *hubamqp.Link {
	links := make(chan *hubamqp.Link, 4)
	e.srv.Handle("test/stream", func(l *hubamqp.Link) error {
		links <- l
		return nil
	})
	return links
}

// TestFlowControl: the server sends no more than the client's credit (a receiver with credit 1
// gets one message; the rest wait until more credit comes), and drain takes unused credit back.
func TestFlowControl(t *testing.T) {
	e := newEnv(t)
	links := streamNode(e)
	ctx := ctxT(t)
	rcv, err := e.session(e.dial(nil)).NewReceiver(ctx, "test/stream", &goamqp.ReceiverOptions{Credit: -1})
	if err != nil {
		t.Fatal(err)
	}
	l := <-links
	outcomes := make(chan codec.DeliveryState, 3)
	for i := range 3 {
		m := &codec.Message{Value: int32(i), HasValue: true}
		if err := l.Post(m, nil, func(st codec.DeliveryState, err error) { outcomes <- st }); err != nil {
			t.Fatal(err)
		}
	}
	if err := rcv.IssueCredit(1); err != nil {
		t.Fatal(err)
	}
	m, err := rcv.Receive(ctx, nil)
	if err != nil || m.Value != int32(0) {
		t.Fatalf("first: %v %v", m, err)
	}
	// the credit is used up and two messages wait on the server
	waitFor(t, "credit used", func() bool { c, n := l.SendCredit(); return c == 0 && n == 2 })
	if p := rcv.Prefetched(); p != nil {
		t.Fatalf("a message beyond the credit arrived: %v", p.Value)
	}
	if err := rcv.AcceptMessage(ctx, m); err != nil {
		t.Fatal(err)
	}
	if st := <-outcomes; st == nil {
		t.Fatal("no outcome for the first message")
	} else if _, ok := st.(*codec.Accepted); !ok {
		t.Fatalf("first outcome %T", st)
	}
	if err := rcv.IssueCredit(5); err != nil {
		t.Fatal(err)
	}
	for want := int32(1); want <= 2; want++ {
		m, err := rcv.Receive(ctx, nil)
		if err != nil || m.Value != want {
			t.Fatalf("message %d: %v %v", want, m, err)
		}
		if err := rcv.RejectMessage(ctx, m, &goamqp.Error{Condition: "test:nope"}); err != nil {
			t.Fatal(err)
		}
		if st, ok := (<-outcomes).(*codec.Rejected); !ok || st.Error.Condition != "test:nope" {
			t.Fatalf("outcome %+v", st)
		}
	}
	// drain: the 3 unused credits come back
	if err := rcv.DrainCredit(ctx, nil); err != nil {
		t.Fatalf("drain: %v", err)
	}
	if c, n := l.SendCredit(); c != 0 || n != 0 {
		t.Fatalf("after drain: credit %d, waiting %d", c, n)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitfor.True(t, what, cond)
}

// raw is a hand-driven AMQP client for what go-amqp will not send.
type raw struct {
	t  *testing.T
	nc net.Conn
	br *bufio.Reader
}

func (e *env) raw() *raw {
	e.t.Helper()
	r := e.rawOpen(0)
	r.send(0, &codec.Begin{NextOutgoingID: 0, IncomingWindow: 100, OutgoingWindow: 100, HandleMax: 9})
	if _, ok := r.read().(*codec.Begin); !ok {
		e.t.Fatal("no begin")
	}
	return r
}

// rawOpen connects and exchanges open (asking for idle milliseconds of idle time-out).
func (e *env) rawOpen(idle uint32) *raw {
	e.t.Helper()
	nc, err := tls.Dial("tcp", e.srv.Addr().String(), e.tls)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = nc.Close() })
	_ = nc.SetDeadline(time.Now().Add(waitTimeout))
	r := &raw{t: e.t, nc: nc, br: bufio.NewReader(nc)}
	r.write(codec.HeaderAMQP[:])
	var h [8]byte
	if _, err := io.ReadFull(r.br, h[:]); err != nil || h != codec.HeaderAMQP {
		e.t.Fatalf("protocol header % x %v", h, err)
	}
	r.send(0, &codec.Open{ContainerID: "raw", MaxFrameSize: 65536, ChannelMax: 9, IdleTimeout: idle})
	if _, ok := r.read().(*codec.Open); !ok {
		e.t.Fatal("no open")
	}
	return r
}

func (r *raw) write(b []byte) {
	if _, err := r.nc.Write(b); err != nil {
		r.t.Fatal(err)
	}
}

func (r *raw) send(ch uint16, p codec.Performative, payload ...byte) {
	b, err := codec.AppendPerformativeFrame(nil, codec.FrameAMQP, ch, p, payload)
	if err != nil {
		r.t.Fatal(err)
	}
	r.write(b)
}

// read returns the next performative (skipping heartbeats); nil at end of stream.
func (r *raw) read() codec.Performative {
	for {
		var h [8]byte
		if _, err := io.ReadFull(r.br, h[:]); err != nil {
			return nil
		}
		body := make([]byte, binary.BigEndian.Uint32(h[:4])-8)
		if _, err := io.ReadFull(r.br, body); err != nil {
			return nil
		}
		if len(body) == 0 {
			continue
		}
		p, _, err := codec.DecodeFrameBody(body)
		if err != nil {
			r.t.Fatalf("server sent a bad frame: %v", err)
		}
		return p
	}
}

// TestMalformedFrameClosesOnlyThatConnection: a frame that does not decode, or a bad frame
// header, closes that connection with an AMQP error; another connection carries on.
func TestMalformedFrameClosesOnlyThatConnection(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t)
	s := e.session(e.dial(nil))
	cb := newCBS(t, s)
	if code, _ := cb.put(t, "localhost", serviceToken(t, e.reg, "localhost", "service", e.clock.Now().Add(time.Hour))); code != 200 {
		t.Fatal(code)
	}
	snd, err := s.NewSender(ctx, "/messages/devicebound", nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		frame []byte
		cond  codec.Symbol
	}{
		{"unknown performative", codec.AppendFrame(nil, codec.FrameAMQP, 0, []byte{0x00, 0x53, 0x99, 0x45}), codec.ErrDecodeError},
		{"truncated list", codec.AppendFrame(nil, codec.FrameAMQP, 0, []byte{0x00, 0x53, 0x12, 0xc0, 0x30, 0x02}), codec.ErrDecodeError},
		{"frame size below header", []byte{0, 0, 0, 4, 2, 0, 0, 0}, codec.ErrFramingError},
		{"frame over max-frame-size", []byte{0x7f, 0, 0, 0, 2, 0, 0, 0}, codec.ErrFramingError},
		{"flow on a channel without session", codec.AppendFrame(nil, codec.FrameAMQP, 7, []byte{0x00, 0x53, 0x13, 0xc0, 0x05, 0x04, 0x43, 0x43, 0x43, 0x43}), codec.ErrIllegalState},
	} {
		r := e.raw()
		r.write(c.frame)
		cl, ok := r.read().(*codec.Close)
		if !ok || cl.Error == nil || cl.Error.Condition != c.cond {
			t.Fatalf("%s: got %+v, want close with %s", c.name, cl, c.cond)
		}
		if p := r.read(); p != nil {
			t.Fatalf("%s: %T after close", c.name, p)
		}
		e.ev.wait(t, "closed "+c.name, func(ev hubamqp.Event) bool {
			return ev.Kind == "closed" && strings.Contains(ev.Reason, string(c.cond))
		})
	}
	if err := snd.Send(ctx, c2dMessage("/devices/d/messages/devicebound"), nil); err != nil {
		t.Fatalf("the other connection: %v", err)
	}
}

// TestTransferBeyondCreditDetaches: a client sending without credit loses the link (amqp:link:
// transfer-limit-exceeded), not the connection; an oversize message likewise.
func TestTransferBeyondCreditDetaches(t *testing.T) {
	e := newEnv(t)
	held := make(chan *hubamqp.Delivery, 4)
	e.srv.Handle("test/sink", func(l *hubamqp.Link) error {
		l.Credit = 1
		l.OnMessage = func(d *hubamqp.Delivery) { held <- d }
		return nil
	})
	r := e.raw()
	zero := uint32(0)
	r.send(0, &codec.Attach{Name: "s", Handle: 0, Role: codec.RoleSender, Target: &codec.Target{Address: "test/sink"}, InitialDeliveryCount: &zero})
	if a, ok := r.read().(*codec.Attach); !ok || a.Target == nil {
		t.Fatalf("attach reply %+v", a)
	}
	if f, ok := r.read().(*codec.Flow); !ok || f.LinkCredit == nil || *f.LinkCredit != 1 {
		t.Fatalf("flow %+v", f)
	}
	msg, _ := (&codec.Message{Data: [][]byte{[]byte("x")}}).MarshalBinary()
	for id := range uint32(2) {
		r.send(0, &codec.Transfer{Handle: 0, DeliveryID: &id, DeliveryTag: []byte{byte(id)}}, msg...)
	}
	d, ok := r.read().(*codec.Detach)
	if !ok || d.Error == nil || d.Error.Condition != codec.ErrTransferLimit {
		t.Fatalf("got %+v, want detach with transfer-limit-exceeded", d)
	}
	(<-held).Accept() // settling after the detach sends nothing
	// the connection carries on: a new link, a message over the 1 MiB limit
	r.send(0, &codec.Detach{Handle: 0, Closed: true})
	r.send(0, &codec.Attach{Name: "s2", Handle: 1, Role: codec.RoleSender, Target: &codec.Target{Address: "test/sink"}, InitialDeliveryCount: &zero})
	r.read() // attach
	r.read() // flow
	big := make([]byte, 40000)
	id := uint32(2)
	for i := range 30 {
		t := &codec.Transfer{Handle: 1, More: true}
		if i == 0 {
			t.DeliveryID, t.DeliveryTag = &id, []byte{2}
		}
		r.send(0, t, big...)
	}
	if d, ok := r.read().(*codec.Detach); !ok || d.Error == nil || d.Error.Condition != codec.ErrMessageSizeExceeded {
		t.Fatalf("got %+v, want detach with message-size-exceeded", d)
	}
	r.send(0, &codec.Close{})
	if _, ok := r.read().(*codec.Close); !ok {
		t.Fatal("no close reply")
	}
}
