package hub

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/wire"
)

// maxPendingRequests bounds twin requests awaiting an answer; maxPendingMethods bounds method
// requests awaiting RespondMethod on one connection; maxStatusEvents bounds status events
// waiting for OnStatus (the oldest is dropped first).
const (
	maxPendingRequests = 1024
	maxPendingMethods  = 128
	maxStatusEvents    = 64
)

// Session is one device's IoT Hub session. Create it with New; it connects in the background
// and keeps connecting until Close or a non-recoverable error (see Done and Err). All methods
// are safe for concurrent use.
type Session struct {
	cfg     Config
	log     *zap.Logger
	tlsConf *tls.Config
	backoff Backoff
	clock   Clock

	closeCh   chan struct{} // closed by Close: drain, then stop
	abortCh   chan struct{} // closed when Close's context ends: stop now
	closeOnce sync.Once
	abortOnce sync.Once
	done      chan struct{} // closed when the supervisor has finished
	wg        sync.WaitGroup

	handlerCtx    context.Context
	handlerCancel context.CancelFunc

	wake chan struct{} // cap 1: telemetry or request state changed

	mu          sync.Mutex
	cur         *conn // connected and subscribed; nil otherwise
	upCh        chan struct{}
	upClosed    bool
	pending     map[string]*pendingReq
	incoming    []*outMsg
	closing     bool
	stopped     bool
	err         error // terminal error (nil after Close)
	status      Status
	undelivered int // messages failed by Close

	qlen atomic.Int64
	rid  atomic.Uint64

	// Owned by the supervisor goroutine.
	out        []*outMsg // head: in flight on the current connection (inflight of them)
	inflight   int
	nextExpiry time.Time
	timer      Timer
	epoch      uint64
	// cancelPending asks the supervisor to withdraw canceled messages.
	cancelPending atomic.Bool

	// Dispatcher queue. The dispatcher goroutine runs only while events are waiting: an idle
	// device (the common case in a fleet) costs no goroutine for it.
	evMu        sync.Mutex
	events      []event
	inboundN    int
	statusN     int
	dispRunning bool // a dispatcher goroutine is draining events
	evStopped   bool // the session has finished: no more events are taken
	stats       stats
}

type stats struct {
	connects, connectFailures, renewals, connLost atomic.Uint64
	sent, failed, rejected                        atomic.Uint64
	unknownResponses, droppedInbound, badTopics   atomic.Uint64
	droppedStatus                                 atomic.Uint64
}

// Stats are counters of a session's life so far.
type Stats struct {
	Connects         uint64 // successful connections
	ConnectFailures  uint64 // failed connection attempts
	Renewals         uint64 // planned reconnects for a new SAS token
	ConnectionsLost  uint64 // connections that dropped unplanned
	Sent             uint64 // telemetry messages acknowledged by the hub
	Failed           uint64 // accepted telemetry messages reported as failed
	Rejected         uint64 // messages refused by Send/Enqueue (queue full, too large, closed)
	Queued           int    // messages held now (queued or in flight)
	UnknownResponses uint64 // twin responses whose $rid was unknown or expired (dropped)
	DroppedInbound   uint64 // C2D/desired/method events dropped because the inbound queue was full
	BadTopics        uint64 // messages on topics that did not parse
}

type event struct {
	status  *Status
	c2d     *C2DMessage
	desired *DesiredPatch
	method  *MethodRequest
}

type outMsg struct {
	topic    string
	body     []byte
	deadline time.Time
	done     func(error)
	canceled atomic.Bool
	// Supervisor-owned.
	tok    paho.Token
	sentAt time.Time
}

type pendingReq struct {
	c  *conn
	ch chan reqResult // cap 1; exactly one send
}

type reqResult struct {
	resp Response
	err  error
}

