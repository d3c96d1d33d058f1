// Package mqttc is a lean MQTT 3.1.1 client for device connections held by the thousand. A
// connection costs one goroutine, its reader; packets are written by a goroutine that exists
// only while packets wait, and keep-alive runs on timers. paho's client, by contrast, runs ten
// goroutines per connection, which is most of what a simulated device costs in a fleet.
//
// Packets are encoded and decoded by paho's packets package; this package adds the session:
// packet identifiers, acknowledgements, keep-alive, bounds and the connection's end. Client
// implements the part of paho's Client that pkg/hub uses (Publish, SubscribeMultiple,
// Disconnect), with paho's Token and Message interfaces, so a hub connection can use either.
package mqttc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/iothubby/iothubby/pkg/clock"
)

// Defaults for zero Options fields.
const (
	DefaultWriteTimeout = 30 * time.Second
	DefaultPingTimeout  = 30 * time.Second
	// DefaultMaxPacket bounds an inbound packet's remaining length: IoT Hub's largest inbound
	// payloads (a method request, 128 KiB; a twin document) fit with room to spare.
	DefaultMaxPacket = 512 << 10
	// maxQueued bounds packets waiting to be written; Publish beyond it fails at once.
	maxQueued = 1024
)

var (
	// ErrConnectionLost is wrapped by the error of every token failed because the connection
	// ended, and passed (wrapping the cause) to OnLost.
	ErrConnectionLost = errors.New("mqttc: connection lost")
	// ErrDisconnected fails tokens still pending when Disconnect closes the connection.
	ErrDisconnected = errors.New("mqttc: disconnected")
	// ErrPingTimeout is the cause when the server did not answer a PINGREQ in time.
	ErrPingTimeout = errors.New("mqttc: no PINGRESP within the ping timeout")
	// ErrProtocol is the cause when the server sent something MQTT 3.1.1 does not allow here.
	ErrProtocol = errors.New("mqttc: protocol violation")
	// ErrPacketTooLarge is the cause when an inbound packet is over Options.MaxPacket.
	ErrPacketTooLarge = errors.New("mqttc: inbound packet over the size limit")
	// ErrQueueFull fails a publish or subscribe when maxQueued packets already wait.
	ErrQueueFull = errors.New("mqttc: write queue full")
	// errIDs fails a publish or subscribe when all 65,535 packet identifiers are in flight.
	errIDs = errors.New("mqttc: no free packet identifier")
)

// RefusedError is a CONNACK with a non-zero return code (1-5 in MQTT 3.1.1).
type RefusedError struct{ Code byte }

func (e *RefusedError) Error() string {
	return fmt.Sprintf("mqttc: connection refused, CONNACK return code %d", e.Code)
}

// Options configure one connection.
type Options struct {
	// Dial opens the transport (TCP and TLS, or a WebSocket tunnel) ready for MQTT bytes. Its
	// context ends when Connect gives up.
	Dial func(ctx context.Context) (net.Conn, error)

	ClientID     string
	Username     string
	Password     string
	CleanSession bool

	// KeepAlive is sent in CONNECT; a PINGREQ goes out every KeepAlive (zero: none) and the
	// connection is lost when no PINGRESP follows within PingTimeout.
	KeepAlive   time.Duration
	PingTimeout time.Duration
	// WriteTimeout bounds every write; a write that takes longer loses the connection.
	WriteTimeout time.Duration
	// MaxPacket bounds an inbound packet's remaining length (DefaultMaxPacket when zero).
	MaxPacket int
	// Clock runs the keep-alive and ping timers (clock.Real() when nil). Write deadlines and
	// Connect's context stay on the wall clock: the transport enforces them.
	Clock clock.Clock

	// OnMessage gets every inbound PUBLISH, in order, on the reader goroutine; it must not
	// block. A QoS 1 message is acknowledged when its Ack is called.
	OnMessage func(paho.Message)
	// OnLost is called once, on a goroutine of the client, when the connection ends other
	// than by Disconnect.
	OnLost func(error)
}

// Client is one MQTT connection. Its methods are safe for concurrent use.
type Client struct {
	conn         net.Conn
	writeTimeout time.Duration
	pingTimeout  time.Duration
	keepAlive    time.Duration
	maxPacket    int
	onMessage    func(paho.Message)
	onLost       func(error)
	readerDone   chan struct{}
	clock        clock.Clock

	mu        sync.Mutex
	ended     bool
	endErr    error
	nextID    uint16
	inflight  map[uint16]*Token // QoS 1 publishes and subscribes awaiting their acknowledgement
	queue     []outPacket       // encoded packets waiting for the writer
	spare     []outPacket
	writing   bool // a writer goroutine is draining queue
	keepTimer clock.Timer
	pingTimer clock.Timer
	pingOut   bool // a PINGREQ awaits its PINGRESP
}

