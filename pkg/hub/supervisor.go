package hub

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"
)

// The supervisor is the session's one goroutine: it stays connected (connect, backoff, token
// renewal, retry expiry) and drives the telemetry queue on the live connection. All its waits
// are on one timer from the session's Clock. While a connection is up and idle (nothing in
// flight) it parks: its goroutine returns, and the next event (telemetry, a method answer, the
// connection's end, Close, the renewal time) resumes it on a fresh one. A fleet holds thousands
// of idle devices, and a goroutine waiting in serve costs a 4 KiB stack each.

type endReason uint8

const (
	endLost endReason = iota
	endRenew
	endClose
	endPark // not an end: the supervisor has parked (the connection stays up)
)

var (
	errPubackTimeout = errors.New("hub: no PUBACK within the operation timeout")
	errSubackTimeout = errors.New("hub: no SUBACK within the operation timeout")
	errAborted       = errors.New("hub: aborted by Close")

	// ErrIdentityInUse wraps the error of a lost connection when the hub has closed this
	// device's connections right after accepting them identityLosses times within
	// identityWindow: the pattern of another client connected with the same device identity.
	// The status then has Reason IdentityInUse.
	ErrIdentityInUse = errors.New("hub: " + MsgIdentityInUse)
)

// Detecting two clients that share one device identity. IoT Hub (and hubsim) keep one connection
// per device: a new CONNECT closes the older connection, and MQTT 3.1.1 has no server
// DISCONNECT, so the older client sees only its TCP connection closed by the peer. Two agents
// with one identity then take the connection from each other, each one's connection living
// about the other's reconnect delay (the 1 s floor, growing with the backoff).
const (
	// identityLosses is how many such closes make the pattern.
	identityLosses = 3
	// identityShortUp: a connection closed by the hub within this time of its CONNACK counts.
	identityShortUp = 10 * time.Second
	// identityWindow is how far back the closes are counted.
	identityWindow = 2 * time.Minute
	// identityWarnEvery rate-limits the warning.
	identityWarnEvery = 10 * time.Minute
)

// identityWatch is the supervisor's record of connections the hub closed soon after accepting.
type identityWatch struct {
	losses   []time.Time
	warnedAt time.Time
}

// lost records a connection that ended with err after being up for upFor and reports whether the
// pattern holds now.
func (w *identityWatch) lost(now time.Time, upFor time.Duration, err error) bool {
	if upFor >= StableAfter {
		w.losses = w.losses[:0] // a stable connection ends any earlier pattern
	}
	if upFor >= identityShortUp || !closedByPeer(err) {
		return false
	}
	kept := w.losses[:0]
	for _, t := range w.losses {
		if now.Sub(t) < identityWindow {
			kept = append(kept, t)
		}
	}
	w.losses = append(kept, now)
	return len(w.losses) >= identityLosses
}

// warn reports whether the rate-limited warning is due now (and notes it).
func (w *identityWatch) warn(now time.Time) bool {
	if !w.warnedAt.IsZero() && now.Sub(w.warnedAt) < identityWarnEvery {
		return false
	}
	w.warnedAt = now
	return true
}