// New validates cfg, fills defaults and starts the session. It does no I/O itself: the first
// connection is made in the background (use WaitConnected to wait for it).
func New(cfg Config) (*Session, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	s := &Session{
		cfg:     cfg,
		log:     cfg.Logger,
		tlsConf: cfg.tlsConfig(),
		backoff: Backoff{Min: cfg.BackoffMin, Max: cfg.BackoffMax},
		clock:   cfg.Clock,
		closeCh: make(chan struct{}),
		abortCh: make(chan struct{}),
		done:    make(chan struct{}),
		wake:    make(chan struct{}, 1),
		upCh:    make(chan struct{}),
		pending: make(map[string]*pendingReq),
	}
	s.handlerCtx, s.handlerCancel = context.WithCancel(context.Background())
	s.timer = s.clock.NewTimer(time.Hour)
	s.timer.Stop()
	s.wg.Add(1)
	go s.supervise()
	return s, nil
}

// Config returns the session's configuration with defaults filled in.
func (s *Session) Config() Config { return s.cfg }

// Done is closed when the session has stopped, after Close or a non-recoverable error.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err returns the error that stopped the session: nil while running and after Close, else an
// error matching ErrNotAuthorized, ErrConnectionRefused, ErrTLSVerify or ErrRetryExpired.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Status returns the latest connection status.
func (s *Session) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

// Stats returns the session's counters.
func (s *Session) Stats() Stats {
	return Stats{
		Connects:         s.stats.connects.Load(),
		ConnectFailures:  s.stats.connectFailures.Load(),
		Renewals:         s.stats.renewals.Load(),
		ConnectionsLost:  s.stats.connLost.Load(),
		Sent:             s.stats.sent.Load(),
		Failed:           s.stats.failed.Load(),
		Rejected:         s.stats.rejected.Load(),
		Queued:           int(s.qlen.Load()),
		UnknownResponses: s.stats.unknownResponses.Load(),
		DroppedInbound:   s.stats.droppedInbound.Load(),
		BadTopics:        s.stats.badTopics.Load(),
	}
}

// WaitConnected waits until the session is connected and subscribed. It returns the session's
// error if it stops first, or ctx's error.
func (s *Session) WaitConnected(ctx context.Context) error {
	_, err := s.waitConn(ctx, true)
	return err
}

// stopErrLocked is what operations return once the session has stopped.
func (s *Session) stopErrLocked() error {
	if s.err != nil {
		return fmt.Errorf("hub: session stopped: %w", s.err)
	}
	return ErrClosed
}

// waitConn returns the current connection, waiting for one. forRequest skips a connection that
// is draining before a planned reconnect, so new requests go to the next one.
func (s *Session) waitConn(ctx context.Context, forRequest bool) (*conn, error) {
	for {
		s.mu.Lock()
		if s.stopped {
			err := s.stopErrLocked()
			s.mu.Unlock()
			return nil, err
		}
		if c := s.cur; c != nil && (!forRequest || !c.draining) {
			s.mu.Unlock()
			return c, nil
		}
		ch := s.upCh
		s.mu.Unlock()
		select {
		case <-ch:
		case <-s.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("hub: not connected: %w", ctx.Err())
		}
	}
}

// Send queues m and waits until the hub acknowledges it (PUBACK) or it fails. If ctx has a
// deadline and m.Deadline is zero, the deadline also bounds the message. When ctx ends first,
// Send returns ctx's error; a message not yet published is then withdrawn, one already in
// flight may still be delivered.
func (s *Session) Send(ctx context.Context, m *Message) error {
	om, err := s.prepare(m)
	if err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok && m.Deadline.IsZero() && (om.deadline.IsZero() || dl.Before(om.deadline)) {
		om.deadline = dl
	}
	ch := make(chan error, 1)
	om.done = func(err error) { ch <- err }
	if err := s.enqueue(om); err != nil {
		return err
	}
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		om.canceled.Store(true)
		s.cancelPending.Store(true)
		s.poke()
		return fmt.Errorf("hub: send: %w", ctx.Err())
	}
}

