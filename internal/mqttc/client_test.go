package mqttc

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/clock"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const wait = 10 * time.Second

// startBroker runs a mochi broker (any client allowed) on a loopback port.
func startBroker(t *testing.T) string {
	t.Helper()
	s := mochi.New(&mochi.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := s.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}
	l := listeners.NewTCP(listeners.Config{ID: "t", Address: "127.0.0.1:0"})
	if err := s.AddListener(l); err != nil { // binds the port
		t.Fatal(err)
	}
	if err := s.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return l.Address()
}

func tcpDial(addr string) func(context.Context) (net.Conn, error) {
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
}

// inbox collects a client's inbound messages and its loss.
type inbox struct {
	msgs chan paho.Message
	lost chan error
}

func newInbox() *inbox { return &inbox{msgs: make(chan paho.Message, 16), lost: make(chan error, 1)} }

func (b *inbox) options(dial func(context.Context) (net.Conn, error), id string) Options {
	return Options{Dial: dial, ClientID: id, KeepAlive: time.Minute,
		OnMessage: func(m paho.Message) { b.msgs <- m }, OnLost: func(err error) { b.lost <- err }}
}

func (b *inbox) awaitLost(t *testing.T) error {
	t.Helper()
	select {
	case err := <-b.lost:
		return err
	case <-time.After(wait):
		t.Fatal("connection not reported lost")
		return nil
	}
}

func connect(t *testing.T, o Options) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := Connect(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Disconnect(0); <-c.Done() })
	return c
}

func done(t *testing.T, tok paho.Token) error {
	t.Helper()
	if !tok.WaitTimeout(wait) {
		t.Fatal("token did not complete")
	}
	return tok.Error()
}

func TestPublishSubscribeAndAck(t *testing.T) {
	addr := startBroker(t)
	subIn, pubIn := newInbox(), newInbox()
	sub := connect(t, subIn.options(tcpDial(addr), "sub"))
	pub := connect(t, pubIn.options(tcpDial(addr), "pub"))

	st := sub.SubscribeMultiple(map[string]byte{"t/#": 1, "q0/#": 0}, nil)
	if err := done(t, st); err != nil {
		t.Fatal(err)
	}
	if got := st.(*SubscribeToken).Result(); got["t/#"] != 1 || got["q0/#"] != 0 || len(got) != 2 {
		t.Fatalf("SUBACK result %v", got)
	}
	if err := done(t, pub.Publish("t/x", 1, false, []byte("one"))); err != nil {
		t.Fatalf("QoS 1 publish: %v", err)
	}
	if err := done(t, pub.Publish("q0/y", 0, false, "two")); err != nil {
		t.Fatalf("QoS 0 publish: %v", err)
	}
	for _, want := range []struct {
		topic, payload string
		qos            byte
	}{{"t/x", "one", 1}, {"q0/y", "two", 0}} {
		select {
		case m := <-subIn.msgs:
			if m.Topic() != want.topic || string(m.Payload()) != want.payload || m.Qos() != want.qos {
				t.Fatalf("got %s %q QoS %d, want %+v", m.Topic(), m.Payload(), m.Qos(), want)
			}
			m.Ack()
			m.Ack() // a second Ack sends nothing more
		case <-time.After(wait):
			t.Fatalf("no message on %s", want.topic)
		}
	}
	if tok := pub.Publish("t/z", 3, false, "x"); done(t, tok) == nil {
		t.Fatal("QoS 3 accepted")
	}
	if tok := pub.Publish("t/z", 1, false, 42); done(t, tok) == nil || !strings.Contains(tok.Error().Error(), "payload type") {
		t.Fatalf("int payload: %v", tok.Error())
	}
}

// rawServer accepts one connection and runs serve on it.
func rawServer(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		serve(c)
	}()
	t.Cleanup(func() { l.Close(); wg.Wait() })
	return l.Addr().String()
}

// eachPacket reads packets from c and hands each to f until the connection ends.
func eachPacket(c net.Conn, f func(packets.ControlPacket)) {
	for {
		p, err := packets.ReadPacket(c)
		if err != nil {
			return
		}
		f(p)
	}
}

// readConnect reads the client's CONNECT and answers CONNACK with code.
func readConnect(t *testing.T, c net.Conn, code byte) *packets.ConnectPacket {
	p, err := packets.ReadPacket(c)
	if err != nil {
		t.Error(err)
		return nil
	}
	cp, _ := p.(*packets.ConnectPacket)
	if _, err := c.Write([]byte{packets.Connack << 4, 2, 0, code}); err != nil {
		t.Error(err)
	}
	return cp
}

