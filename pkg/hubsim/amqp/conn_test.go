package amqp_test

import (
	"encoding/binary"
	"io"
	"strings"
	"testing"
	"time"

	goamqp "github.com/Azure/go-amqp"

	codec "github.com/iothubby/iothubby/pkg/amqp"
	hubamqp "github.com/iothubby/iothubby/pkg/hubsim/amqp"
)

// readRaw reads one frame and says whether it was empty (a heartbeat).
func (r *raw) readRaw() (empty bool, ok bool) {
	var h [8]byte
	if _, err := io.ReadFull(r.br, h[:]); err != nil {
		return false, false
	}
	body := make([]byte, binary.BigEndian.Uint32(h[:4])-8)
	if _, err := io.ReadFull(r.br, body); err != nil {
		return false, false
	}
	return len(body) == 0, true
}

// TestIdleTimeout: a client that asked for an idle time-out gets empty frames while nothing
// else is sent; a client silent past the server's idle time-out is closed with
// amqp:resource-limit-exceeded.
func TestIdleTimeout(t *testing.T) {
	e := newEnv(t, func(c *hubamqp.Config) { c.IdleTimeout = 2 * time.Second })
	// go-amqp asking for 4 s: it closes the connection itself if hubsim sends nothing for that
	// long, so a link still opening after the raw connection's 3 s shows the heartbeats arrive
	c := e.dial(&goamqp.ConnOptions{IdleTimeout: 4 * time.Second})
	s := e.session(c)
	r := e.raw()
	// raw opened without an idle time-out and sends nothing more: closed after 2 s (+ slack)
	cl, ok := r.read().(*codec.Close)
	if !ok || cl.Error == nil || cl.Error.Condition != codec.ErrResourceLimit || !strings.Contains(cl.Error.Description, "idle") {
		t.Fatalf("got %+v, want close for idleness", cl)
	}
	// meanwhile the go-amqp connection, heartbeating both ways, is alive
	if _, err := s.NewReceiver(ctxT(t), "$cbs", nil); err != nil {
		t.Fatalf("the heartbeating connection: %v", err)
	}
	select {
	case <-c.Done():
		t.Fatalf("go-amqp connection ended: %v", c.Err())
	default:
	}
}

// TestHeartbeatFrames: with an idle time-out of 1 s asked in open, empty frames come.
func TestHeartbeatFrames(t *testing.T) {
	e := newEnv(t)
	r := e.rawOpen(1000)
	for range 2 {
		empty, ok := r.readRaw()
		if !ok || !empty {
			t.Fatalf("frame empty=%v ok=%v, want a heartbeat", empty, ok)
		}
	}
}

// TestSlowReaderDisconnected: a client that takes messages but stops reading is disconnected
// once its queue is full or a write stalls, and other connections are served meanwhile.
func TestSlowReaderDisconnected(t *testing.T) {
	e := newEnv(t, func(c *hubamqp.Config) {
		c.MaxQueuedBytes = 256 << 10
		c.WriteTimeout = 500 * time.Millisecond
	})
	links := streamNode(e)
	r := e.raw()
	r.send(0, &codec.Flow{IncomingWindow: 1 << 20, NextOutgoingID: 0, OutgoingWindow: 100})
	r.send(0, &codec.Attach{Name: "slow", Handle: 0, Role: codec.RoleReceiver, Source: &codec.Source{Address: "test/stream"}})
	l := <-links
	zero, credit, h := uint32(0), uint32(1000), uint32(0)
	r.send(0, &codec.Flow{IncomingWindow: 1 << 20, NextOutgoingID: 0, OutgoingWindow: 100, Handle: &h, DeliveryCount: &zero, LinkCredit: &credit})
	big := &codec.Message{Data: [][]byte{make([]byte, 32<<10)}}
	for range 1000 {
		if err := l.Post(big, nil, nil); err != nil {
			break // the link went away with the connection
		}
	}
	e.ev.wait(t, "slow reader closed", func(ev hubamqp.Event) bool { return ev.Kind == "closed" })
	// another client is served
	s := e.session(e.dial(nil))
	if _, err := s.NewSender(ctxT(t), "$cbs", nil); err != nil {
		t.Fatal(err)
	}
}

