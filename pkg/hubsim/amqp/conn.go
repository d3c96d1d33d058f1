package amqp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	codec "github.com/iothubby/iothubby/pkg/amqp"
)

// sessionWindow is the incoming window this side announces (transfer frames).
const sessionWindow = 5000

// handleMax is the highest link handle a client may use per session.
const handleMax = 1023

// maxPending bounds the messages waiting for credit on one link.
const maxPending = 1000

// Conn is one client connection. Handlers reach it through Link.Conn.
type Conn struct {
	s      *Server
	nc     net.Conn
	br     *bufio.Reader
	log    *zap.Logger
	remote string
	ctx    context.Context
	cancel context.CancelFunc

	// outbound queue, drained by the writer goroutine
	outMu      sync.Mutex
	out        [][]byte
	outBytes   int
	outStop    bool
	outSignal  chan struct{}
	writerDone chan struct{}
	heartbeat  atomic.Int64 // nanoseconds between frames the client needs; 0: none

	// protocol state
	mu           sync.Mutex
	deferred     []func()
	sessions     map[uint16]*session
	claims       map[string]Claim
	peerMaxFrame uint32
	closeSent    bool
	finished     bool // no more link goroutines may start
	closeReason  string
	links        sync.WaitGroup
}

type session struct {
	ch                   uint16
	nextOutgoingID       uint32
	remoteIncomingWindow uint32
	nextIncomingID       uint32
	incomingRemaining    uint32
	nextDeliveryID       uint32
	links                map[uint32]*Link
	unsettled            map[uint32]*outDelivery
}

func newConn(s *Server, nc net.Conn) *Conn {
	c := &Conn{
		s: s, nc: nc, br: bufio.NewReaderSize(nc, 16<<10), remote: nc.RemoteAddr().String(),
		outSignal: make(chan struct{}, 1), writerDone: make(chan struct{}),
		sessions: map[uint16]*session{}, claims: map[string]Claim{}, peerMaxFrame: codec.MinMaxFrameSize,
	}
	c.log = s.log.With(zap.String("remote", c.remote))
	c.ctx, c.cancel = context.WithCancel(s.ctx)
	return c
}

// Remote is the client's address.
func (c *Conn) Remote() string { return c.remote }

// Claims returns the connection's unexpired claims.
func (c *Conn) Claims() []Claim {
	now := c.s.cfg.Clock.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []Claim
	for _, cl := range c.claims {
		if now.Before(cl.Expiry) {
			out = append(out, cl)
		}
	}
	return out
}

// lock and unlock guard the protocol state; callbacks queued with later run after unlock, on
// the unlocking goroutine, so that no handler code runs under the lock.
func (c *Conn) lock() { c.mu.Lock() }

func (c *Conn) unlock() {
	cbs := c.deferred
	c.deferred = nil
	c.mu.Unlock()
	for _, f := range cbs {
		f()
	}
}

func (c *Conn) later(f func()) { c.deferred = append(c.deferred, f) }

// abort drops the connection at once (server close, slow client).
func (c *Conn) abort() { _ = c.nc.Close() }

func (c *Conn) serve() {
	go c.writer()
	err := c.handshake()
	if err == nil {
		c.s.emit(Event{Kind: "open", Remote: c.remote})
		err = c.readLoop()
	}
	c.cancel()
	c.lock()
	c.closeSent = true // nothing more goes out but what is queued
	for _, s := range c.sessions {
		c.endSession(s)
	}
	reason := c.closeReason
	c.unlock()
	c.outMu.Lock()
	c.outStop = true
	c.outMu.Unlock()
	c.signal()
	<-c.writerDone // every write has a deadline
	_ = c.nc.Close()
	c.mu.Lock()
	c.finished = true
	c.mu.Unlock()
	c.links.Wait()
	if reason == "" && err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		reason = err.Error()
	}
	c.log.Debug("amqp connection closed", zap.String("reason", reason))
	c.s.emit(Event{Kind: "closed", Remote: c.remote, Reason: reason})
}