func TestConnectSendsOptionsAndRefusalIsTyped(t *testing.T) {
	got := make(chan *packets.ConnectPacket, 1)
	addr := rawServer(t, func(c net.Conn) { got <- readConnect(t, c, 5) })
	in := newInbox()
	o := in.options(tcpDial(addr), "dev1")
	o.Username, o.Password, o.KeepAlive = "host/dev1/?api-version=2021-04-12", "sig", 2*time.Minute
	_, err := Connect(context.Background(), o)
	var refused *RefusedError
	if !errors.As(err, &refused) || refused.Code != 5 {
		t.Fatalf("err %v, want a RefusedError with code 5", err)
	}
	cp := <-got
	if cp == nil || cp.ClientIdentifier != "dev1" || cp.Username != o.Username || string(cp.Password) != "sig" ||
		cp.Keepalive != 120 || cp.ProtocolVersion != 4 || cp.ProtocolName != "MQTT" || cp.CleanSession {
		t.Fatalf("CONNECT %+v", cp)
	}
}

func TestConnectGivesUpWithItsContext(t *testing.T) {
	addr := rawServer(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) }) // never answers
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := Connect(ctx, newInbox().options(tcpDial(addr), "d"))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v, want the context's deadline", err)
	}
}

// hostile connects to a raw server that accepts the CONNECT and then runs after on the
// connection; it returns the client's loss.
func hostile(t *testing.T, mutate func(*Options), after func(net.Conn)) (*inbox, error) {
	t.Helper()
	addr := rawServer(t, func(c net.Conn) {
		readConnect(t, c, 0)
		after(c)
	})
	in := newInbox()
	o := in.options(tcpDial(addr), "d")
	if mutate != nil {
		mutate(&o)
	}
	c := connect(t, o)
	err := in.awaitLost(t)
	select {
	case <-c.Done():
	case <-time.After(wait):
		t.Fatal("reader goroutine did not end")
	}
	return in, err
}

func TestInboundPacketOverTheLimitLosesTheConnection(t *testing.T) {
	_, err := hostile(t, func(o *Options) { o.MaxPacket = 1024 }, func(c net.Conn) {
		_, _ = c.Write([]byte{packets.Publish << 4, 0xff, 0xff, 0x7f}) // 2 MiB announced
		_, _ = io.Copy(io.Discard, c)
	})
	if !errors.Is(err, ErrPacketTooLarge) || !errors.Is(err, ErrConnectionLost) {
		t.Fatalf("lost with %v, want ErrPacketTooLarge", err)
	}
}

func TestMalformedPacketLosesTheConnection(t *testing.T) {
	// A PUBLISH whose topic length runs past the packet.
	in, err := hostile(t, nil, func(c net.Conn) {
		_, _ = c.Write([]byte{packets.Publish << 4, 3, 0, 9, 'a'})
		_, _ = io.Copy(io.Discard, c)
	})
	if !errors.Is(err, ErrProtocol) {
		t.Fatalf("lost with %v, want ErrProtocol", err)
	}
	if len(in.msgs) != 0 {
		t.Fatal("a malformed message was delivered")
	}
}

func TestServerDisconnectIsAClose(t *testing.T) {
	_, err := hostile(t, nil, func(c net.Conn) { _, _ = c.Write([]byte{packets.Disconnect << 4, 0}) })
	if !errors.Is(err, io.EOF) {
		t.Fatalf("lost with %v, want io.EOF", err)
	}
}

// pingServer accepts the CONNECT, reports every PINGREQ on pings and answers it when answer.
func pingServer(t *testing.T, pings chan<- struct{}, answer bool) string {
	return rawServer(t, func(c net.Conn) {
		readConnect(t, c, 0)
		eachPacket(c, func(p packets.ControlPacket) {
			if _, ok := p.(*packets.PingreqPacket); ok {
				if answer {
					_, _ = c.Write([]byte{packets.Pingresp << 4, 0})
				}
				pings <- struct{}{}
			}
		})
	})
}

func awaitPing(t *testing.T, pings <-chan struct{}) {
	t.Helper()
	select {
	case <-pings:
	case <-time.After(wait):
		t.Fatal("no PINGREQ")
	}
}

func TestNoPingrespLosesTheConnection(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	pings := make(chan struct{}, 1)
	in := newInbox()
	o := in.options(tcpDial(pingServer(t, pings, false)), "d")
	o.KeepAlive, o.PingTimeout, o.Clock = time.Minute, 30*time.Second, clk
	c := connect(t, o)
	clk.Advance(time.Minute)
	awaitPing(t, pings) // the ping timeout is armed before the PINGREQ is queued
	timeoutAt := clk.Now().Add(30 * time.Second)
	clk.Advance(29 * time.Second)
	// The fake clock fires due timers within Advance: one still armed has not fired.
	if armed := clk.Armed(); !slices.ContainsFunc(armed, timeoutAt.Equal) {
		t.Fatalf("ping timeout not armed for %v 1 s before it (armed: %v)", timeoutAt, armed)
	}
	clk.Advance(time.Second)
	if err := in.awaitLost(t); !errors.Is(err, ErrPingTimeout) {
		t.Fatalf("lost with %v, want ErrPingTimeout", err)
	}
	<-c.Done()
}