// outPacket is one encoded packet; written, if set, completes when the packet is written.
type outPacket struct {
	b       []byte
	written *Token
}

// Connect dials, sends CONNECT and waits for CONNACK, within ctx. A refusal is a *RefusedError.
func Connect(ctx context.Context, o Options) (*Client, error) {
	if o.Dial == nil || o.OnMessage == nil {
		return nil, errors.New("mqttc: Options.Dial and Options.OnMessage are required")
	}
	conn, err := o.Dial(ctx)
	if err != nil {
		return nil, err
	}
	c := &Client{
		conn:         conn,
		writeTimeout: or(o.WriteTimeout, DefaultWriteTimeout),
		pingTimeout:  or(o.PingTimeout, DefaultPingTimeout),
		keepAlive:    o.KeepAlive,
		maxPacket:    o.MaxPacket,
		onMessage:    o.OnMessage,
		onLost:       o.OnLost,
		readerDone:   make(chan struct{}),
		clock:        o.Clock,
	}
	if c.clock == nil {
		c.clock = clock.Real()
	}
	if c.maxPacket <= 0 {
		c.maxPacket = DefaultMaxPacket
	}
	if err := c.handshake(ctx, &o); err != nil {
		conn.Close()
		return nil, err
	}
	if c.keepAlive > 0 {
		c.mu.Lock() // the timer may fire before the assignment is done
		c.keepTimer = c.clock.AfterFunc(c.keepAlive, c.ping)
		c.mu.Unlock()
	}
	go c.read()
	return c, nil
}

func or(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// handshake writes CONNECT and reads CONNACK on the caller's goroutine, bounded by ctx.
func (c *Client) handshake(ctx context.Context, o *Options) error {
	cp := packets.NewControlPacket(packets.Connect).(*packets.ConnectPacket)
	cp.ProtocolName, cp.ProtocolVersion = "MQTT", 4
	cp.CleanSession = o.CleanSession
	cp.ClientIdentifier = o.ClientID
	cp.Keepalive = uint16(min(o.KeepAlive/time.Second, 65535))
	if o.Username != "" {
		cp.UsernameFlag, cp.Username = true, o.Username
	}
	if o.Password != "" {
		cp.PasswordFlag, cp.Password = true, []byte(o.Password)
	}
	var buf bytes.Buffer
	if err := cp.Write(&buf); err != nil {
		return fmt.Errorf("mqttc: encode CONNECT: %w", err)
	}
	// ctx's end unblocks the write and the read below.
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := c.conn.Write(buf.Bytes()); err != nil {
		return ctxErr(ctx, fmt.Errorf("mqttc: write CONNECT: %w", err))
	}
	p, err := readPacket(c.conn, c.maxPacket)
	if err != nil {
		return ctxErr(ctx, fmt.Errorf("mqttc: read CONNACK: %w", err))
	}
	ack, ok := p.(*packets.ConnackPacket)
	if !ok {
		return fmt.Errorf("%w: %T before CONNACK", ErrProtocol, p)
	}
	if ack.ReturnCode != 0 {
		return &RefusedError{Code: ack.ReturnCode}
	}
	if !stop() {
		return ctx.Err() // ctx ended as CONNACK arrived: the deadline is already spoilt
	}
	return c.conn.SetDeadline(time.Time{})
}

// ctxErr names ctx's end as the cause of err when it is: the transport's deadline, set to
// ctx's, can expire a moment before ctx itself reports it.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return fmt.Errorf("%w (%w)", context.DeadlineExceeded, err)
	}
	return err
}

// readPacket reads one packet, refusing a remaining length over max before reading its body.
func readPacket(r io.Reader, max int) (packets.ControlPacket, error) {
	var b [1]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return nil, err
	}
	n, mult := 0, 1
	for i := 0; ; i++ {
		if i == 4 {
			return nil, fmt.Errorf("%w: remaining length over four bytes", ErrProtocol)
		}
		var d [1]byte
		if _, err := io.ReadFull(r, d[:]); err != nil {
			return nil, err
		}
		n += int(d[0]&127) * mult
		if d[0]&128 == 0 {
			break
		}
		mult *= 128
	}
	if n > max {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrPacketTooLarge, n, max)
	}
	fh := packets.FixedHeader{MessageType: b[0] >> 4, Dup: b[0]&8 != 0, Qos: b[0] >> 1 & 3, Retain: b[0]&1 != 0, RemainingLength: n}
	cp, err := packets.NewControlPacketWithHeader(fh)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, err
	}
	if err := unpack(cp, body); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrProtocol, packets.PacketNames[fh.MessageType], err)
	}
	return cp, nil
}