// ---- writing

func (c *Conn) signal() {
	select {
	case c.outSignal <- struct{}{}:
	default:
	}
}

// enqueue queues bytes for the writer. A client whose queue is full is disconnected.
func (c *Conn) enqueue(b []byte) {
	c.outMu.Lock()
	if c.outStop {
		c.outMu.Unlock()
		return
	}
	if queued := c.outBytes; queued+len(b) > c.s.cfg.MaxQueuedBytes {
		c.outStop = true
		c.outMu.Unlock()
		c.log.Warn("amqp client is not reading; disconnecting", zap.Int("queued", queued))
		c.abort()
		return
	}
	c.out = append(c.out, b)
	c.outBytes += len(b)
	c.outMu.Unlock()
	c.signal()
}

// send queues a performative on channel ch.
func (c *Conn) send(ch uint16, p codec.Performative) {
	c.sendFrame(codec.FrameAMQP, ch, p, nil)
}

func (c *Conn) sendFrame(typ uint8, ch uint16, p codec.Performative, payload []byte) {
	b, err := codec.AppendPerformativeFrame(nil, typ, ch, p, payload)
	if err != nil {
		c.log.Error("amqp encoding failed", zap.Error(err))
		c.abort()
		return
	}
	c.enqueue(b)
}

func (c *Conn) writer() {
	defer close(c.writerDone)
	tick := time.NewTimer(time.Second)
	defer tick.Stop()
	lastWrite := time.Now()
	for {
		c.outMu.Lock()
		batch, stop := c.out, c.outStop
		c.out, c.outBytes = nil, 0
		c.outMu.Unlock()
		if len(batch) > 0 {
			_ = c.nc.SetWriteDeadline(time.Now().Add(c.s.cfg.WriteTimeout))
			bufs := net.Buffers(batch)
			if _, err := bufs.WriteTo(c.nc); err != nil {
				c.log.Debug("amqp write failed", zap.Error(err))
				c.outMu.Lock()
				c.outStop = true
				c.out = nil
				c.outMu.Unlock()
				c.abort()
				return
			}
			lastWrite = time.Now()
			continue
		}
		if stop {
			return
		}
		select {
		case <-c.outSignal:
		case now := <-tick.C:
			// wake every second (token expiry), or every quarter heartbeat when that is shorter
			period := time.Second
			hb := time.Duration(c.heartbeat.Load())
			if hb > 0 && now.Sub(lastWrite) >= hb {
				c.enqueue(codec.AppendFrame(nil, codec.FrameAMQP, 0, nil))
			}
			if hb > 0 && hb/4 < period {
				period = hb / 4
			}
			tick.Reset(period)
			c.checkClaims()
		}
	}
}

// ---- reading

func (c *Conn) readHeader(deadline time.Time) ([8]byte, error) {
	var h [8]byte
	_ = c.nc.SetReadDeadline(deadline)
	_, err := io.ReadFull(c.br, h[:])
	return h, err
}

func (c *Conn) readFrame(deadline time.Time) (codec.FrameHeader, []byte, error) {
	h, err := c.readHeader(deadline)
	if err != nil {
		return codec.FrameHeader{}, nil, err
	}
	fh, err := codec.ParseFrameHeader(h, c.s.cfg.MaxFrameSize)
	if err != nil {
		return fh, nil, &codec.Error{Condition: codec.ErrFramingError, Description: err.Error()}
	}
	buf := make([]byte, fh.Size-8)
	if _, err := io.ReadFull(c.br, buf); err != nil {
		return fh, nil, err
	}
	return fh, buf[int(fh.DataOffset)*4-8:], nil
}

