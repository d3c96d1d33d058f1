package hub

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
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
	// afterDone are AfterDone's functions (under mu), started once done is closed.
	afterDone []func()
	wg        sync.WaitGroup

	handlerCtx    context.Context
	handlerCancel context.CancelFunc

	wake chan struct{} // cap 1: telemetry, request or method-answer state changed

	q    queue    // the telemetry queue
	reqs requests // the $rid correlation of twin requests

	mu          sync.Mutex
	cur         *conn // connected and subscribed; nil otherwise
	pend        *conn // connected, its SUBACK awaited; method requests may already arrive on it
	upCh        chan struct{}
	upClosed    bool
	stopped     bool
	err         error // terminal error (nil after Close)
	status      Status
	undelivered int // messages failed by Close

	timer   Timer     // the supervisor's one timer
	armedAt time.Time // when timer is set to fire; zero when stopped or fired

	sv supervisor // the supervisor's state across parks
	// parkedOn, when not nil, is the connection the supervisor serves while parked (it has no
	// goroutine); parkTimer wakes it (Clock.AfterFunc, made at the first park). Both under mu.
	parkedOn  *conn
	parkTimer Timer

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
	sent, failed, rejected, dropped               atomic.Uint64
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
	Dropped          uint64 // accepted messages dropped from a full queue (WhenFullDropOldest)
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
	}
	s.q.init(&s.cfg, &s.stats)
	if err := s.loadSpool(); err != nil {
		return nil, err
	}
	s.reqs.init()
	s.handlerCtx, s.handlerCancel = context.WithCancel(context.Background())
	s.timer = s.clock.NewTimer(time.Hour)
	s.timer.Stop()
	s.wg.Add(1)
	go s.supervise(nil)
	return s, nil
}

// Config returns the session's configuration with defaults filled in.
func (s *Session) Config() Config { return s.cfg }

// Done is closed when the session has stopped, after Close or a non-recoverable error.
func (s *Session) Done() <-chan struct{} { return s.done }

// AfterDone arranges for f to run on a goroutine of its own once Done is closed (at once if it
// is): a caller holding thousands of sessions waits for their ends without a goroutine each.
func (s *Session) AfterDone(f func()) {
	// finish closes done before it takes the list under mu: f is either in the list it takes
	// or sees done closed here.
	s.mu.Lock()
	select {
	case <-s.done:
	default:
		s.afterDone = append(s.afterDone, f)
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	go f()
}

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
		Dropped:          s.stats.dropped.Load(),
		Queued:           s.q.len(),
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
		if c := s.cur; c != nil && (!forRequest || !c.draining.Load()) {
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
	if dl, ok := ctx.Deadline(); ok && m.Deadline.IsZero() {
		// ctx's deadline is on the wall clock; the queue's deadlines are on the session's Clock.
		if at := s.clock.Now().Add(time.Until(dl)); om.deadline.IsZero() || at.Before(om.deadline) {
			om.deadline = at
		}
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
		s.q.cancel(om)
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
	if len(om.topic) > wire.MaxTopicLength {
		// Refused here, not re-sent after every reconnect: no MQTT broker can take it.
		s.stats.rejected.Add(1)
		return nil, fmt.Errorf("%w: properties encode to a %d-byte topic, over MQTT's %d-byte limit", ErrMessageTooLarge, len(om.topic), wire.MaxTopicLength)
	}
	if om.deadline.IsZero() && s.cfg.MessageTimeout > 0 {
		om.deadline = s.clock.Now().Add(s.cfg.MessageTimeout)
	}
	return om, nil
}

func (s *Session) enqueue(om *outMsg) error {
	if err := s.q.push(om); err != nil {
		return err
	}
	s.poke()
	return nil
}

// poke wakes the supervisor: telemetry, request or method-answer state changed.
func (s *Session) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
	s.unpark()
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
		rid, p, err = s.reqs.add(c)
		if errors.Is(err, errConnGone) {
			// c ended between waitConn and add: as for a request already pending on it, unless
			// the supervisor has moved on, in which case the next connection takes it.
			s.mu.Lock()
			still := s.cur == c
			s.mu.Unlock()
			if still {
				return Response{}, ErrConnectionLost
			}
			continue
		}
		if err != nil {
			return Response{}, err
		}
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
				s.dropPending(c, rid)
				return Response{}, fmt.Errorf("hub: publish request $rid=%s: %w", rid, err)
			}
		case <-ctx.Done():
			s.dropPending(c, rid)
			return Response{}, fmt.Errorf("hub: no response to request $rid=%s: %w", rid, ctx.Err())
		}
	}
}