// Enqueue queues m without waiting. It returns an error at once when the message is refused
// (queue full, too large, invalid, session closed); then done is never called. Otherwise done
// is called exactly once, with nil when the hub acknowledged the message or with the reason it
// failed. done runs on the session's goroutine: it must be quick and must not call Send.
func (s *Session) Enqueue(m *Message, done func(error)) error {
	om, err := s.prepare(m)
	if err != nil {
		return err
	}
	om.done = done
	return s.enqueue(om)
}

func (s *Session) prepare(m *Message) (*outMsg, error) {
	if m == nil {
		return nil, fmt.Errorf("%w: nil message", ErrInvalidMessage)
	}
	if n := m.Size(); n > MaxMessageSize {
		s.stats.rejected.Add(1)
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrMessageTooLarge, n, MaxMessageSize)
	}
	props, err := m.properties()
	if err != nil {
		s.stats.rejected.Add(1)
		return nil, err
	}
	om := &outMsg{body: m.Body, deadline: m.Deadline}
	if s.cfg.ModuleID != "" {
		om.topic = wire.ModuleTelemetry(s.cfg.DeviceID, s.cfg.ModuleID, props)
	} else {
		om.topic = wire.Telemetry(s.cfg.DeviceID, props)
	}
	if om.deadline.IsZero() && s.cfg.MessageTimeout > 0 {
		om.deadline = s.clock.Now().Add(s.cfg.MessageTimeout)
	}
	return om, nil
}

func (s *Session) enqueue(om *outMsg) error {
	s.mu.Lock()
	switch {
	case s.stopped:
		err := s.stopErrLocked()
		s.mu.Unlock()
		s.stats.rejected.Add(1)
		return err
	case s.closing:
		s.mu.Unlock()
		s.stats.rejected.Add(1)
		return ErrClosed
	case s.qlen.Load() >= int64(s.cfg.QueueCapacity):
		s.mu.Unlock()
		s.stats.rejected.Add(1)
		return fmt.Errorf("%w (%d messages)", ErrQueueFull, s.cfg.QueueCapacity)
	}
	s.qlen.Add(1)
	s.incoming = append(s.incoming, om)
	s.mu.Unlock()
	s.poke()
	return nil
}

func (s *Session) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Request publishes a twin request with a fresh $rid and waits for the matching response on
// the same connection. Without a deadline on ctx, Config.OperationTimeout applies. If the
// connection drops first, the error matches ErrConnectionLost; a late answer is dropped. Any
// status is returned as a Response; see TwinGet and TwinPatchReported for status checking.
func (s *Session) Request(ctx context.Context, req Request) (Response, error) {
	if req.Topic == nil {
		return Response{}, fmt.Errorf("hub: request without a topic")
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.cfg.OperationTimeout)
		defer cancel()
	}
	var (
		c   *conn
		rid string
		p   *pendingReq
	)
	for {
		var err error
		if c, err = s.waitConn(ctx, true); err != nil {
			return Response{}, err
		}
		rid = strconv.FormatUint(s.rid.Add(1), 10)
		p = &pendingReq{c: c, ch: make(chan reqResult, 1)}
		s.mu.Lock()
		if s.cur != c || c.draining {
			s.mu.Unlock()
			continue
		}
		if len(s.pending) >= maxPendingRequests {
			s.mu.Unlock()
			return Response{}, ErrTooManyRequests
		}
		s.pending[rid] = p
		s.mu.Unlock()
		break
	}
	tok := c.client.Publish(req.Topic(rid), 0, false, req.Body)
	tokDone := tok.Done()
	for {
		select {
		case r := <-p.ch:
			return r.resp, r.err
		case <-tokDone:
			tokDone = nil
			if err := tok.Error(); err != nil {
				s.dropPending(rid)
				return Response{}, fmt.Errorf("hub: publish request $rid=%s: %w", rid, err)
			}
		case <-ctx.Done():
			s.dropPending(rid)
			return Response{}, fmt.Errorf("hub: no response to request $rid=%s: %w", rid, ctx.Err())
		}
	}
}

