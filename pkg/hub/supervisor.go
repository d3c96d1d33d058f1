package hub

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// cleanQuiesce is how long a clean disconnect waits for DISCONNECT to be written (paho returns
// as soon as it is).
const cleanQuiesce = 1000

// conn is one MQTT connection: a fresh paho client per connection, so nothing (message ids,
// tokens, stored publishes) leaks from one connection into the next.
type conn struct {
	s      *Session
	client paho.Client
	epoch  uint64

	lost     chan struct{}
	lostOnce sync.Once
	lostErr  error

	netMu   sync.Mutex
	netConn net.Conn
	dialErr error

	// Guarded by s.mu.
	methods  map[string]struct{}
	draining bool
	// answered remembers the last maxPendingMethods $rids answered on this connection, so a
	// request delivered again after its answer is not answered twice.
	answered    map[string]struct{}
	answeredFIF []string

	expiry  time.Time // SAS token expiry; zero for X.509
	renewAt time.Time
}

type endReason uint8

const (
	endLost endReason = iota
	endRenew
	endClose
)

var errPubackTimeout = errors.New("hub: no PUBACK within the operation timeout")

// supervise is the session's connection goroutine: it owns connecting, backoff, renewal and
// the telemetry queue.
func (s *Session) supervise() {
	defer s.wg.Done()
	var (
		fatal        error
		attempt      int
		failingSince time.Time
	)
	defer func() { s.finish(fatal) }()
	for {
		if s.shouldStop() {
			return
		}
		c, err := s.connectOnFreshStack()
		if err != nil {
			if errors.Is(err, errAborted) {
				return
			}
			s.stats.connectFailures.Add(1)
			st := Status{State: DisconnectedRetrying, Reason: classify(err), Err: err}
			switch {
			case errors.Is(err, ErrNotAuthorized), errors.Is(err, ErrConnectionRefused):
				fatal = err
				s.setStatus(Status{State: Disconnected, Reason: BadCredential, Err: err})
				return
			case errors.Is(err, ErrTLSVerify):
				fatal = err
				s.setStatus(Status{State: Disconnected, Reason: CommunicationError, Err: err})
				return
			}
			now := s.clock.Now()
			if failingSince.IsZero() {
				failingSince = now
			}
			if s.cfg.RetryTimeout > 0 && now.Sub(failingSince) >= s.cfg.RetryTimeout {
				fatal = fmt.Errorf("%w after %v: %w", ErrRetryExpired, s.cfg.RetryTimeout, err)
				s.setStatus(Status{State: Disconnected, Reason: RetryExpired, Err: fatal})
				return
			}
			st.RetryIn = s.backoff.Delay(attempt, s.cfg.Rand())
			attempt++
			st.Attempt = attempt
			s.setStatus(st)
			if !s.sleep(st.RetryIn) {
				return
			}
			continue
		}
		failingSince = time.Time{}
		upAt := s.clock.Now()
		s.stats.connects.Add(1)
		s.setStatus(Status{State: Connected, Reason: ConnectionOK})
		why, err := s.serve(c)
		s.teardown(c, why, err)
		switch why {
		case endClose:
			return
		case endRenew:
			s.stats.renewals.Add(1)
			s.setStatus(Status{State: DisconnectedRetrying, Reason: ExpiredSASToken})
			continue // reconnect at once: planned, not a failure
		}
		s.stats.connLost.Add(1)
		if s.clock.Now().Sub(upAt) >= StableAfter {
			attempt = 0
		}
		delay := s.backoff.Delay(attempt, s.cfg.Rand())
		attempt++
		s.setStatus(Status{State: DisconnectedRetrying, Reason: CommunicationError, Err: err,
			Attempt: attempt, RetryIn: delay})
		if !s.sleep(delay) {
			return
		}
	}
}

var errAborted = errors.New("hub: aborted by Close")

// classify maps a connection error to the SDKs' reason.
func classify(err error) Reason {
	var ne *dialError
	switch {
	case errors.Is(err, ErrNotAuthorized), errors.Is(err, ErrConnectionRefused):
		return BadCredential
	case errors.As(err, &ne):
		return NoNetwork
	}
	return CommunicationError
}

