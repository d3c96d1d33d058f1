package broker

import (
	"errors"
	"slices"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
	"github.com/iothubby/iothubby/pkg/wire"
)

// hook is the mochi hook that turns mochi into IoT Hub's device endpoint.
//
// How it uses mochi (v2.7.9): authentication runs in OnConnectAuthenticate (false makes mochi
// send CONNACK 5 to a 3.1.1 client). Every packet a device sends is checked in OnPacketRead,
// which can close the connection by returning ErrRejectPacket; there the hook also sees the
// PUBACKs for its own cloud-to-device publishes (mochi ignores PUBACKs for packet IDs not in its
// own inflight store). OnPublish acts on the publish and returns CodeSuccessIgnore: mochi then
// still sends the PUBACK for QoS 1, but neither routes nor retains the message.
type hook struct {
	mqtt.HookBase
	b *Broker
}

func (h *hook) ID() string { return "hubsim-iothub" }

func (h *hook) Provides(x byte) bool {
	switch x {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnSessionEstablish,
		mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnPacketRead, mqtt.OnPublish,
		mqtt.OnPacketProcessed, mqtt.OnWill:
		return true
	}
	return false
}

func sessionOf(cl *mqtt.Client) *session {
	dc, ok := cl.Net.Conn.(*devConn)
	if !ok {
		return nil
	}
	return dc.sess.Load()
}

// OnConnect caps the keep-alive as IoT Hub does (the server waits 1.5 × keep-alive, at most
// 1767 s; a keep-alive of 0 gets the cap too).
func (h *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	if h.b.refuseByFault(cl, pk) {
		return errFaultRefused
	}
	if h.b.refuseByThrottle(cl, pk) {
		return errThrottled
	}
	if ka := cl.State.Keepalive; ka == 0 || ka > maxKeepAlive {
		cl.State.Keepalive = maxKeepAlive
	}
	return nil
}

func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	dc, ok := cl.Net.Conn.(*devConn)
	if !ok {
		return false
	}
	s, fail := h.b.authenticate(cl, dc, pk)
	if fail != "" {
		h.b.log.Info("device connection refused: CONNACK 5 (not authorized)",
			zap.String("client_id", maskTopic(pk.Connect.ClientIdentifier)),
			zap.String("remote", dc.raw.RemoteAddr().String()),
			zap.String("reason", string(fail)))
		h.b.emit(Event{Kind: EventRefused, DeviceID: pk.Connect.ClientIdentifier, Remote: dc.raw.RemoteAddr().String(), Reason: string(fail)})
		return false
	}
	dc.sess.Store(s)
	return true
}

func (h *hook) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

// OnSessionEstablish makes the new connection the device's current one and closes the older
// one, if any, as IoT Hub does. It runs before mochi's own session take-over, which then finds
// the old client closed and writes nothing to it (mochi would otherwise send a DISCONNECT packet,
// which MQTT 3.1.1 servers do not send), but still hands the old session's subscriptions to the
// new connection when both use CleanSession 0. The old connection's end leaves the device's
// state alone because it is no longer current.
func (h *hook) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	s := sessionOf(cl)
	if s == nil {
		return
	}
	ds := h.b.state(s.deviceID, s.generationID)
	s.ds = ds
	ds.mu.Lock()
	old := ds.current
	ds.current = s
	ds.mu.Unlock()
	if old != nil {
		old.log.Info("closing device connection", zap.String("reason", reasonTakenOver))
		old.close(reasonTakenOver)
	}
	h.b.reg.SetConnectionState(s.deviceID, s.generationID, true, s.connectedAt)
}

const reasonTakenOver = "taken over by a new connection with the same device ID"

func (h *hook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	s := sessionOf(cl)
	if s == nil || s.ds == nil {
		return
	}
	s.established.Store(true)
	h.b.signalSubscribed() // a takeover may have inherited subscriptions: waiters look again
	s.log.Debug("device connected", zap.String("auth", s.authType))
	h.b.emit(Event{Kind: EventConnected, DeviceID: s.deviceID, Remote: s.remote})
	h.b.kick(s.ds)
}

func (h *hook) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	if s := sessionOf(cl); s != nil {
		s.end(err)
	}
}

// violation closes the connection for breaking IoT Hub's rules.
func (s *session) violation(reason, topic string) (packets.Packet, error) {
	s.log.Info("closing device connection", zap.String("reason", reason), zap.String("topic", maskTopic(topic)))
	s.close(reason)
	return packets.Packet{}, packets.ErrRejectPacket
}