func (s *Session) dropPending(rid string) {
	s.mu.Lock()
	p := s.pending[rid]
	delete(s.pending, rid)
	draining := p != nil && p.c.draining
	s.mu.Unlock()
	if draining {
		s.poke()
	}
}

// TwinGet requests the full twin document ({"desired":{...},"reported":{...}}). A non-2xx
// status is returned as a *StatusError.
func (s *Session) TwinGet(ctx context.Context) (Response, error) {
	return checkStatus(s.Request(ctx, Request{Topic: wire.TwinGet}))
}

// TwinPatchReported sends a reported-properties patch (a JSON object; null members delete). On
// success the response carries the new reported $version. A non-2xx status is returned as a
// *StatusError.
func (s *Session) TwinPatchReported(ctx context.Context, patch []byte) (Response, error) {
	return checkStatus(s.Request(ctx, Request{Topic: wire.TwinPatchReported, Body: patch}))
}

func checkStatus(r Response, err error) (Response, error) {
	if err != nil || r.OK() {
		return r, err
	}
	se := &StatusError{Status: r.Status}
	var de wire.DeviceError
	if json.Unmarshal(r.Body, &de) == nil {
		se.Code, se.Message = de.Code, de.Message
	}
	return r, se
}

// RespondMethod answers the direct-method request rid with an integer status and a JSON
// payload (or none). It succeeds only once per request and only on the connection that
// delivered the request; otherwise the error matches ErrStaleRequest.
func (s *Session) RespondMethod(ctx context.Context, rid string, status int, payload []byte) error {
	if len(payload) > MaxMethodPayload {
		return fmt.Errorf("%w: method payload of %d bytes, limit %d", ErrMessageTooLarge, len(payload), MaxMethodPayload)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.cfg.OperationTimeout)
		defer cancel()
	}
	c, err := s.waitConn(ctx, false)
	if err != nil {
		return err
	}
	s.mu.Lock()
	_, ok := c.methods[rid]
	delete(c.methods, rid)
	if ok {
		c.rememberAnswered(rid)
	}
	draining := c.draining
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: $rid=%s", ErrStaleRequest, rid)
	}
	if draining {
		defer s.poke()
	}
	tok := c.client.Publish(wire.MethodResponse(status, rid), 0, false, payload)
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			return fmt.Errorf("hub: method response $rid=%s: %w", rid, err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("hub: method response $rid=%s: %w", rid, ctx.Err())
	}
}

// Close drains the telemetry queue until ctx's deadline (Config.DrainTimeout when ctx has
// none), fails what is left with ErrClosed, disconnects cleanly (MQTT DISCONNECT) and waits for
// the session's goroutines, including running handlers. It returns an error matching ErrClosed
// when messages were left undelivered. Calling Close again waits again and returns the same.
func (s *Session) Close(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.cfg.DrainTimeout)
		defer cancel()
	}
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closing = true
		s.mu.Unlock()
		close(s.closeCh)
	})
	select {
	case <-s.done:
	case <-ctx.Done():
		s.abortOnce.Do(func() { close(s.abortCh) })
		<-s.done
	}
	s.wg.Wait()
	s.mu.Lock()
	n := s.undelivered
	s.mu.Unlock()
	if n > 0 {
		return fmt.Errorf("%w: %d telemetry messages not delivered before the deadline", ErrClosed, n)
	}
	return nil
}