func (c *Conn) handshake() error {
	deadline := time.Now().Add(c.s.cfg.HandshakeTimeout)
	h, err := c.readHeader(deadline)
	if err != nil {
		return err
	}
	id, err := codec.ParseProtocolHeader(h)
	if err == nil && id == 3 {
		c.enqueue(codec.HeaderSASL[:])
		if err := c.sasl(deadline); err != nil {
			return err
		}
		if h, err = c.readHeader(deadline); err != nil {
			return err
		}
		id, err = codec.ParseProtocolHeader(h)
	}
	if err != nil || id != 0 {
		// answer with the header this server speaks, then close (§2.2)
		c.enqueue(codec.HeaderAMQP[:])
		c.closeReason = fmt.Sprintf("unsupported protocol header % x", h)
		return errors.New(c.closeReason)
	}
	c.enqueue(codec.HeaderAMQP[:])
	fh, body, err := c.readFrame(deadline)
	if err != nil {
		return c.connError(err)
	}
	p, _, err := codec.DecodeFrameBody(body)
	if err != nil {
		return c.connError(&codec.Error{Condition: codec.ErrDecodeError, Description: err.Error()})
	}
	open, ok := p.(*codec.Open)
	if !ok || fh.Type != codec.FrameAMQP {
		return c.connError(codec.Errorf(codec.ErrIllegalState, "expected open, got %T", p))
	}
	c.lock()
	c.peerMaxFrame = min(max(open.MaxFrameSize, codec.MinMaxFrameSize), 1<<20)
	c.unlock()
	if open.IdleTimeout > 0 {
		c.heartbeat.Store(int64(max(time.Duration(open.IdleTimeout)*time.Millisecond/2, 500*time.Millisecond)))
	}
	c.send(0, &codec.Open{
		ContainerID: "hubsim-" + c.s.cfg.HostName, Hostname: c.s.cfg.HostName,
		MaxFrameSize: c.s.cfg.MaxFrameSize, ChannelMax: c.s.cfg.ChannelMax,
		IdleTimeout: uint32(c.s.cfg.IdleTimeout / time.Millisecond),
	})
	return nil
}

// connError closes the connection with an AMQP error (a plain error just drops it).
func (c *Conn) connError(err error) error {
	var ae *codec.Error
	if errors.As(err, &ae) {
		c.lock()
		c.closeWith(ae)
		c.unlock()
	}
	return err
}

// closeWith sends close with err once. Call locked.
func (c *Conn) closeWith(err *codec.Error) {
	if c.closeSent {
		return
	}
	c.closeSent = true
	if err != nil {
		c.closeReason = err.Error()
		c.log.Info("amqp connection closed with an error", zap.String("error", err.Error()))
	}
	c.send(0, &codec.Close{Error: err})
}

func (c *Conn) sasl(deadline time.Time) error {
	c.sendFrame(codec.FrameSASL, 0, &codec.SASLMechanisms{Mechanisms: []codec.Symbol{"ANONYMOUS", "PLAIN", "MSSBCBS"}}, nil)
	fh, body, err := c.readFrame(deadline)
	if err != nil {
		return err
	}
	p, _, err := codec.DecodeFrameBody(body)
	init, ok := p.(*codec.SASLInit)
	if err != nil || !ok || fh.Type != codec.FrameSASL {
		c.sendFrame(codec.FrameSASL, 0, &codec.SASLOutcome{Code: codec.SASLSysPerm}, nil)
		c.closeReason = fmt.Sprintf("bad sasl-init: %v", err)
		return errors.New(c.closeReason)
	}
	code := codec.SASLOK
	switch init.Mechanism {
	case "ANONYMOUS", "MSSBCBS":
	case "PLAIN":
		if err := c.saslPlain(init.InitialResponse); err != nil {
			code = codec.SASLAuth
			c.closeReason = "SASL PLAIN refused: " + err.Error()
		}
	default:
		code = codec.SASLAuth
		c.closeReason = fmt.Sprintf("SASL mechanism %q is not offered", init.Mechanism)
	}
	c.sendFrame(codec.FrameSASL, 0, &codec.SASLOutcome{Code: code}, nil)
	if code != codec.SASLOK {
		return errors.New(c.closeReason)
	}
	return nil
}