// unpack decodes body into cp, turning a panic of the decoder on a malformed body into an
// error and refusing bytes left over.
func unpack(cp packets.ControlPacket, body []byte) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("malformed: %v", r)
		}
	}()
	rd := bytes.NewBuffer(body)
	if err := cp.Unpack(rd); err != nil {
		return err
	}
	if p, ok := cp.(*packets.PublishPacket); ok {
		if p.Qos > 1 {
			return fmt.Errorf("QoS %d publish", p.Qos)
		}
		return nil // the payload is the rest
	}
	if rd.Len() != 0 {
		return fmt.Errorf("%d bytes left over", rd.Len())
	}
	return nil
}

// read is the reader goroutine: it hands each inbound packet to its owner until the connection
// ends.
func (c *Client) read() {
	defer close(c.readerDone)
	for {
		p, err := readPacket(c.conn, c.maxPacket)
		if err != nil {
			c.end(err, true)
			return
		}
		switch p := p.(type) {
		case *packets.PublishPacket:
			c.onMessage(&Message{c: c, p: p})
		case *packets.PubackPacket:
			c.complete(p.MessageID, packets.Puback, nil)
		case *packets.SubackPacket:
			c.complete(p.MessageID, packets.Suback, p.ReturnCodes)
		case *packets.PingrespPacket:
			c.mu.Lock()
			c.pingOut = false
			if c.pingTimer != nil {
				c.pingTimer.Stop()
			}
			c.mu.Unlock()
		case *packets.DisconnectPacket:
			// Not in MQTT 3.1.1, but brokers send it when another client takes the session
			// over; it means what the close that follows means.
			c.end(fmt.Errorf("server sent DISCONNECT: %w", io.EOF), true)
			return
		default:
			c.end(fmt.Errorf("%w: unexpected %s from the server", ErrProtocol, packetName(p)), true)
			return
		}
	}
}

// packetName names p's type for an error.
func packetName(p packets.ControlPacket) string {
	name, _, _ := strings.Cut(p.String(), ":")
	return name
}

// complete finishes the in-flight token id with the packet type that acknowledges it; an
// acknowledgement of the wrong type or of an unknown id is dropped.
func (c *Client) complete(id uint16, ackType byte, codes []byte) {
	c.mu.Lock()
	t := c.inflight[id]
	if t == nil || t.ackType != ackType {
		c.mu.Unlock()
		return
	}
	delete(c.inflight, id)
	c.mu.Unlock()
	if t.filters != nil {
		t.result = make(map[string]byte, len(t.filters))
		for i, f := range t.filters {
			code := byte(0x80)
			if i < len(codes) {
				code = codes[i]
			}
			t.result[f] = code
		}
	}
	t.finish(nil)
}

// ping is the keep-alive timer: it sends a PINGREQ and arms the ping timeout.
func (c *Client) ping() {
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return
	}
	c.pingOut = true
	if c.pingTimer == nil {
		c.pingTimer = c.clock.AfterFunc(c.pingTimeout, c.pingExpired)
	} else {
		c.pingTimer.Reset(c.pingTimeout)
	}
	c.keepTimer.Reset(c.keepAlive)
	err := c.enqueueLocked(outPacket{b: pingreq})
	c.mu.Unlock()
	if err != nil {
		c.end(err, true)
	}
}

var pingreq = []byte{packets.Pingreq << 4, 0}

func (c *Client) pingExpired() {
	c.mu.Lock()
	out := c.pingOut && !c.ended
	c.mu.Unlock()
	if out {
		c.end(ErrPingTimeout, true)
	}
}

// enqueueLocked queues p for the writer and starts one if none runs. c.mu is held.
func (c *Client) enqueueLocked(p outPacket) error {
	if c.ended {
		return c.tokenErrLocked()
	}
	if len(c.queue) >= maxQueued {
		return ErrQueueFull
	}
	c.queue = append(c.queue, p)
	if !c.writing {
		c.writing = true
		go c.write()
	}
	return nil
}