// setStatus records, logs and reports a status change.
func (s *Session) setStatus(st Status) {
	st.At = s.clock.Now()
	s.mu.Lock()
	s.status = st
	s.mu.Unlock()
	fields := []zap.Field{zap.Stringer("status", st.State), zap.Stringer("reason", st.Reason)}
	if st.Err != nil {
		fields = append(fields, zap.Error(st.Err))
	}
	switch st.State {
	case Connected:
		s.log.Info("connected", fields...)
	case DisconnectedRetrying:
		if st.Attempt > 0 {
			fields = append(fields, zap.Int("attempt", st.Attempt), zap.Duration("retry_in", st.RetryIn))
		}
		if st.Reason == ExpiredSASToken {
			s.log.Info("disconnected, retrying", fields...)
		} else {
			s.log.Warn("disconnected, retrying", fields...)
		}
	case Disconnected:
		s.log.Error("disconnected", fields...)
	case Disabled:
		s.log.Info("closed", fields...)
	}
	if s.cfg.OnStatus == nil {
		return
	}
	s.evMu.Lock()
	if s.statusN >= maxStatusEvents {
		for i, ev := range s.events {
			if ev.status != nil {
				s.events = append(s.events[:i], s.events[i+1:]...)
				s.statusN--
				s.stats.droppedStatus.Add(1)
				break
			}
		}
	}
	if s.evStopped {
		s.evMu.Unlock()
		return
	}
	s.statusN++
	s.events = append(s.events, event{status: &st})
	s.startDispatcherLocked()
}

// pushInbound hands an inbound event to the dispatcher without blocking; false when full.
func (s *Session) pushInbound(ev event) bool {
	s.evMu.Lock()
	if s.evStopped || s.inboundN >= s.cfg.InboundQueue {
		s.evMu.Unlock()
		s.stats.droppedInbound.Add(1)
		return false
	}
	s.inboundN++
	s.events = append(s.events, ev)
	s.startDispatcherLocked()
	return true
}

// startDispatcherLocked starts the dispatcher goroutine if none is running, and unlocks evMu.
// The supervisor is still running whenever events are taken (finish sets evStopped before it
// returns), so the WaitGroup count is above zero here and Add does not race with Close's Wait.
func (s *Session) startDispatcherLocked() {
	start := !s.dispRunning
	if start {
		s.dispRunning = true
		s.wg.Add(1)
	}
	s.evMu.Unlock()
	if start {
		go s.dispatch()
	}
}

// dispatch runs handlers for queued events, one at a time and in order, and exits when the
// queue is empty.
func (s *Session) dispatch() {
	defer s.wg.Done()
	for {
		s.evMu.Lock()
		if len(s.events) == 0 {
			s.events = nil
			s.dispRunning = false
			s.evMu.Unlock()
			return
		}
		ev := s.events[0]
		s.events[0] = event{}
		s.events = s.events[1:]
		if ev.status != nil {
			s.statusN--
		} else {
			s.inboundN--
		}
		s.evMu.Unlock()
		s.handle(ev)
	}
}

func (s *Session) handle(ev event) {
	ctx := s.handlerCtx
	switch {
	case ev.status != nil:
		s.cfg.OnStatus(*ev.status)
	case ev.c2d != nil:
		if s.cfg.OnC2D != nil {
			s.cfg.OnC2D(ctx, ev.c2d)
		} else {
			s.log.Debug("cloud-to-device message dropped: no handler", zap.String("message_id", ev.c2d.MessageID))
		}
	case ev.desired != nil:
		if s.cfg.OnDesired != nil {
			s.cfg.OnDesired(ctx, ev.desired)
		}
	case ev.method != nil:
		if s.cfg.OnMethod != nil {
			s.cfg.OnMethod(ctx, ev.method)
			return
		}
		// Without a handler, answer at once rather than let the caller time out.
		err := s.RespondMethod(ctx, ev.method.RequestID, 501,
			[]byte(`{"message":"method not implemented"}`))
		if err != nil {
			s.log.Debug("method response failed", zap.String("method", ev.method.Name), zap.Error(err))
		}
	}
}

// rememberAnswered records an answered $rid, forgetting the oldest beyond maxPendingMethods.
// Call with s.mu held.
func (c *conn) rememberAnswered(rid string) {
	if c.answered == nil {
		c.answered = make(map[string]struct{})
	}
	c.answered[rid] = struct{}{}
	c.answeredFIF = append(c.answeredFIF, rid)
	if len(c.answeredFIF) > maxPendingMethods {
		delete(c.answered, c.answeredFIF[0])
		c.answeredFIF = c.answeredFIF[1:]
	}
}