// saslPlain accepts what Microsoft's C SDKs send: authcid "<policy>@sas.root.<hub>" with a SAS
// token as the password (a put-token for the hub), or a policy name with its key.
func (c *Conn) saslPlain(resp []byte) error {
	parts := bytes.Split(resp, []byte{0})
	if len(parts) != 3 {
		return errors.New("malformed PLAIN response")
	}
	user, pass := string(parts[1]), string(parts[2])
	now := c.s.cfg.Clock.Now()
	if _, hub, ok := strings.Cut(user, "@sas.root."); ok {
		cl, err := c.s.verify(hub, "servicebus.windows.net:sastoken", pass, now)
		if err != nil {
			return err
		}
		c.lock()
		c.claims[strings.ToLower(cl.Audience)] = cl
		c.unlock()
		return nil
	}
	if c.s.cfg.Policies == nil {
		return errors.New("no policies")
	}
	p, ok := c.s.cfg.Policies.Policy(user)
	if !ok || (pass != p.PrimaryKey && pass != p.SecondaryKey) {
		return errors.New("unknown policy or wrong key")
	}
	c.lock()
	c.claims["plain:"+user] = Claim{Kind: "iothub", Audience: c.s.cfg.HostName, Resource: c.s.cfg.HostName, KeyName: user,
		Rights: p.Rights, Expiry: now.Add(100 * 365 * 24 * time.Hour)}
	c.unlock()
	return nil
}

func (c *Conn) readLoop() error {
	for {
		// the client must send something within our idle time-out; half of it again is slack
		fh, body, err := c.readFrame(time.Now().Add(c.s.cfg.IdleTimeout * 3 / 2))
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				err = codec.Errorf(codec.ErrResourceLimit, "idle time-out of %s exceeded", c.s.cfg.IdleTimeout)
			}
			return c.connError(err)
		}
		if fh.Type != codec.FrameAMQP {
			return c.connError(codec.Errorf(codec.ErrFramingError, "SASL frame after the handshake"))
		}
		if len(body) == 0 {
			continue // heartbeat
		}
		p, payload, err := codec.DecodeFrameBody(body)
		if err != nil {
			return c.connError(&codec.Error{Condition: codec.ErrDecodeError, Description: err.Error()})
		}
		done, err := c.dispatch(fh.Channel, p, payload)
		if err != nil {
			return c.connError(err)
		}
		if done {
			return nil
		}
	}
}

// dispatch handles one performative; done means the client closed the connection.
func (c *Conn) dispatch(ch uint16, p codec.Performative, payload []byte) (bool, error) {
	if _, ok := p.(*codec.Transfer); !ok && len(payload) > 0 {
		return false, codec.Errorf(codec.ErrDecodeError, "bytes after a %T", p)
	}
	switch p := p.(type) {
	case *codec.Close:
		c.lock()
		c.closeSent = true
		c.send(0, &codec.Close{})
		if p.Error != nil {
			c.closeReason = "client: " + p.Error.Error()
		}
		c.unlock()
		return true, nil
	case *codec.Begin:
		return false, c.onBegin(ch, p)
	case *codec.Attach:
		return false, c.onAttach(ch, p)
	}
	c.lock()
	defer c.unlock()
	s := c.sessions[ch]
	if s == nil {
		return false, codec.Errorf(codec.ErrIllegalState, "%T on channel %d, which has no session", p, ch)
	}
	switch p := p.(type) {
	case *codec.Flow:
		return false, c.onFlow(s, p)
	case *codec.Transfer:
		return false, c.onTransfer(s, p, payload)
	case *codec.Disposition:
		c.onDisposition(s, p)
	case *codec.Detach:
		if l := s.links[p.Handle]; l != nil {
			c.detach(l, nil, p.Closed, false)
		}
	case *codec.End:
		c.endSession(s)
		c.send(ch, &codec.End{})
	default:
		return false, codec.Errorf(codec.ErrIllegalState, "unexpected %T", p)
	}
	return false, nil
}

