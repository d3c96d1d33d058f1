package broker

import (
	"errors"
	"net"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/faults"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Fault actions as they appear in the fault log.
const (
	faultActionReset  = "tcp-reset"
	faultActionClosed = "closed"
	faultActionGone   = "connection-already-gone"
)

// injectFault acts on a telemetry message carrying AzIoTHub_FaultOperationType: the message
// is recorded and PUBACKed like any other (so that no SDK replays it), and the fault is
// applied to this connection after its delay. Over MQTT every fault ends the connection: Kill*
// abruptly (a TCP reset, no TLS close_notify), ShutDown* and Invoke* by closing it (MQTT 3.1.1
// has no server DISCONNECT; IoT Hub drops MQTT connections for Invoke* faults). An
// InvokeAuthError also refuses CONNECTs with CONNACK 5 for its duration.
func (s *session) injectFault(props wire.Properties) {
	in := s.b.cfg.Faults
	if in == nil {
		return
	}
	if _, has := props.Get(faults.PropType); !has {
		return
	}
	spec, ok, err := faults.Parse(props.Get)
	if !ok {
		return
	}
	if err != nil {
		s.log.Info("fault message ignored", zap.Error(err))
		in.Note(s.deviceID, spec, "ignored: "+err.Error())
		return
	}
	in.Schedule(s.deviceID, spec, func(spec faults.Spec) string {
		if s.cl.Closed() {
			return faultActionGone
		}
		reason := "fault injected: " + spec.Type
		if spec.Kind != faults.KindKill {
			s.log.Info("closing device connection", zap.String("reason", reason))
			s.close(reason)
			return faultActionClosed
		}
		s.cause.CompareAndSwap(nil, &reason)
		s.log.Info("resetting device TCP connection", zap.String("reason", reason))
		if tc, ok := s.dc.raw.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // RST, not FIN
		}
		_ = s.dc.raw.Close()
		return faultActionReset
	})
}

// connackFor maps a 3.1.1 CONNACK return code to the code mochi translates back to it.
var connackFor = map[int]packets.Code{
	1: packets.ErrUnsupportedProtocolVersion,
	2: packets.ErrClientIdentifierNotValid,
	3: packets.ErrServerUnavailable,
	4: packets.ErrMalformedUsername,
	5: packets.ErrBadUsernameOrPassword,
}

// errFaultRefused ends a CONNECT refused by an injected fault.
var errFaultRefused = errors.New("connect refused by an injected fault")

// refuseByFault sends the CONNACK refusal of an injected fault (an InvokeAuthError window or a
// refuse-connect rule), if one applies to this CONNECT, and reports whether it did.
func (b *Broker) refuseByFault(cl *mqtt.Client, pk packets.Packet) bool {
	if b.cfg.Faults == nil {
		return false
	}
	id := pk.Connect.ClientIdentifier
	code, reason, ok := b.cfg.Faults.ConnectRefusal(id)
	if !ok {
		return false
	}
	b.log.Info("device connection refused by a fault", zap.String("client_id", maskTopic(id)),
		zap.Int("connack", code), zap.String("reason", reason))
	_ = b.mqtt.SendConnack(cl, connackFor[code], false, nil)
	b.emit(Event{Kind: EventRefused, DeviceID: id, Remote: cl.Net.Remote, Reason: reason})
	return true
}

// ReasonTokenExpiredByFault is the close reason of a token-expire fault: the SAS token
// expiry's own reason, marked as injected.
const ReasonTokenExpiredByFault = faults.ReasonTokenExpire

// currentSessions returns deviceID's current session, or every device's for "".
func (b *Broker) currentSessions(deviceID string) []*session {
	var states []*deviceState
	if deviceID != "" {
		if ds := b.existingState(deviceID); ds != nil {
			states = append(states, ds)
		}
	} else {
		b.devMu.Lock()
		for _, ds := range b.devices {
			states = append(states, ds)
		}
		b.devMu.Unlock()
	}
	var out []*session
	for _, ds := range states {
		ds.mu.Lock()
		if s := ds.current; s != nil {
			out = append(out, s)
		}
		ds.mu.Unlock()
	}
	return out
}

// ExpireToken closes deviceID's connection (every device's for "") as the hub does when its
// SAS token expires, and returns how many it closed (the token-expire fault).
func (b *Broker) ExpireToken(deviceID string) int {
	ss := b.currentSessions(deviceID)
	for _, s := range ss {
		s.log.Info("closing device connection", zap.String("reason", ReasonTokenExpiredByFault))
		s.close(ReasonTokenExpiredByFault)
	}
	return len(ss)
}

// Stall stops reading from and writing to deviceID's connection (every device's for "") until
// release is closed; the connections stay open. It returns how many it stalled.
func (b *Broker) Stall(deviceID string, release <-chan struct{}) int {
	ss := b.currentSessions(deviceID)
	for _, s := range ss {
		s.log.Info("device connection stalled by a fault")
		s.dc.stall.Store(&release)
	}
	return len(ss)
}

// waitStall blocks while the connection is stalled by a fault; false means it was closed
// meanwhile.
func (c *devConn) waitStall() bool {
	p := c.stall.Load()
	if p == nil {
		return true
	}
	select {
	case <-*p:
		c.stall.CompareAndSwap(p, nil)
		return true
	case <-c.done:
		return false
	}
}

// pubackFault applies a puback-drop or puback-delay rule to a telemetry publish with packet ID
// pid. handled means the hook answers for mochi: the PUBACK is not mochi's to send. record says
// whether the message is still recorded (not for a drop: the hub never accepted it).
func (s *session) pubackFault(pid uint16) (handled, record bool) {
	in := s.b.cfg.Faults
	if in == nil {
		return false, true
	}
	delay, drop := in.PubackFault(s.deviceID)
	switch {
	case drop:
		s.log.Debug("telemetry PUBACK dropped by a fault", zap.Uint16("packet_id", pid))
		return true, false
	case delay > 0:
		in.AfterDelay(delay, func() {
			if err := s.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pid}); err != nil {
				s.log.Debug("delayed PUBACK not sent", zap.Error(err))
			}
		})
		return true, true
	}
	return false, true
}

// c2dDuplicate reports whether a cloud-to-device delivery is to be made twice (c2d-duplicate).
func (b *Broker) c2dDuplicate(deviceID, messageID string) bool {
	return b.cfg.Faults != nil && b.cfg.Faults.C2DDuplicate(deviceID, messageID)
}