// write is the writer goroutine: it writes what is queued, in order, batching the packets
// queued together into one write, and ends when the queue is empty.
func (c *Client) write() {
	var buf []byte
	for {
		c.mu.Lock()
		batch := c.queue
		if len(batch) == 0 || c.ended {
			c.writing = false
			c.mu.Unlock()
			return
		}
		c.queue, c.spare = c.spare[:0], nil
		c.mu.Unlock()
		buf = buf[:0]
		for _, p := range batch {
			buf = append(buf, p.b...)
		}
		_ = c.conn.SetWriteDeadline(time.Now().Add(c.writeTimeout))
		_, err := c.conn.Write(buf)
		if err != nil {
			for _, p := range batch {
				if p.written != nil {
					p.written.finish(fmt.Errorf("%w: write: %w", ErrConnectionLost, err))
				}
			}
			c.mu.Lock()
			c.writing = false
			c.mu.Unlock()
			c.end(fmt.Errorf("write: %w", err), true)
			return
		}
		for i, p := range batch {
			if p.written != nil {
				p.written.finish(nil)
			}
			batch[i] = outPacket{}
		}
		c.mu.Lock()
		c.spare = batch[:0]
		c.mu.Unlock()
	}
}

// end ends the connection once: it closes the transport, fails what is pending and, when
// lost, calls OnLost.
func (c *Client) end(cause error, lost bool) {
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return
	}
	c.ended = true
	if lost {
		c.endErr = fmt.Errorf("%w: %w", ErrConnectionLost, cause)
	} else {
		c.endErr = cause
	}
	if c.keepTimer != nil {
		c.keepTimer.Stop()
	}
	if c.pingTimer != nil {
		c.pingTimer.Stop()
	}
	inflight, queue := c.inflight, c.queue
	c.inflight, c.queue = nil, nil
	err := c.endErr
	c.mu.Unlock()
	_ = c.conn.Close()
	for _, t := range inflight {
		t.finish(err)
	}
	for _, p := range queue {
		if p.written != nil {
			p.written.finish(err)
		}
	}
	if lost && c.onLost != nil {
		c.onLost(err)
	}
}

func (c *Client) tokenErrLocked() error {
	if c.endErr != nil {
		return c.endErr
	}
	return ErrDisconnected
}

// newIDLocked returns a free packet identifier (never 0). c.mu is held.
func (c *Client) newIDLocked() (uint16, bool) {
	if len(c.inflight) >= 65535 {
		return 0, false
	}
	for {
		c.nextID++
		if c.nextID == 0 {
			continue
		}
		if _, used := c.inflight[c.nextID]; !used {
			return c.nextID, true
		}
	}
}