func (c *Conn) onBegin(ch uint16, b *codec.Begin) error {
	c.lock()
	defer c.unlock()
	switch {
	case b.RemoteChannel != nil:
		return codec.Errorf(codec.ErrIllegalState, "begin answers a session this server never began")
	case c.sessions[ch] != nil:
		return codec.Errorf(codec.ErrIllegalState, "channel %d already has a session", ch)
	case ch > c.s.cfg.ChannelMax:
		return codec.Errorf(codec.ErrFramingError, "channel %d exceeds channel-max %d", ch, c.s.cfg.ChannelMax)
	}
	s := &session{ch: ch, remoteIncomingWindow: b.IncomingWindow, nextIncomingID: b.NextOutgoingID,
		incomingRemaining: sessionWindow, links: map[uint32]*Link{}, unsettled: map[uint32]*outDelivery{}}
	c.sessions[ch] = s
	rc := ch
	c.send(ch, &codec.Begin{RemoteChannel: &rc, NextOutgoingID: 0, IncomingWindow: sessionWindow,
		OutgoingWindow: sessionWindow, HandleMax: handleMax})
	return nil
}

// endSession detaches every link of s and forgets it. Call locked.
func (c *Conn) endSession(s *session) {
	for _, l := range s.links {
		c.detach(l, nil, true, true)
	}
	delete(c.sessions, s.ch)
}

// flowFields fills a flow's session fields. Call locked.
func (s *session) flow(f *codec.Flow) *codec.Flow {
	nid := s.nextIncomingID
	f.NextIncomingID = &nid
	f.IncomingWindow = s.incomingRemaining
	f.NextOutgoingID = s.nextOutgoingID
	f.OutgoingWindow = sessionWindow
	return f
}

func (c *Conn) onFlow(s *session, f *codec.Flow) error {
	var nin uint32
	if f.NextIncomingID != nil {
		nin = *f.NextIncomingID
	}
	s.remoteIncomingWindow = nin + f.IncomingWindow - s.nextOutgoingID
	if f.IncomingWindow < s.remoteIncomingWindow { // wrapped: the client counts ahead of us
		s.remoteIncomingWindow = 0
	}
	if f.Handle != nil {
		l := s.links[*f.Handle]
		if l == nil {
			return nil // a flow racing our detach
		}
		if !l.ClientSends {
			dc := uint32(0)
			if f.DeliveryCount != nil {
				dc = *f.DeliveryCount
			}
			if f.LinkCredit != nil {
				l.sendCredit = dc + *f.LinkCredit - l.sendDeliveryCount
				if l.sendCredit > 1<<30 { // the client counts from a delivery count ahead of ours
					l.sendCredit = 0
				}
			}
			l.drain = f.Drain
			select {
			case l.creditSignal <- struct{}{}:
			default:
			}
		}
		if f.Echo {
			c.sendLinkFlow(l)
		}
	} else if f.Echo {
		c.send(s.ch, s.flow(&codec.Flow{}))
	}
	for _, l := range s.links {
		if !l.ClientSends {
			c.pump(l)
		}
	}
	return nil
}

// sendLinkFlow tells the client the link's state. Call locked.
func (c *Conn) sendLinkFlow(l *Link) {
	h := l.handle
	f := &codec.Flow{Handle: &h}
	if l.ClientSends {
		dc, cr := l.deliveryCount, l.credit
		f.DeliveryCount, f.LinkCredit = &dc, &cr
	} else {
		dc, cr := l.sendDeliveryCount, l.sendCredit
		avail := uint32(len(l.pending))
		f.DeliveryCount, f.LinkCredit, f.Available, f.Drain = &dc, &cr, &avail, l.drain
	}
	c.send(l.sess.ch, l.sess.flow(f))
}