// dialError marks a failure to open the TCP connection.
type dialError struct{ err error }

func (e *dialError) Error() string { return e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// shouldStop reports whether Close has asked to stop and nothing is left to deliver, or the
// drain deadline has passed.
func (s *Session) shouldStop() bool {
	select {
	case <-s.abortCh:
		return true
	default:
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing && s.qlen.Load() == 0
}

// sleep waits d, failing expired messages meanwhile. false means stop.
func (s *Session) sleep(d time.Duration) bool {
	until := s.clock.Now().Add(d)
	closeCh := s.closeCh
	for {
		now := s.clock.Now()
		if !now.Before(until) {
			return true
		}
		s.pullIncoming()
		s.expire(now)
		if closeCh == nil && s.shouldStop() {
			return false
		}
		at := until
		if !s.nextExpiry.IsZero() && s.nextExpiry.Before(at) {
			at = s.nextExpiry
		}
		select {
		case <-s.arm(at):
		case <-s.wake:
		case <-closeCh:
			closeCh = nil
		case <-s.abortCh:
			return false
		}
	}
}

// arm sets the supervisor's timer to fire at at (never if zero) and returns its channel.
func (s *Session) arm(at time.Time) <-chan time.Time {
	if at.IsZero() {
		s.timer.Stop()
		return nil
	}
	d := at.Sub(s.clock.Now())
	if d < 0 {
		d = 0
	}
	s.timer.Reset(d)
	return s.timer.C()
}

// connect makes one connection attempt: dial, TLS, CONNECT/CONNACK, SUBSCRIBE/SUBACK. On success
// the connection is current and ready for publishing.
// connectOnFreshStack runs connect on a short-lived goroutine and waits for it. A connect goes
// deep (SAS signing, paho set-up, TLS, the CONNACK and SUBACK waits) and would leave the
// supervisor's stack grown for the life of the connection; in a fleet of thousands of idle
// devices that is most of a session's memory beyond paho's own.
func (s *Session) connectOnFreshStack() (*conn, error) {
	type result struct {
		c   *conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := s.connect()
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func (s *Session) connect() (*conn, error) {
	s.epoch++
	c := &conn{s: s, epoch: s.epoch, lost: make(chan struct{}), methods: make(map[string]struct{})}
	cfg := &s.cfg
	opts := paho.NewClientOptions()
	opts.AddBroker("ssl://" + cfg.Address)
	opts.SetClientID(cfg.ClientID())
	opts.SetUsername(cfg.Username())
	if cfg.Signer != nil {
		now := s.clock.Now()
		// Round the expiry up to a whole second (se has second precision), so the token lives at
		// least TokenTTL, and plan the renewal on the lifetime actually granted.
		expiry := now.Add(cfg.TokenTTL).Truncate(time.Second)
		if expiry.Before(now.Add(cfg.TokenTTL)) {
			expiry = expiry.Add(time.Second)
		}
		ctx, cancel := context.WithTimeout(s.handlerCtx, cfg.OperationTimeout)
		token, err := sas.Build(ctx, cfg.Signer, sas.Params{Resource: cfg.Resource(), KeyName: cfg.KeyName, Expiry: expiry})
		cancel()
		if err != nil {
			return nil, fmt.Errorf("hub: build SAS token: %w", err)
		}
		opts.SetPassword(token)
		c.expiry = expiry
		c.renewAt = now.Add(time.Duration(cfg.RenewAt * float64(expiry.Sub(now))))
	}
	opts.SetCleanSession(false)
	opts.SetAutoReconnect(false)
	opts.SetConnectRetry(false)
	opts.SetResumeSubs(false)
	opts.SetProtocolVersion(4) // explicit: no silent fallback to MQTT 3.1 after a refusal
	opts.SetKeepAlive(cfg.KeepAlive)
	opts.SetPingTimeout(min(cfg.OperationTimeout, 30*time.Second))
	opts.SetConnectTimeout(cfg.OperationTimeout)
	opts.SetWriteTimeout(cfg.OperationTimeout)
	opts.SetOrderMatters(true) // handlers run inline in paho's router; ours never block
	opts.SetAutoAckDisabled(true)
	opts.SetDefaultPublishHandler(c.onMessage)
	opts.SetConnectionLostHandler(c.onLost)
	dialCtx, dialCancel := context.WithTimeout(s.handlerCtx, cfg.OperationTimeout)
	defer dialCancel()
	opts.SetCustomOpenConnectionFn(func(*url.URL, paho.ClientOptions) (net.Conn, error) {
		return c.open(dialCtx)
	})
	c.client = paho.NewClient(opts)
	s.log.Debug("connecting", zap.String("address", cfg.Address), zap.String("username", cfg.Username()))

	tok := c.client.Connect()
	closeCh := s.closeCh
	for waiting := true; waiting; {
		select {
		case <-tok.Done():
			waiting = false
			continue
		case <-closeCh:
			closeCh = nil
			if s.qlen.Load() > 0 {
				continue // connect to drain the queue
			}
		case <-s.abortCh:
		}
		// Closing with nothing to deliver, or out of time: abandon the attempt.
		dialCancel()
		c.closeNet()
		<-tok.Done()
		if tok.Error() == nil {
			c.client.Disconnect(0)
		}
		return nil, errAborted
	}
	if err := tok.Error(); err != nil {
		ct, _ := tok.(*paho.ConnectToken)
		if ct != nil && ct.ReturnCode() >= 1 && ct.ReturnCode() <= 5 {
			return nil, &ConnackError{Code: ct.ReturnCode()}
		}
		if derr := c.dialError(); derr != nil {
			return nil, derr
		}
		return nil, fmt.Errorf("hub: connect: %w", err)
	}

	filters := map[string]byte{
		wire.TwinResponseFilter: 0,
		wire.TwinDesiredFilter:  0,
		wire.MethodsFilter:      0,
	}
	if cfg.ModuleID == "" {
		filters[wire.C2DFilter(cfg.DeviceID)] = 1
	}
	st := c.client.SubscribeMultiple(filters, nil)
	var serr error
	select {
	case <-st.Done():
		serr = st.Error()
		if serr == nil {
			if stok, ok := st.(*paho.SubscribeToken); ok {
				for f, code := range stok.Result() {
					if code == 0x80 {
						serr = fmt.Errorf("hub: subscription to %s refused", f)
					}
				}
			}
		}
	case <-c.lost:
		serr = c.lostErr
	case <-s.arm(s.clock.Now().Add(cfg.OperationTimeout)):
		serr = errors.New("hub: no SUBACK within the operation timeout")
	case <-s.abortCh:
		c.client.Disconnect(0)
		return nil, errAborted
	}
	if serr != nil {
		c.client.Disconnect(0)
		return nil, fmt.Errorf("hub: subscribe: %w", serr)
	}
	s.mu.Lock()
	s.cur = c
	if !s.upClosed {
		close(s.upCh)
		s.upClosed = true
	}
	s.mu.Unlock()
	return c, nil
}

// open dials TCP and completes the TLS handshake, and for mqtt-ws the WebSocket upgrade
// (paho's CustomOpenConnectionFn).
func (c *conn) open(ctx context.Context) (net.Conn, error) {
	s := c.s
	dial := s.cfg.Dial
	if s.cfg.Transport == TransportMQTTWS {
		dial = func(ctx context.Context, _, addr string) (net.Conn, error) { return s.cfg.dialTunnel(ctx, addr) }
	}
	raw, err := dial(ctx, "tcp", s.cfg.Address)
	if err != nil {
		err = &dialError{fmt.Errorf("hub: dial %s: %w", s.cfg.Address, err)}
		c.setDialErr(err)
		return nil, err
	}
	tc := tls.Client(raw, s.tlsConf)
	c.netMu.Lock()
	c.netConn = tc
	c.netMu.Unlock()
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		if isVerifyError(err) {
			err = fmt.Errorf("%w for %q (check the CA file and host name): %w", ErrTLSVerify, s.cfg.ServerName, err)
		} else {
			err = fmt.Errorf("hub: TLS handshake with %s: %w", s.cfg.Address, err)
		}
		c.setDialErr(err)
		return nil, err
	}
	if s.cfg.Transport == TransportMQTTWS {
		ws, err := s.cfg.upgradeWS(ctx, tc)
		if err != nil {
			_ = raw.Close()
			err = &dialError{fmt.Errorf("hub: %w", err)}
			c.setDialErr(err)
			return nil, err
		}
		return ws, nil
	}
	return tc, nil
}

func isVerifyError(err error) bool {
	var (
		cve *tls.CertificateVerificationError
		ua  x509.UnknownAuthorityError
		he  x509.HostnameError
		ci  x509.CertificateInvalidError
	)
	return errors.As(err, &cve) || errors.As(err, &ua) || errors.As(err, &he) || errors.As(err, &ci)
}

func (c *conn) setDialErr(err error) {
	c.netMu.Lock()
	c.dialErr = err
	c.netMu.Unlock()
}

func (c *conn) dialError() error {
	c.netMu.Lock()
	defer c.netMu.Unlock()
	return c.dialErr
}

func (c *conn) closeNet() {
	c.netMu.Lock()
	defer c.netMu.Unlock()
	if c.netConn != nil {
		_ = c.netConn.Close()
	}
}

// onLost is paho's connection-lost callback: it only signals the supervisor.
func (c *conn) onLost(_ paho.Client, err error) {
	c.lostOnce.Do(func() {
		c.lostErr = fmt.Errorf("hub: connection lost: %w", err)
		close(c.lost)
	})
}

// onMessage is paho's handler for every inbound publish. It runs on paho's router goroutine and
// never blocks: it parses, hands over through bounded queues and acknowledges.
func (c *conn) onMessage(_ paho.Client, m paho.Message) {
	s := c.s
	t, err := wire.Parse(m.Topic())
	if err != nil {
		s.stats.badTopics.Add(1)
		s.log.Debug("message on an unexpected topic dropped", zap.Error(err))
		m.Ack()
		return
	}
	switch t.Kind {
	case wire.KindTwinResponse:
		s.mu.Lock()
		p := s.pending[t.RequestID]
		if p != nil && p.c == c {
			delete(s.pending, t.RequestID)
		} else {
			p = nil
		}
		draining := c.draining
		s.mu.Unlock()
		if p == nil {
			s.stats.unknownResponses.Add(1)
			s.log.Debug("twin response for an unknown $rid dropped", zap.String("rid", t.RequestID), zap.Int("status", t.Status))
		} else {
			p.ch <- reqResult{resp: Response{RequestID: t.RequestID, Status: t.Status, Version: t.Version,
				HasVersion: t.HasVersion, Body: m.Payload()}}
			if draining {
				s.poke()
			}
		}
	case wire.KindC2D:
		if !s.pushInbound(event{c2d: newC2D(m.Topic(), t, m.Payload())}) {
			// Not acknowledged: the hub delivers it again after a reconnect.
			s.log.Warn("inbound queue full: cloud-to-device message left unacknowledged")
			return
		}
	case wire.KindTwinDesired:
		if !s.pushInbound(event{desired: &DesiredPatch{Version: t.Version, Body: m.Payload()}}) {
			s.log.Warn("inbound queue full: desired patch dropped", zap.Int64("version", t.Version))
		}
	case wire.KindMethodRequest:
		s.mu.Lock()
		dead := c.methods == nil
		_, dup := c.methods[t.RequestID]
		if _, done := c.answered[t.RequestID]; done {
			dup = true
		}
		full := len(c.methods) >= maxPendingMethods
		if !dead && !dup && !full {
			c.methods[t.RequestID] = struct{}{}
		}
		s.mu.Unlock()
		switch {
		case dead:
			s.log.Debug("method request on a closed connection dropped", zap.String("rid", t.RequestID))
		case dup:
			s.log.Debug("duplicate method request ignored", zap.String("rid", t.RequestID))
		case full:
			s.stats.droppedInbound.Add(1)
			s.log.Warn("too many unanswered method requests: request dropped", zap.String("method", t.Method))
		default:
			if !s.pushInbound(event{method: &MethodRequest{Name: t.Method, RequestID: t.RequestID, Payload: m.Payload()}}) {
				s.mu.Lock()
				delete(c.methods, t.RequestID)
				s.mu.Unlock()
				s.log.Warn("inbound queue full: method request dropped", zap.String("method", t.Method))
			}
		}
	default:
		s.stats.badTopics.Add(1)
	}
	m.Ack()
}

// serve runs a live connection: it publishes queued telemetry in order with up to MaxInFlight
// awaiting PUBACK, watches for loss, renewal time, message expiry and Close.
func (s *Session) serve(c *conn) (endReason, error) {
	closeCh := s.closeCh
	renewing := false
	var renewDeadline time.Time
	timeout := s.cfg.OperationTimeout
	for {
		now := s.clock.Now()
		s.pullIncoming()
		s.expire(now)
		if err := s.reapAcks(); err != nil {
			return endLost, err
		}
		if s.inflight > 0 && !now.Before(s.out[0].sentAt.Add(timeout)) {
			return endLost, errPubackTimeout
		}
		if closeCh == nil && len(s.out) == 0 {
			return endClose, nil
		}
		if !renewing && !c.renewAt.IsZero() && !now.Before(c.renewAt) {
			renewing = true
			renewDeadline = now.Add(min(timeout, c.expiry.Sub(now)/2))
			s.mu.Lock()
			c.draining = true
			if s.upClosed {
				s.upCh = make(chan struct{})
				s.upClosed = false
			}
			s.mu.Unlock()
			s.log.Debug("renewing SAS token", zap.Time("expiry", c.expiry))
		}
		if renewing && (!now.Before(renewDeadline) || s.inflight == 0 && s.quiescent(c)) {
			return endRenew, nil
		}
		if !renewing {
			s.publishMore(c, now)
		}
		var at time.Time
		earliest := func(t time.Time) {
			if !t.IsZero() && (at.IsZero() || t.Before(at)) {
				at = t
			}
		}
		if renewing {
			earliest(renewDeadline)
		} else {
			earliest(c.renewAt)
		}
		var headDone <-chan struct{}
		if s.inflight > 0 {
			headDone = s.out[0].tok.Done()
			earliest(s.out[0].sentAt.Add(timeout))
		}
		earliest(s.nextExpiry)
		select {
		case <-c.lost:
			return endLost, c.lostErr
		case <-headDone:
		case <-s.wake:
		case <-closeCh:
			closeCh = nil
		case <-s.abortCh:
			return endClose, nil
		case <-s.arm(at):
		}
	}
}

// quiescent reports whether nothing awaits an answer on c (twin requests or method responses).
func (s *Session) quiescent(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(c.methods) > 0 {
		return false
	}
	for _, p := range s.pending {
		if p.c == c {
			return false
		}
	}
	return true
}

// publishMore publishes queued messages until MaxInFlight await PUBACK.
func (s *Session) publishMore(c *conn, now time.Time) {
	for s.inflight < len(s.out) && s.inflight < s.cfg.MaxInFlight {
		m := s.out[s.inflight]
		if m.canceled.Load() {
			s.out = append(s.out[:s.inflight], s.out[s.inflight+1:]...)
			s.complete(m, ErrCanceled)
			continue
		}
		m.tok = c.client.Publish(m.topic, 1, false, m.body)
		m.sentAt = now
		s.inflight++
	}
}

// reapAcks completes messages at the head whose PUBACK has arrived, in order.
func (s *Session) reapAcks() error {
	for s.inflight > 0 {
		m := s.out[0]
		select {
		case <-m.tok.Done():
		default:
			return nil
		}
		if err := m.tok.Error(); err != nil {
			return fmt.Errorf("hub: publish: %w", err)
		}
		s.out[0] = nil
		s.out = s.out[1:]
		s.inflight--
		s.complete(m, nil)
	}
	return nil
}

// complete reports a message's outcome.
func (s *Session) complete(m *outMsg, err error) {
	s.qlen.Add(-1)
	if err == nil {
		s.stats.sent.Add(1)
	} else {
		s.stats.failed.Add(1)
	}
	if m.done != nil {
		m.done(err)
	}
}

// pullIncoming moves newly accepted messages into the supervisor's queue.
func (s *Session) pullIncoming() {
	s.mu.Lock()
	in := s.incoming
	s.incoming = nil
	s.mu.Unlock()
	for _, m := range in {
		if !m.deadline.IsZero() && (s.nextExpiry.IsZero() || m.deadline.Before(s.nextExpiry)) {
			s.nextExpiry = m.deadline
		}
	}
	s.out = append(s.out, in...)
}

// expire fails messages that are not in flight on the live connection and whose deadline has
// passed, and withdraws canceled ones; it recomputes nextExpiry.
func (s *Session) expire(now time.Time) {
	canceled := s.cancelPending.Swap(false)
	if !canceled && (s.nextExpiry.IsZero() || now.Before(s.nextExpiry)) {
		return
	}
	s.nextExpiry = time.Time{}
	kept := s.out[:s.inflight]
	for _, m := range s.out[s.inflight:] {
		switch {
		case m.canceled.Load():
			s.complete(m, ErrCanceled)
		case !m.deadline.IsZero() && !now.Before(m.deadline):
			s.complete(m, fmt.Errorf("%w (deadline %s)", ErrMessageExpired, m.deadline.Format(time.RFC3339Nano)))
		default:
			kept = append(kept, m)
			if !m.deadline.IsZero() && (s.nextExpiry.IsZero() || m.deadline.Before(s.nextExpiry)) {
				s.nextExpiry = m.deadline
			}
		}
	}
	clear(s.out[len(kept):])
	s.out = kept
}

// teardown ends connection c: disconnects it unless it is already gone, fails requests pending
// on it, forgets its method requests and puts its unacknowledged messages back at the head of
// the queue (they are re-sent on the next connection: at-least-once).
func (s *Session) teardown(c *conn, why endReason, err error) {
	select {
	case <-c.lost:
	default:
		if why == endLost {
			c.client.Disconnect(0)
		} else {
			c.client.Disconnect(cleanQuiesce)
		}
	}
	if why == endLost && err != nil {
		s.log.Debug("connection ended", zap.Error(err))
	}
	var failed []*pendingReq
	s.mu.Lock()
	if s.cur == c {
		s.cur = nil
	}
	if s.upClosed {
		s.upCh = make(chan struct{})
		s.upClosed = false
	}
	c.methods = nil
	for rid, p := range s.pending {
		if p.c == c {
			delete(s.pending, rid)
			failed = append(failed, p)
		}
	}
	s.mu.Unlock()
	for _, p := range failed {
		p.ch <- reqResult{err: ErrConnectionLost}
	}
	for _, m := range s.out[:s.inflight] {
		m.tok = nil
	}
	s.inflight = 0
	// Messages that were in flight may have passed their deadline meanwhile.
	for _, m := range s.out {
		if !m.deadline.IsZero() && (s.nextExpiry.IsZero() || m.deadline.Before(s.nextExpiry)) {
			s.nextExpiry = m.deadline
		}
	}
}

// finish runs when the supervisor stops: it fails everything still held, reports the final
// status and stops taking handler events (a running dispatcher drains what is queued).
func (s *Session) finish(fatal error) {
	s.timer.Stop()
	s.mu.Lock()
	s.stopped = true
	s.err = fatal
	closing := s.closing
	in := s.incoming
	s.incoming = nil
	var failed []*pendingReq
	for rid, p := range s.pending {
		delete(s.pending, rid)
		failed = append(failed, p)
	}
	s.mu.Unlock()
	s.out = append(s.out, in...)
	reason := fmt.Errorf("%w: not delivered before the shutdown deadline", ErrClosed)
	if fatal != nil {
		reason = fmt.Errorf("hub: session stopped: %w", fatal)
	}
	n := len(s.out)
	for _, m := range s.out {
		s.complete(m, reason)
	}
	s.out, s.inflight = nil, 0
	for _, p := range failed {
		p.ch <- reqResult{err: ErrClosed}
	}
	if n > 0 {
		s.log.Warn("telemetry messages failed at shutdown", zap.Int("count", n), zap.Error(reason))
	}
	s.mu.Lock()
	if closing && fatal == nil {
		s.undelivered = n
	}
	s.mu.Unlock()
	if fatal == nil {
		s.setStatus(Status{State: Disabled, Reason: ClientClose})
	}
	s.handlerCancel()
	s.evMu.Lock()
	s.evStopped = true
	s.evMu.Unlock()
	close(s.done)
}