func TestPingrespKeepsTheConnection(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	pings := make(chan struct{}, 1)
	in := newInbox()
	o := in.options(tcpDial(pingServer(t, pings, true)), "d")
	o.KeepAlive, o.PingTimeout, o.Clock = time.Minute, 30*time.Second, clk
	c := connect(t, o)
	for range 3 {
		clk.Advance(time.Minute)
		awaitPing(t, pings)
		// The PINGRESP stops the ping timer: only the keep-alive stays armed.
		waitfor.True(t, "the ping timer stopped by the PINGRESP", func() bool { return len(clk.Armed()) == 1 })
		clk.Advance(30 * time.Second) // past the ping timeout; the next keep-alive is 30 s on
	}
	if err := done(t, c.Publish("t", 0, false, "still up")); err != nil {
		t.Fatal(err)
	}
}

func TestServerThatStopsReadingLosesTheConnection(t *testing.T) {
	stop := make(chan struct{})
	addr := rawServer(t, func(c net.Conn) {
		readConnect(t, c, 0)
		<-stop // reads nothing more
	})
	defer close(stop)
	in := newInbox()
	o := in.options(tcpDial(addr), "d")
	o.WriteTimeout = 200 * time.Millisecond
	c := connect(t, o)
	// 256 x 64 KiB: far more than the loopback socket buffers take, within the write queue.
	big := bytes.Repeat([]byte("x"), 64<<10)
	var toks []paho.Token
	for range 256 {
		toks = append(toks, c.Publish("t", 1, false, big))
	}
	var ne net.Error
	if err := in.awaitLost(t); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("lost with %v, want a write timeout", err)
	}
	for _, tok := range toks {
		if err := done(t, tok); !errors.Is(err, ErrConnectionLost) {
			t.Fatalf("pending publish ended with %v, want ErrConnectionLost", err)
		}
	}
}

func TestDisconnectSendsDisconnectAndFailsPending(t *testing.T) {
	got := make(chan byte, 4)
	addr := rawServer(t, func(c net.Conn) {
		readConnect(t, c, 0)
		eachPacket(c, func(p packets.ControlPacket) {
			switch p.(type) {
			case *packets.PublishPacket:
				got <- packets.Publish // never acknowledged
			case *packets.DisconnectPacket:
				got <- packets.Disconnect
			}
		})
	})
	in := newInbox()
	c, err := Connect(context.Background(), in.options(tcpDial(addr), "d"))
	if err != nil {
		t.Fatal(err)
	}
	tok := c.Publish("t", 1, false, "x")
	if p := <-got; p != packets.Publish {
		t.Fatalf("server got %d first", p)
	}
	c.Disconnect(1000)
	<-c.Done()
	if p := <-got; p != packets.Disconnect {
		t.Fatalf("server got %d, want DISCONNECT", p)
	}
	if err := done(t, tok); !errors.Is(err, ErrDisconnected) {
		t.Fatalf("pending publish: %v, want ErrDisconnected", err)
	}
	if err := done(t, c.Publish("t", 0, false, "late")); !errors.Is(err, ErrDisconnected) {
		t.Fatalf("publish after Disconnect: %v", err)
	}
	select {
	case err := <-in.lost:
		t.Fatalf("OnLost called after Disconnect: %v", err)
	default:
	}
}

func FuzzReadPacket(f *testing.F) {
	for _, seed := range [][]byte{
		{packets.Connack << 4, 2, 0, 0},
		{packets.Publish<<4 | 2, 7, 0, 1, 't', 0, 1, 'h', 'i'},
		{packets.Puback << 4, 2, 0, 1},
		{packets.Suback << 4, 4, 0, 1, 0, 0x80},
		{packets.Pingresp << 4, 0},
		{packets.Publish << 4, 0xff, 0xff, 0xff, 0xff, 0x7f},
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := readPacket(bytes.NewReader(data), 256)
		if err != nil {
			return
		}
		// What was accepted re-encodes to a packet that reads back the same.
		var buf bytes.Buffer
		if err := p.Write(&buf); err != nil {
			return // paho refuses to write some packets it can read (e.g. empty SUBACK)
		}
		q, err := readPacket(&buf, 1<<20)
		if err != nil {
			t.Fatalf("%s re-encoded does not read back: %v", p, err)
		}
		if p.String() != q.String() {
			t.Fatalf("read %s, re-read %s", p, q)
		}
	})
}