func (c *Conn) onTransfer(s *session, t *codec.Transfer, payload []byte) error {
	if s.incomingRemaining == 0 {
		return codec.Errorf(codec.ErrWindowViolation, "transfer beyond the session's incoming window")
	}
	s.nextIncomingID++
	s.incomingRemaining--
	if s.incomingRemaining < sessionWindow/2 {
		s.incomingRemaining = sessionWindow
		c.send(s.ch, s.flow(&codec.Flow{}))
	}
	l := s.links[t.Handle]
	if l == nil {
		return nil // transfers racing our detach are dropped
	}
	if !l.ClientSends {
		return codec.Errorf(codec.ErrIllegalState, "transfer on link %q, on which this server sends", l.Name)
	}
	if l.partial == nil {
		if t.DeliveryID == nil {
			return codec.Errorf(codec.ErrInvalidField, "first transfer of a delivery without delivery-id")
		}
		if l.credit == 0 {
			c.detach(l, codec.Errorf(codec.ErrTransferLimit, "transfer without link credit"), true, true)
			return nil
		}
		l.credit--
		l.deliveryCount++
		l.partial = &Delivery{link: l, id: *t.DeliveryID, Tag: t.DeliveryTag, clientSettled: t.Settled}
	}
	d := l.partial
	if t.Aborted {
		l.partial = nil
		return nil
	}
	d.clientSettled = d.clientSettled || t.Settled
	if uint64(len(d.Raw)+len(payload)) > l.maxMessageSize {
		l.partial = nil
		c.detach(l, codec.Errorf(codec.ErrMessageSizeExceeded, "message larger than %d bytes", l.maxMessageSize), true, true)
		return nil
	}
	d.Raw = append(d.Raw, payload...)
	if t.More {
		return nil
	}
	l.partial = nil
	if !d.clientSettled {
		l.unsettledIn++
	}
	c.refill(l)
	if l.require != nil && !c.authorized(l.require) {
		c.detach(l, codec.Errorf(codec.ErrUnauthorizedAccess, "the token for this link has expired"), true, true)
		return nil
	}
	m := new(codec.Message)
	if err := m.UnmarshalBinary(d.Raw); err != nil {
		c.settle(d, &codec.Rejected{Error: codec.Errorf(codec.ErrDecodeError, "%v", err)})
		return nil
	}
	d.Message = m
	if fn := l.OnMessage; fn != nil {
		c.later(func() { fn(d) })
	} else {
		c.settle(d, &codec.Rejected{Error: codec.Errorf(codec.ErrNotAllowed, "this node accepts no messages")})
	}
	return nil
}

// settle sends the outcome of a delivery the client sent. Call locked.
func (c *Conn) settle(d *Delivery, st codec.DeliveryState) {
	if d.settled || d.link.detached {
		return
	}
	d.settled = true
	if d.clientSettled {
		return
	}
	c.send(d.link.sess.ch, &codec.Disposition{Role: codec.RoleReceiver, First: d.id, Settled: true, State: st})
	d.link.unsettledIn--
	c.refill(d.link)
}

// refill tops up a sending client's credit once half the window is used by deliveries
// received and not yet settled: credit is never granted beyond Credit unsettled deliveries.
// Call locked.
func (c *Conn) refill(l *Link) {
	if l.detached || l.Credit <= l.unsettledIn || l.credit+l.unsettledIn > l.Credit/2 {
		return
	}
	l.credit = l.Credit - l.unsettledIn
	c.sendLinkFlow(l)
}

func (c *Conn) onDisposition(s *session, d *codec.Disposition) {
	if d.Role != codec.RoleReceiver {
		return // the client settling what it sent: this server settles first
	}
	last := d.First
	if d.Last != nil {
		last = *d.Last
	}
	for id, od := range s.unsettled {
		if id-d.First > last-d.First {
			continue
		}
		st := d.State
		switch st.(type) {
		case *codec.Accepted, *codec.Rejected, *codec.Released, *codec.Modified:
		default:
			if !d.Settled {
				continue // progress only (received)
			}
			st = &codec.Released{}
		}
		delete(s.unsettled, id)
		if !d.Settled {
			c.send(s.ch, &codec.Disposition{Role: codec.RoleSender, First: id, Settled: true, State: st})
		}
		if od.done != nil {
			done := od.done
			c.later(func() { done(st, nil) })
		}
	}
}