// closedByPeer reports whether err is the peer closing the connection (end of stream or reset),
// not a keep-alive or operation timeout of ours.
func closedByPeer(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// lostAfterConnack marks a connection accepted (CONNACK 0) and then lost before its SUBACK.
type lostAfterConnack struct{ err error }

func (e *lostAfterConnack) Error() string { return e.err.Error() }
func (e *lostAfterConnack) Unwrap() error { return e.err }

// identityStatus turns st into the identity-in-use status when the supervisor's watch says so,
// and logs the rate-limited warning.
func (s *Session) identityStatus(st Status, upFor time.Duration) Status {
	now := s.clock.Now()
	if s.sv.ident == nil {
		if upFor >= identityShortUp || !closedByPeer(st.Err) {
			return st // nothing to record
		}
		s.sv.ident = new(identityWatch)
	}
	w := s.sv.ident
	if !w.lost(now, upFor, st.Err) {
		return st
	}
	if w.warn(now) {
		s.log.Warn(MsgIdentityInUse, zap.Int("closed_after_connect", len(w.losses)),
			zap.Duration("within", now.Sub(w.losses[0])), zap.Error(st.Err))
	}
	st.Reason = IdentityInUse
	st.Err = fmt.Errorf("%w: %w", ErrIdentityInUse, st.Err)
	return st
}

// supervisor is the state of the session's supervisor that outlives its goroutine: the
// supervisor parks (its goroutine returns) while a connection is up and idle, and a fresh
// goroutine resumes it at the next event (see park). Only the goroutine running the supervisor
// touches it; parking and resuming hand it over under Session.mu.
// (The first failed attempt of an outage is not kept here: the supervisor parks only while
// connected, when there is none.)
type supervisor struct {
	attempt int            // reconnect attempts since the last stable connection
	ident   *identityWatch // made at the first connection the hub closes soon after accepting
	upAt    time.Time      // when the served connection came up
}

// supervise runs the supervisor on a goroutine of its own: from the first connect when c is
// nil (New), or serving c when it resumes a parked supervisor. The session's WaitGroup counts
// one for the supervisor from New until finish, across parks: a parked supervisor is still
// running as far as Close is concerned.
func (s *Session) supervise(c *conn) {
	fatal, parked := s.superviseLoop(c)
	if parked {
		return
	}
	s.finish(fatal)
	s.wg.Done()
}

// superviseLoop connects, serves and reconnects until the session stops (it returns the fatal
// error, nil after Close) or the supervisor parks (parked).
func (s *Session) superviseLoop(c *conn) (fatal error, parked bool) {
	sv := &s.sv
	var failingSince time.Time // first failed attempt of the current outage
	for {
		if c == nil {
			if s.shouldStop() {
				return nil, false
			}
			var err error
			c, err = s.connect()
			if err != nil {
				if errors.Is(err, errAborted) {
					return nil, false
				}
				s.stats.connectFailures.Add(1)
				st := Status{State: DisconnectedRetrying, Reason: classify(err), Err: err}
				switch {
				case errors.Is(err, ErrNotAuthorized), errors.Is(err, ErrConnectionRefused):
					s.setStatus(Status{State: Disconnected, Reason: BadCredential, Err: err})
					return err, false
				case errors.Is(err, ErrTLSVerify):
					s.setStatus(Status{State: Disconnected, Reason: CommunicationError, Err: err})
					return err, false
				}
				now := s.clock.Now()
				if failingSince.IsZero() {
					failingSince = now
				}
				if s.cfg.RetryTimeout > 0 && now.Sub(failingSince) >= s.cfg.RetryTimeout {
					fatal = fmt.Errorf("%w after %v: %w", ErrRetryExpired, s.cfg.RetryTimeout, err)
					s.setStatus(Status{State: Disconnected, Reason: RetryExpired, Err: fatal})
					return fatal, false
				}
				var lac *lostAfterConnack
				if errors.As(err, &lac) {
					st = s.identityStatus(st, 0)
				}
				st.RetryIn = s.backoff.Delay(sv.attempt, s.cfg.Rand())
				sv.attempt++
				st.Attempt = sv.attempt
				if !s.sleep(st) {
					return nil, false
				}
				continue
			}
			failingSince = time.Time{}
			sv.upAt = s.clock.Now()
			s.stats.connects.Add(1)
			s.setStatus(Status{State: Connected, Reason: ConnectionOK})
		}
		why, err := s.serve(c)
		if why == endPark {
			return nil, true
		}
		s.teardown(c, why, err)
		c = nil
		switch why {
		case endClose:
			return nil, false
		case endRenew:
			s.stats.renewals.Add(1)
			s.setStatus(Status{State: DisconnectedRetrying, Reason: ExpiredSASToken})
			continue // reconnect at once: planned, not a failure
		}
		s.stats.connLost.Add(1)
		upFor := s.clock.Now().Sub(sv.upAt)
		if upFor >= StableAfter {
			sv.attempt = 0
		}
		st := s.identityStatus(Status{State: DisconnectedRetrying, Reason: CommunicationError, Err: err}, upFor)
		st.RetryIn = s.backoff.Delay(sv.attempt, s.cfg.Rand())
		sv.attempt++
		st.Attempt = sv.attempt
		if !s.sleep(st) {
			return nil, false
		}
	}
}

// park parks the supervisor serving c, which is idle: nothing in flight, no method answer
// waiting to be written, no renewal under way. It reports false, leaving the supervisor to
// go on waiting itself, when an event is already there: a wake-up, c's end, Close or the
// abort. Parked, the supervisor has no goroutine; unpark starts one to resume it when an event
// comes: poke (telemetry, a request dropped, a method answer), c's end (conn's onEnd), Close
// and the abort, and the park timer set for at (the token renewal; zero: none).
//
// Each event's side signals first (the wake channel, c.done, closeCh, abortCh) and then calls
// unpark, which looks at parkedOn under mu; park looks at the signals under mu before it sets
// parkedOn. Either the event is seen here, or unpark finds the supervisor parked: no wake-up is
// lost, and only the unpark that clears parkedOn starts a goroutine.
func (s *Session) park(c *conn, at time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.wake) > 0 || c.Err() != nil || s.closing() || s.aborting() {
		return false
	}
	s.disarm() // before parkedOn is set: a resumed supervisor owns the timer
	s.parkedOn = c
	if at.IsZero() {
		if s.parkTimer != nil {
			s.parkTimer.Stop()
		}
		return true
	}
	d := max(at.Sub(s.clock.Now()), 0)
	if s.parkTimer == nil {
		s.parkTimer = s.clock.AfterFunc(d, s.unpark)
	} else {
		s.parkTimer.Reset(d)
	}
	return true
}

