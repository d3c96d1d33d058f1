package hub

import (
	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/wire"
)

// Inbound: paho's router hands every publish to onMessage, which parses it and passes it on
// without blocking (twin responses to the request correlation, the rest to the dispatcher's
// bounded queue); the dispatcher runs handlers one at a time, in order, on a goroutine that
// exists only while events wait.

// onMessage is paho's handler for every inbound publish on c. It runs on paho's router goroutine
// and never blocks: it parses, hands over through bounded queues and acknowledges.
//
// paho's router goroutine lives as long as the connection, and the runtime keeps a goroutine's
// stack at the largest size it ever needed (it halves it at a GC only while less than a quarter
// is in use): one deep call here, on the twin response every connect brings, would cost 2 KiB
// more per device for good. So the common topics take wire.ParseQuick and small frames; Parse,
// the C2D decoding and the log calls (zap fields are 64 bytes each) are kept out of this frame,
// in functions that are not inlined.
func (s *Session) onMessage(c *conn, m paho.Message) {
	q := wire.ParseQuick(m.Topic())
	switch q.Kind {
	case wire.KindTwinResponse:
		s.onTwinResponse(c, &q, m.Payload())
	case wire.KindTwinDesired:
		s.onDesired(q.Version, m.Payload())
	case wire.KindMethodRequest:
		s.onMethodRequest(c, &q, m.Payload())
	default:
		s.onOtherMessage(c, m)
		return
	}
	m.Ack()
}

// onOtherMessage handles what wire.ParseQuick leaves to wire.Parse: cloud-to-device messages,
// unusual spellings of the common topics and topics that are not the hub's.
//
//go:noinline
func (s *Session) onOtherMessage(c *conn, m paho.Message) {
	t, err := wire.Parse(m.Topic())
	if err != nil {
		s.stats.badTopics.Add(1)
		s.log.Debug("message on an unexpected topic dropped", zap.Error(err))
		m.Ack()
		return
	}
	switch t.Kind {
	case wire.KindTwinResponse:
		q := wire.Quick{Kind: t.Kind, Status: t.Status, Version: t.Version, HasVersion: t.HasVersion, RequestID: t.RequestID}
		s.onTwinResponse(c, &q, m.Payload())
	case wire.KindC2D:
		if !s.pushInbound(event{c2d: newC2D(m.Topic(), t, m.Payload())}) {
			// Not acknowledged: the hub delivers it again after a reconnect.
			s.log.Warn("inbound queue full: cloud-to-device message left unacknowledged")
			return
		}
	case wire.KindTwinDesired:
		s.onDesired(t.Version, m.Payload())
	case wire.KindMethodRequest:
		q := wire.Quick{Kind: t.Kind, Method: t.Method, RequestID: t.RequestID}
		s.onMethodRequest(c, &q, m.Payload())
	default:
		s.stats.badTopics.Add(1)
	}
	m.Ack()
}

// onTwinResponse passes a twin response to the request waiting for it.
func (s *Session) onTwinResponse(c *conn, q *wire.Quick, body []byte) {
	if !s.reqs.resolve(c, q, body) {
		s.stats.unknownResponses.Add(1)
		s.logUnknownResponse(q.RequestID, q.Status)
	} else if c.draining.Load() {
		s.poke() // the renewal waits for the connection's requests to finish
	}
}

// onDesired queues a desired-properties patch for the dispatcher.
func (s *Session) onDesired(version int64, body []byte) {
	if !s.pushInbound(event{desired: &DesiredPatch{Version: version, Body: body}}) {
		s.logInboundFull("desired patch dropped", "", version)
	}
}

// onMethodRequest queues a direct-method call for the dispatcher, once per $rid.
func (s *Session) onMethodRequest(c *conn, q *wire.Quick, payload []byte) {
	method, rid := q.Method, q.RequestID
	switch st := c.takeMethod(rid); st {
	case methodConnEnded, methodDuplicate, methodTooMany:
		if st == methodTooMany {
			s.stats.droppedInbound.Add(1)
		}
		s.logMethodRefused(st, method, rid)
	default:
		if !s.pushInbound(event{method: &MethodRequest{Name: method, RequestID: rid, Payload: payload}}) {
			c.forgetMethod(rid)
			s.logInboundFull("method request dropped", method, 0)
		}
	}
}

//go:noinline
func (s *Session) logUnknownResponse(rid string, status int) {
	s.log.Debug("twin response for an unknown $rid dropped", zap.String("rid", rid), zap.Int("status", status))
}

//go:noinline
func (s *Session) logMethodRefused(st methodOutcome, method, rid string) {
	switch st {
	case methodConnEnded:
		s.log.Debug("method request on a closed connection dropped", zap.String("rid", rid))
	case methodDuplicate:
		s.log.Debug("duplicate method request ignored", zap.String("rid", rid))
	case methodTooMany:
		s.log.Warn("too many unanswered method requests: request dropped", zap.String("method", method))
	}
}

// logInboundFull logs an inbound event dropped because the dispatcher's queue is full.
//
//go:noinline
func (s *Session) logInboundFull(what, method string, version int64) {
	if method != "" {
		s.log.Warn("inbound queue full: "+what, zap.String("method", method))
		return
	}
	s.log.Warn("inbound queue full: "+what, zap.Int64("version", version))
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
		s.log.Info(MsgConnected, fields...)
	case DisconnectedRetrying:
		if st.Attempt > 0 {
			fields = append(fields, zap.Int("attempt", st.Attempt), zap.Duration("retry_in", st.RetryIn))
		}
		if st.Reason == ExpiredSASToken {
			s.log.Info(MsgDisconnectedRetrying, fields...)
		} else {
			s.log.Warn(MsgDisconnectedRetrying, fields...)
		}
	case Disconnected:
		s.log.Error(MsgDisconnected, fields...)
	case Disabled:
		s.log.Info(MsgClosed, fields...)
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
		// Without a handler, answer at once rather than let the caller time out. The answer is
		// queued, not waited for: the dispatcher also delivers C2D and desired patches.
		err := s.RespondMethodAsync(ev.method.RequestID, 501, []byte(`{"message":"method not implemented"}`))
		if err != nil {
			s.log.Debug("method response failed", zap.String("method", ev.method.Name), zap.Error(err))
		}
	}
}