// pump sends what a link has pending while credit and the session window allow. Call locked.
func (c *Conn) pump(l *Link) {
	s := l.sess
	for l.attached && !l.detached && len(l.pending) > 0 && l.sendCredit > 0 {
		d := l.pending[0]
		room := int(c.peerMaxFrame) - 8 - 80 // the transfer performative with a 32-byte tag
		frames := max(1, (len(d.payload)+room-1)/room)
		if s.remoteIncomingWindow < uint32(frames) {
			break
		}
		l.pending = l.pending[1:]
		id := s.nextDeliveryID
		s.nextDeliveryID++
		tag := d.tag
		if tag == nil {
			tag = binary.BigEndian.AppendUint32(nil, id)
		}
		settled := l.Attach.SndSettleMode == codec.SndSettled
		format := uint32(0)
		for i := range frames {
			chunk := d.payload[min(i*room, len(d.payload)):min((i+1)*room, len(d.payload))]
			t := &codec.Transfer{Handle: l.handle, Settled: settled, More: i < frames-1}
			if i == 0 {
				did := id
				t.DeliveryID, t.DeliveryTag, t.MessageFormat = &did, tag, &format
			}
			c.sendFrame(codec.FrameAMQP, s.ch, t, chunk)
			s.nextOutgoingID++
			s.remoteIncomingWindow--
		}
		l.sendDeliveryCount++
		l.sendCredit--
		if settled {
			if d.done != nil {
				done := d.done
				c.later(func() { done(&codec.Accepted{}, nil) })
			}
		} else {
			d.id = id
			s.unsettled[id] = d
		}
	}
	if l.drain && len(l.pending) == 0 && l.attached && !l.detached {
		l.sendDeliveryCount += l.sendCredit
		l.sendCredit = 0
		c.sendLinkFlow(l)
		l.drain = false
	}
}

// detach ends a link: it fails what is pending, cancels the link's context and, when the
// server initiates (or answers), sends detach. Call locked.
func (c *Conn) detach(l *Link, err *codec.Error, closed, serverInitiated bool) {
	if l.detached {
		return
	}
	l.detached = true
	delete(l.sess.links, l.handle)
	l.cancel()
	fail := errLinkDetached
	if err != nil {
		fail = err
	}
	for _, d := range l.pending {
		if d.done != nil {
			done := d.done
			c.later(func() { done(nil, fail) })
		}
	}
	l.pending = nil
	for id, d := range l.sess.unsettled {
		if d.link == l {
			delete(l.sess.unsettled, id)
			if d.done != nil {
				done := d.done
				c.later(func() { done(nil, fail) })
			}
		}
	}
	if !c.closeSent {
		c.send(l.sess.ch, &codec.Detach{Handle: l.handle, Closed: closed, Error: err})
	}
	if err != nil && serverInitiated {
		c.s.emit(Event{Kind: "detached", Remote: c.remote, Address: l.Address, Reason: err.Error()})
	}
}

// authorized reports whether an unexpired claim satisfies pred. Call locked.
func (c *Conn) authorized(pred func(Claim) bool) bool {
	now := c.s.cfg.Clock.Now()
	for _, cl := range c.claims {
		if now.Before(cl.Expiry) && pred(cl) {
			return true
		}
	}
	return false
}

// checkClaims detaches links whose claims have expired.
func (c *Conn) checkClaims() {
	c.lock()
	defer c.unlock()
	for _, s := range c.sessions {
		for _, l := range s.links {
			if l.require != nil && !c.authorized(l.require) {
				c.detach(l, codec.Errorf(codec.ErrUnauthorizedAccess, "the token for this link has expired"), true, true)
			}
		}
	}
}