// unpark resumes a parked supervisor on a goroutine of its own; it does nothing when the
// supervisor is not parked (it is running and sees the event itself). A resumed supervisor
// finds nothing new when the event concerned an earlier park (a late timer): it parks again.
func (s *Session) unpark() {
	s.mu.Lock()
	c := s.parkedOn
	if c == nil {
		s.mu.Unlock()
		return
	}
	s.parkedOn = nil
	if s.parkTimer != nil {
		s.parkTimer.Stop()
	}
	s.mu.Unlock()
	go s.supervise(c)
}

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

// closing reports whether Close has been called.
func (s *Session) closing() bool {
	select {
	case <-s.closeCh:
		return true
	default:
		return false
	}
}

// aborting reports whether Close's deadline has passed.
func (s *Session) aborting() bool {
	select {
	case <-s.abortCh:
		return true
	default:
		return false
	}
}

// shouldStop reports whether Close has asked to stop and nothing is left to deliver, or the
// drain deadline has passed.
func (s *Session) shouldStop() bool {
	return s.aborting() || s.closing() && s.q.len() == 0
}

// sleep reports st and waits st.RetryIn from the time of the report (the timer is armed before
// the status is handed to OnStatus, so a test's fake clock can rely on it), failing expired
// messages meanwhile. false means stop.
func (s *Session) sleep(st Status) bool {
	until := s.clock.Now().Add(st.RetryIn)
	s.arm(until)
	s.setStatus(st)
	closeCh := s.closeCh
	for {
		now := s.clock.Now()
		if !now.Before(until) {
			return true
		}
		s.q.pull()
		s.q.expire(now)
		if closeCh == nil && s.shouldStop() {
			return false
		}
		at := until
		if !s.q.nextExpiry.IsZero() && s.q.nextExpiry.Before(at) {
			at = s.q.nextExpiry
		}
		select {
		case <-s.arm(at):
			s.fired()
		case <-s.wake:
		case <-closeCh:
			closeCh = nil
		case <-s.abortCh:
			return false
		}
	}
}

// arm sets the supervisor's timer to fire at at (never if zero) and returns its channel. A
// timer already set for at is left as it is: re-arming it would restart a relative delay from a
// later now, and a fake clock moved in between would then never reach it.
func (s *Session) arm(at time.Time) <-chan time.Time {
	if at.IsZero() {
		s.disarm()
		return nil
	}
	if !at.Equal(s.armedAt) {
		s.timer.Reset(max(at.Sub(s.clock.Now()), 0))
		s.armedAt = at
	}
	return s.timer.C()
}

// disarm stops the supervisor's timer.
func (s *Session) disarm() {
	s.timer.Stop()
	s.armedAt = time.Time{}
}

// fired records that the timer's value was received.
func (s *Session) fired() { s.armedAt = time.Time{} }

type dialResult struct {
	c   *conn
	sub paho.Token // the SUBSCRIBE, sent once connected
	err error
}