// TestMultiFrameTransfers: messages larger than a frame cross in several transfers both ways
// (go-amqp splits what it sends over hubsim's max-frame-size, hubsim what it sends over
// go-amqp's).
func TestMultiFrameTransfers(t *testing.T) {
	e := newEnv(t, func(c *hubamqp.Config) { c.MaxFrameSize = 1024 })
	got := make(chan *hubamqp.Delivery, 1)
	e.srv.Handle("test/sink", func(l *hubamqp.Link) error {
		l.OnMessage = func(d *hubamqp.Delivery) { d.Accept(); got <- d }
		return nil
	})
	links := streamNode(e)
	ctx := ctxT(t)
	s := e.session(e.dial(&goamqp.ConnOptions{MaxFrameSize: 512}))
	body := make([]byte, 20000)
	for i := range body {
		body[i] = byte(i * 7)
	}
	snd, err := s.NewSender(ctx, "test/sink", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := snd.Send(ctx, &goamqp.Message{Data: [][]byte{body}}, nil); err != nil {
		t.Fatal(err)
	}
	d := <-got
	if len(d.Message.Data) != 1 || string(d.Message.Data[0]) != string(body) {
		t.Fatalf("reassembled %d bytes", len(d.Raw))
	}
	rcv, err := s.NewReceiver(ctx, "test/stream", &goamqp.ReceiverOptions{Credit: 1})
	if err != nil {
		t.Fatal(err)
	}
	l := <-links
	outcome := make(chan codec.DeliveryState, 1)
	if err := l.Post(&codec.Message{Data: [][]byte{body}}, nil, func(st codec.DeliveryState, _ error) { outcome <- st }); err != nil {
		t.Fatal(err)
	}
	m, err := rcv.Receive(ctx, nil)
	if err != nil || len(m.Data) != 1 || string(m.Data[0]) != string(body) {
		t.Fatalf("received %v", err)
	}
	if err := rcv.AcceptMessage(ctx, m); err != nil {
		t.Fatal(err)
	}
	if _, ok := (<-outcome).(*codec.Accepted); !ok {
		t.Fatal("the multi-frame delivery was not accepted")
	}
}

// TestReceiverSettlesSecond: a receiver in rcv-settle-mode second (C#'s feedback receiver)
// sends its outcome unsettled and waits for the server to settle; the server does, and the
// outcome reaches the node. A pre-settled link (snd-settle-mode settled) completes on sending.
func TestReceiverSettlesSecond(t *testing.T) {
	e := newEnv(t)
	links := streamNode(e)
	ctx := ctxT(t)
	s := e.session(e.dial(nil))
	second := goamqp.ReceiverSettleModeSecond
	rcv, err := s.NewReceiver(ctx, "test/stream", &goamqp.ReceiverOptions{Credit: 5, SettlementMode: &second})
	if err != nil {
		t.Fatal(err)
	}
	l := <-links
	outcome := make(chan codec.DeliveryState, 1)
	if err := l.Post(&codec.Message{Value: "x", HasValue: true}, nil, func(st codec.DeliveryState, _ error) { outcome <- st }); err != nil {
		t.Fatal(err)
	}
	m, err := rcv.Receive(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := rcv.AcceptMessage(ctx, m); err != nil { // returns once the server settles
		t.Fatalf("accept in mode second: %v", err)
	}
	if _, ok := (<-outcome).(*codec.Accepted); !ok {
		t.Fatal("outcome not accepted")
	}

	settled := goamqp.SenderSettleModeSettled
	pre, err := s.NewReceiver(ctx, "test/stream", &goamqp.ReceiverOptions{Credit: 5, RequestedSenderSettleMode: &settled})
	if err != nil {
		t.Fatal(err)
	}
	l = <-links
	st, err := l.Send(ctx, &codec.Message{Value: "y", HasValue: true})
	if _, ok := st.(*codec.Accepted); !ok || err != nil {
		t.Fatalf("pre-settled send: %T %v", st, err)
	}
	if m, err := pre.Receive(ctx, nil); err != nil || m.Value != "y" {
		t.Fatalf("pre-settled receive: %v %v", m, err)
	}
}