// Publish sends a PUBLISH (QoS 0 or 1). The token completes when the packet is written (QoS
// 0) or acknowledged (QoS 1), or fails when the connection ends first. payload is a []byte or
// a string.
func (c *Client) Publish(topic string, qos byte, retained bool, payload interface{}) paho.Token {
	t := newToken(packets.Puback)
	p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	p.TopicName, p.Qos, p.Retain = topic, qos, retained
	switch v := payload.(type) {
	case []byte:
		p.Payload = v
	case string:
		p.Payload = []byte(v)
	default:
		t.finish(fmt.Errorf("mqttc: unsupported payload type %T", payload))
		return t
	}
	if qos > 1 {
		t.finish(fmt.Errorf("mqttc: QoS %d not supported", qos))
		return t
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended {
		t.finish(c.tokenErrLocked())
		return t
	}
	out := outPacket{}
	if qos == 1 {
		id, ok := c.newIDLocked()
		if !ok {
			t.finish(errIDs)
			return t
		}
		p.MessageID = id
	} else {
		out.written = t
	}
	var buf bytes.Buffer
	if err := p.Write(&buf); err != nil {
		t.finish(fmt.Errorf("mqttc: encode PUBLISH: %w", err))
		return t
	}
	out.b = buf.Bytes()
	if err := c.enqueueLocked(out); err != nil {
		t.finish(err)
		return t
	}
	if qos == 1 {
		c.inflightLocked()[p.MessageID] = t
	}
	return t
}

func (c *Client) inflightLocked() map[uint16]*Token {
	if c.inflight == nil {
		c.inflight = make(map[uint16]*Token)
	}
	return c.inflight
}

// SubscribeMultiple sends one SUBSCRIBE for filters (topic filter -> QoS). The token is a
// *SubscribeToken whose Result maps each filter to its SUBACK return code (0x80: refused).
// Inbound messages go to Options.OnMessage: callback must be nil.
func (c *Client) SubscribeMultiple(filters map[string]byte, callback paho.MessageHandler) paho.Token {
	t := newToken(packets.Suback)
	st := &SubscribeToken{Token: t}
	if callback != nil {
		t.finish(errors.New("mqttc: per-subscription handlers are not supported; use Options.OnMessage"))
		return st
	}
	p := packets.NewControlPacket(packets.Subscribe).(*packets.SubscribePacket)
	for f := range filters {
		p.Topics = append(p.Topics, f)
	}
	sort.Strings(p.Topics)
	for _, f := range p.Topics {
		p.Qoss = append(p.Qoss, filters[f])
	}
	t.filters = p.Topics
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended {
		t.finish(c.tokenErrLocked())
		return st
	}
	id, ok := c.newIDLocked()
	if !ok {
		t.finish(errIDs)
		return st
	}
	p.MessageID = id
	var buf bytes.Buffer
	if err := p.Write(&buf); err != nil {
		t.finish(fmt.Errorf("mqttc: encode SUBSCRIBE: %w", err))
		return st
	}
	if err := c.enqueueLocked(outPacket{b: buf.Bytes()}); err != nil {
		t.finish(err)
		return st
	}
	c.inflightLocked()[id] = t
	return st
}

// Disconnect sends DISCONNECT after what is already queued, waiting up to quiesce
// milliseconds for it to be written (0: close at once), and closes the connection. Tokens
// still pending fail with ErrDisconnected; OnLost is not called.
func (c *Client) Disconnect(quiesce uint) {
	if quiesce > 0 {
		t := newToken(0)
		c.mu.Lock()
		err := c.enqueueLocked(outPacket{b: []byte{packets.Disconnect << 4, 0}, written: t})
		c.mu.Unlock()
		if err == nil {
			timer := time.NewTimer(time.Duration(quiesce) * time.Millisecond)
			select {
			case <-t.Done():
			case <-timer.C:
			}
			timer.Stop()
		}
	}
	c.end(ErrDisconnected, false)
}

// Done is closed when the reader goroutine has ended (after the connection ended).
func (c *Client) Done() <-chan struct{} { return c.readerDone }

// ack queues a PUBACK for id.
func (c *Client) ack(id uint16) {
	c.mu.Lock()
	err := c.enqueueLocked(outPacket{b: []byte{packets.Puback << 4, 2, byte(id >> 8), byte(id)}})
	c.mu.Unlock()
	if err != nil && !errors.Is(err, ErrConnectionLost) && !errors.Is(err, ErrDisconnected) {
		c.end(fmt.Errorf("PUBACK: %w", err), true)
	}
}

// Token is the completion of one publish, subscribe or write (paho's Token interface).
type Token struct {
	done    chan struct{}
	once    sync.Once
	err     error
	ackType byte     // the packet type that acknowledges it
	filters []string // a SUBSCRIBE's filters in packet order
	result  map[string]byte
}

func newToken(ackType byte) *Token {
	return &Token{done: make(chan struct{}), ackType: ackType}
}

func (t *Token) finish(err error) {
	t.once.Do(func() {
		t.err = err
		close(t.done)
	})
}

// Wait waits for the token to complete; it always returns true.
func (t *Token) Wait() bool {
	<-t.done
	return true
}

// WaitTimeout waits up to d and reports whether the token completed.
func (t *Token) WaitTimeout(d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-t.done:
		return true
	case <-timer.C:
		return false
	}
}

// Done is closed when the token completes.
func (t *Token) Done() <-chan struct{} { return t.done }

// Error is the token's failure once it completed (nil before, and on success).
func (t *Token) Error() error {
	select {
	case <-t.done:
		return t.err
	default:
		return nil
	}
}

// SubscribeToken is the token of SubscribeMultiple.
type SubscribeToken struct{ *Token }

// Result maps each filter to its SUBACK return code once the token completed successfully.
func (t *SubscribeToken) Result() map[string]byte {
	select {
	case <-t.done:
		return t.result
	default:
		return nil
	}
}

// Message is an inbound PUBLISH (paho's Message interface).
type Message struct {
	c     *Client
	p     *packets.PublishPacket
	acked sync.Once
}

func (m *Message) Duplicate() bool   { return m.p.Dup }
func (m *Message) Qos() byte         { return m.p.Qos }
func (m *Message) Retained() bool    { return m.p.Retain }
func (m *Message) Topic() string     { return m.p.TopicName }
func (m *Message) MessageID() uint16 { return m.p.MessageID }
func (m *Message) Payload() []byte   { return m.p.Payload }

// Ack sends the PUBACK of a QoS 1 message (once); for QoS 0 it does nothing.
func (m *Message) Ack() {
	if m.p.Qos != 1 {
		return
	}
	m.acked.Do(func() { m.c.ack(m.p.MessageID) })
}