// connect makes one connection attempt: dial, TLS, CONNECT/CONNACK, then SUBSCRIBE/SUBACK. On
// success the connection is current and ready for publishing.
//
// The dial and the SUBSCRIBE run on a short-lived goroutine that owns nothing of the session: a
// connect goes deep (SAS signing, paho set-up, TLS, the CONNACK wait, building the SUBSCRIBE)
// and would leave the supervisor's stack grown for the life of the connection; in a fleet of
// thousands of idle devices that is most of a session's memory beyond paho's own. The
// supervisor meanwhile watches Close, then waits for the SUBACK on its own timer.
func (s *Session) connect() (*conn, error) {
	ctx, cancel := context.WithCancel(s.handlerCtx)
	defer cancel()
	p := dialParams{cfg: &s.cfg, tlsConf: s.tlsConf, now: s.clock.Now(), onMessage: s.onMessage, onEnd: s.unpark}
	ch := make(chan dialResult, 1)
	go func() {
		if bc := p.cfg.BeforeConnect; bc != nil {
			if err := bc(ctx); err != nil {
				if ctx.Err() != nil {
					ch <- dialResult{err: errAborted}
				} else {
					ch <- dialResult{err: &dialError{fmt.Errorf("hub: before connect: %w", err)}}
				}
				return
			}
			p.now = s.clock.Now()
		}
		c, err := dial(ctx, p)
		var sub paho.Token
		if err == nil {
			// Pending before the SUBSCRIBE: the hub may send a method request as soon as the
			// subscription is live, and an answer given at once must find this connection.
			s.setPending(c)
			sub = c.subscribe(p.cfg) // here too, not on the supervisor's stack
		}
		ch <- dialResult{c, sub, err}
	}()
	s.log.Debug("connecting", zap.String("address", s.cfg.Address), zap.String("username", s.cfg.Username()))
	var r dialResult
	defer s.setPending(nil)
	closeCh := s.closeCh
	for waiting := true; waiting; {
		select {
		case r = <-ch:
			waiting = false
		case <-closeCh:
			closeCh = nil
			if s.q.len() > 0 {
				continue // connect to drain the queue
			}
			return nil, s.abandon(cancel, ch)
		case <-s.abortCh:
			return nil, s.abandon(cancel, ch)
		}
	}
	if r.err != nil {
		return nil, r.err
	}
	c, st := r.c, r.sub
	var serr error
	select {
	case <-st.Done():
		serr = subackError(st)
	case <-c.Done():
		serr = c.Err()
	case <-s.arm(s.clock.Now().Add(s.cfg.OperationTimeout)):
		serr = errSubackTimeout
	case <-s.abortCh:
		s.disarm()
		c.close(0)
		return nil, errAborted
	}
	s.disarm()
	if serr != nil {
		lost := c.Err() != nil // ended by the peer or the network, not by us
		c.close(0)
		err := fmt.Errorf("hub: subscribe: %w", serr)
		if lost {
			return nil, &lostAfterConnack{err}
		}
		return nil, err
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

// setPending records the connection whose SUBACK connect awaits (nil when none), so a method
// request it delivers meanwhile can be answered on it.
func (s *Session) setPending(c *conn) {
	s.mu.Lock()
	s.pend = c
	s.mu.Unlock()
}

// abandon cancels a dial in progress and waits for it to give up.
func (s *Session) abandon(cancel context.CancelFunc, ch <-chan dialResult) error {
	cancel()
	if r := <-ch; r.c != nil {
		r.c.close(0)
	}
	return errAborted
}

// serve runs a live connection: it publishes method answers and queued telemetry in order with
// up to MaxInFlight awaiting PUBACK, and watches for loss, renewal time, message expiry and
// Close. When there is nothing to watch but events that come with a callback it parks instead
// (endPark): the connection stays up and a fresh goroutine calls serve again at the next event.
func (s *Session) serve(c *conn) (endReason, error) {
	closeCh := s.closeCh
	renewing := false
	var renewDeadline time.Time
	timeout := s.cfg.OperationTimeout
	var answers []paho.Token // method answers published on c and not yet written
	for {
		now := s.clock.Now()
		answers = s.publishResponses(c, answers)
		s.q.pull()
		s.q.expire(now)
		if err := s.q.reapAcks(); err != nil {
			return endLost, err
		}
		head := s.q.head()
		if head != nil && !now.Before(head.sentAt.Add(timeout)) {
			return endLost, errPubackTimeout
		}
		if closeCh == nil && s.q.len() == 0 {
			return endClose, nil
		}
		if !renewing && !c.renewAt.IsZero() && !now.Before(c.renewAt) {
			renewing = true
			renewDeadline = now.Add(min(timeout, c.expiry.Sub(now)/2))
			c.draining.Store(true)
			s.mu.Lock()
			if s.upClosed {
				s.upCh = make(chan struct{})
				s.upClosed = false
			}
			s.mu.Unlock()
			s.log.Debug("renewing SAS token", zap.Time("expiry", c.expiry))
		}
		if renewing && (!now.Before(renewDeadline) ||
			head == nil && len(answers) == 0 && !s.reqs.pendingOn(c) && !c.methodsPending()) {
			return endRenew, nil
		}
		if !renewing {
			s.q.publishMore(c.client, now)
			head = s.q.head()
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
		var headDone, answerDone <-chan struct{}
		if len(answers) > 0 {
			answerDone = answers[0].Done()
		}
		if head != nil {
			headDone = head.tok.Done()
			earliest(head.sentAt.Add(timeout))
		}
		earliest(s.q.nextExpiry)
		if head == nil && len(answers) == 0 && !renewing && s.park(c, at) {
			return endPark, nil
		}
		select {
		case <-c.Done():
			return endLost, c.Err()
		case <-headDone:
		case <-answerDone:
		case <-s.wake:
		case <-closeCh:
			closeCh = nil
		case <-s.abortCh:
			return endClose, nil
		case <-s.arm(at):
			s.fired()
		}
	}
}

// publishResponses publishes the method answers queued on c (QoS 0) and returns the tokens of
// those not yet written, so a renewal's DISCONNECT does not overtake them. A waiting
// RespondMethod gets the token and watches the write itself; the supervisor never waits on it.
func (s *Session) publishResponses(c *conn, pending []paho.Token) []paho.Token {
	for _, r := range c.takeResponses() {
		tok := c.client.Publish(r.topic, 0, false, r.payload)
		if r.tok != nil {
			r.tok <- tok
		}
		pending = append(pending, tok)
	}
	kept := pending[:0]
	for _, tok := range pending {
		select {
		case <-tok.Done():
		default:
			kept = append(kept, tok)
		}
	}
	clear(pending[len(kept):])
	if len(kept) == 0 {
		return nil
	}
	return kept
}

// teardown ends connection c: disconnects it unless it is already gone, fails requests pending
// on it, forgets its method requests and puts its unacknowledged messages back at the head of
// the queue.
func (s *Session) teardown(c *conn, why endReason, err error) {
	s.disarm()
	if why == endLost {
		c.close(0)
	} else {
		c.close(cleanQuiesce)
	}
	if why == endLost && err != nil {
		s.log.Debug("connection ended", zap.Error(err))
	}
	s.mu.Lock()
	if s.cur == c {
		s.cur = nil
	}
	if s.upClosed {
		s.upCh = make(chan struct{})
		s.upClosed = false
	}
	s.mu.Unlock()
	// c has ended (close), so no request can be added to it any more.
	s.reqs.failConn(c, ErrConnectionLost)
	s.q.requeue()
}

// finish runs when the supervisor stops: it fails everything still held, reports the final
// status and stops taking handler events (a running dispatcher drains what is queued).
func (s *Session) finish(fatal error) {
	s.disarm()
	s.mu.Lock()
	s.stopped = true
	s.err = fatal
	stopErr := s.stopErrLocked()
	s.mu.Unlock()
	s.reqs.close(ErrClosed)
	reason := fmt.Errorf("%w: not delivered before the shutdown deadline", ErrClosed)
	if fatal != nil {
		reason = fmt.Errorf("hub: session stopped: %w", fatal)
	}
	n := s.q.failAll(stopErr, reason)
	if n > 0 {
		s.log.Warn("telemetry messages failed at shutdown", zap.Int("count", n), zap.Error(reason))
	}
	s.mu.Lock()
	if s.closing() && fatal == nil {
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
	s.mu.Lock()
	after := s.afterDone
	s.afterDone = nil
	s.mu.Unlock()
	for _, f := range after {
		go f()
	}
}