func (s *Session) dropPending(c *conn, rid string) {
	s.reqs.drop(rid)
	if c.draining.Load() {
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
// payload (or none) and waits until the answer is written to the connection. It succeeds only
// once per request and only on the connection that delivered the request; otherwise the error
// matches ErrStaleRequest (and ErrNotConnected when there is no connection at all). It never
// waits for a connection: a method request does not outlive the connection that delivered it,
// so when that connection drops while the answer waits to be written the error matches
// ErrConnectionLost at once. Without a deadline on ctx, Config.OperationTimeout bounds the
// write.
//
// The answer is published by the session's supervisor, so RespondMethod blocks only its
// caller. A caller that must not wait at all (the goroutine delivering C2D messages and desired
// patches, sending a refusal such as 501, 400 or 429) uses RespondMethodAsync.
func (s *Session) RespondMethod(ctx context.Context, rid string, status int, payload []byte) error {
	r := &methodResponse{tok: make(chan paho.Token, 1)}
	c, err := s.respond(rid, status, payload, r)
	if err != nil {
		return err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.cfg.OperationTimeout)
		defer cancel()
	}
	// The supervisor hands the token over before it can end c, and a renewal ends c only once
	// the answer is written: when c's end and the token (or its completion) are both there,
	// the token decides (select alone would pick either).
	var tok paho.Token
	select {
	case tok = <-r.tok:
	case <-c.Done():
		select {
		case tok = <-r.tok:
		default:
			return fmt.Errorf("hub: method response $rid=%s: %w", rid, ErrConnectionLost)
		}
	case <-ctx.Done():
		return fmt.Errorf("hub: method response $rid=%s: %w", rid, ctx.Err())
	}
	select {
	case <-tok.Done():
	case <-c.Done():
		select {
		case <-tok.Done():
		default:
			return fmt.Errorf("hub: method response $rid=%s: %w", rid, ErrConnectionLost)
		}
	case <-ctx.Done():
		return fmt.Errorf("hub: method response $rid=%s: %w", rid, ctx.Err())
	}
	if err := tok.Error(); err != nil {
		return fmt.Errorf("hub: method response $rid=%s: %w", rid, err)
	}
	return nil
}

// RespondMethodAsync answers the direct-method request rid like RespondMethod but returns as
// soon as the answer is queued for the connection that delivered the request; it never blocks
// on the network or on a connection. It fails at once, as RespondMethod does, when rid is not
// pending on the current connection or the session is not connected. An answer still queued
// when its connection drops is discarded (the hub's caller gets its timeout, as it would for
// any answer lost with a connection). Use it for refusals sent from a handler that must not
// wait, such as OnMethod running on the goroutine that also delivers C2D and desired patches.
func (s *Session) RespondMethodAsync(rid string, status int, payload []byte) error {
	_, err := s.respond(rid, status, payload, &methodResponse{})
	return err
}

// respond claims rid on the current connection and queues r for the supervisor to publish.
func (s *Session) respond(rid string, status int, payload []byte, r *methodResponse) (*conn, error) {
	if len(payload) > MaxMethodPayload {
		return nil, fmt.Errorf("%w: method payload of %d bytes, limit %d", ErrMessageTooLarge, len(payload), MaxMethodPayload)
	}
	s.mu.Lock()
	c, pend, stopped := s.cur, s.pend, s.stopped
	var stopErr error
	if stopped {
		stopErr = s.stopErrLocked()
	}
	s.mu.Unlock()
	switch {
	case stopped:
		return nil, stopErr
	case c == nil && pend == nil:
		return nil, fmt.Errorf("%w: $rid=%s: %w", ErrStaleRequest, rid, ErrNotConnected)
	}
	r.topic, r.payload = wire.MethodResponse(status, rid), payload
	// A request may arrive on a connection whose SUBACK the supervisor has not seen yet (the hub
	// sends as soon as the subscription is live): it is answered on that connection, which
	// publishes the answer once it becomes current.
	if c == nil || !c.answerMethod(rid, r) {
		if pend == nil || !pend.answerMethod(rid, r) {
			return nil, fmt.Errorf("%w: $rid=%s", ErrStaleRequest, rid)
		}
		c = pend
	}
	s.poke()
	return c, nil
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
		s.q.refuse(ErrClosed)
		close(s.closeCh)
		s.unpark()
	})
	select {
	case <-s.done:
	case <-ctx.Done():
		s.abortOnce.Do(func() {
			close(s.abortCh)
			s.unpark()
		})
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