func (h *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type == packets.Connect {
		return pk, nil // the first packet, before authentication
	}
	s := sessionOf(cl)
	if s == nil {
		cl.Stop(errClosedByHub)
		return pk, packets.ErrRejectPacket
	}
	switch pk.FixedHeader.Type {
	case packets.Publish:
		if pk.FixedHeader.Qos > 1 {
			return s.violation(ReasonQoS2Publish, pk.TopicName)
		}
		if strings.ContainsAny(pk.TopicName, "+#") {
			return s.violation(ReasonWildcardTopic, pk.TopicName)
		}
		t, err := wire.Parse(pk.TopicName)
		if errors.Is(err, wire.ErrPropertyBag) {
			return s.violation(ReasonBadPropertyBag+" ("+err.Error()+")", pk.TopicName)
		}
		if err != nil || !t.Kind.FromDevice() {
			return s.violation(ReasonNotDeviceTopic, pk.TopicName)
		}
		if t.Kind == wire.KindTelemetry {
			if t.DeviceID != s.deviceID || t.ModuleID != s.moduleID {
				return s.violation(ReasonOtherDeviceTelemetry, pk.TopicName)
			}
			if n := telemetrySize(pk.Payload, t.Properties); n > MaxTelemetrySize {
				s.log.Info("telemetry too large", zap.Int("bytes", n), zap.Int("limit", MaxTelemetrySize))
				return s.violation(ReasonTelemetryTooLarge, pk.TopicName)
			}
			if s.throttleTelemetry() {
				return packets.Packet{}, packets.ErrRejectPacket
			}
		}
		s.pending, s.hasPending = t, true
	case packets.Subscribe:
		have := s.cl.State.Subscriptions.GetAll()
		filters := make([]string, 0, len(have)+len(pk.Filters))
		for f := range have {
			filters = append(filters, f)
		}
		for _, sub := range pk.Filters {
			f, err := wire.ParseFilter(sub.Filter)
			if err != nil {
				return s.violation(ReasonUndocumentedFilter, sub.Filter)
			}
			switch f.Kind {
			case wire.FilterC2D, wire.FilterModuleInputs:
				if f.DeviceID != s.deviceID || f.ModuleID != s.moduleID {
					return s.violation(ReasonOtherDeviceFilter, sub.Filter)
				}
			}
			if !slices.Contains(filters, sub.Filter) {
				filters = append(filters, sub.Filter)
			}
		}
		if len(filters) > MaxSubscriptions {
			return s.violation(ReasonTooManySubscriptions, strings.Join(filters, " "))
		}
	case packets.Puback:
		h.b.acked(s, pk.PacketID)
	case packets.Pubrec, packets.Pubrel, packets.Pubcomp:
		return s.violation(ReasonQoS2Flow, "")
	case packets.Auth:
		return s.violation(ReasonAuthPacket, "")
	}
	return pk, nil
}

func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	s := sessionOf(cl)
	if s == nil || !s.hasPending || s.ds == nil {
		return pk, packets.ErrRejectPacket
	}
	t := s.pending
	s.pending, s.hasPending = wire.Topic{}, false
	now := time.Now()
	switch t.Kind {
	case wire.KindTelemetry:
		ackByFault, keep := false, true
		if pk.FixedHeader.Qos == 1 {
			ackByFault, keep = s.pubackFault(pk.PacketID)
		}
		if keep {
			m := s.newMessage(pk.Payload, t.Properties, pk.FixedHeader.Retain, now)
			h.b.record(s.ds, m)
			if f := h.b.cfg.OnTelemetry; f != nil {
				f(s.deviceID, m)
			}
			h.b.emit(Event{Kind: EventTelemetry, DeviceID: s.deviceID, Remote: s.remote, MessageID: m.SystemProperties["message-id"]})
			s.faultProps = t.Properties // acted on once the PUBACK is out (OnPacketProcessed)
		}
		if ackByFault {
			// A puback-delay or puback-drop fault: mochi must not send the PUBACK (an error
			// return makes it skip the PUBACK and the message; the hook has recorded it).
			h.b.reg.RecordActivity(s.deviceID, s.generationID, now)
			return pk, packets.ErrRejectPacket
		}
	case wire.KindTwinGet:
		if !s.throttledTwin(t.RequestID, throttle.TwinRead) {
			s.respondTwin(t.RequestID, h.b.twins.GetTwin(s.caller()))
		}
	case wire.KindTwinPatchReported:
		if !s.throttledTwin(t.RequestID, throttle.TwinUpdate) {
			s.respondTwin(t.RequestID, h.b.twins.PatchReported(s.caller(), pk.Payload))
		}
	case wire.KindMethodResponse:
		h.b.methods.MethodResponse(s.caller(), t.RequestID, t.Status, pk.Payload)
	}
	h.b.reg.RecordActivity(s.deviceID, s.generationID, now)
	return pk, packets.CodeSuccessIgnore
}

// respondTwin writes a twin response to this connection only, if it subscribed to twin
// responses (as IoT Hub requires).
func (s *session) respondTwin(rid string, r TwinResponse) {
	if _, ok := s.cl.State.Subscriptions.Get(wire.TwinResponseFilter); !ok {
		s.log.Debug("twin response dropped: not subscribed to " + wire.TwinResponseFilter)
		return
	}
	if err := s.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish},
		TopicName:   wire.TwinResponse(r.Status, rid, r.Version),
		Payload:     r.Body,
	}); err != nil {
		s.log.Debug("twin response not sent", zap.Error(err))
	}
}

func (h *hook) OnPacketProcessed(cl *mqtt.Client, pk packets.Packet, err error) {
	if pk.FixedHeader.Type == packets.Publish {
		if s := sessionOf(cl); s != nil && s.faultProps != nil {
			props := s.faultProps
			s.faultProps = nil
			s.injectFault(props)
		}
		return
	}
	if pk.FixedHeader.Type != packets.Subscribe || err != nil {
		return
	}
	if s := sessionOf(cl); s != nil && s.ds != nil {
		h.b.kick(s.ds) // the SUBACK is out: queued cloud-to-device messages may flow now
	}
	h.b.signalSubscribed()
}

// willTopic is where a consumed will is "published": no device may subscribe to it.
const willTopic = "$hubsim/consumed-will"

// OnWill records a will as telemetry (with iothub-MessageType=Will, as IoT Hub delivers it) and
// points mochi's own publication of it at a topic nobody can subscribe to.
func (h *hook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	if s := sessionOf(cl); s != nil && s.ds != nil {
		if t, err := wire.Parse(will.TopicName); err == nil && t.Kind == wire.KindTelemetry {
			props := slices.Clone(t.Properties)
			props.Set("iothub-MessageType", "Will")
			m := s.newMessage(will.Payload, props, will.Retain, time.Now())
			h.b.record(s.ds, m)
			if f := h.b.cfg.OnTelemetry; f != nil {
				f(s.deviceID, m)
			}
		}
	}
	will.TopicName, will.Retain = willTopic, false
	return will, nil
}
