package dps

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/mqttpkt"
	"github.com/iothubby/iothubby/pkg/wire"
)

// maxPacket bounds a DPS MQTT packet.
const maxPacket = 64 * 1024

// MsgMalformedPacket is logged, with the codec's reason, when a DPS MQTT session ends on a packet
// the codec refuses.
const MsgMalformedPacket = "DPS connection closed: malformed packet"

// ServeDPSMQTT runs one DPS MQTT session on conn, whose CONNECT (already validated by the
// broker) is connect. It authenticates the CONNECT (CONNACK 5 on failure), then answers
// SUBSCRIBE, register and poll PUBLISHes, UNSUBSCRIBE, PINGREQ and DISCONNECT until the client
// leaves, the keep-alive lapses or conn is closed (the broker closes it on shutdown).
//
// TPM attestation needs HTTPS. A session for a registration ID whose enrollment is TPM is
// accepted without credentials (it has none it could present) and every register and poll is
// answered 400 400004 saying so; a register body with a tpm object gets the same answer.
func (s *Server) ServeDPSMQTT(conn net.Conn, state tls.ConnectionState, connect []byte, ci mqttpkt.ConnectInfo) {
	log := s.log.With(zap.String("client_id", ci.ClientID), zap.String("remote", conn.RemoteAddr().String()))
	defer conn.Close()
	u, err := wire.ParseDPSUsername(ci.Username)
	var m *match
	var aerr *apiError
	tpmOnly := false
	switch {
	case err != nil:
		aerr = errf(401, 401002, "%v", err)
	case u.RegistrationID != ci.ClientID:
		aerr = errf(401, 401002, "client ID %q is not the registration ID %q", ci.ClientID, u.RegistrationID)
	case strings.EqualFold(u.IDScope, s.cfg.IDScope) && wire.ValidateRegistrationID(u.RegistrationID) == nil &&
		s.isTPMEnrollment(u.RegistrationID):
		tpmOnly = true
	default:
		cr := Credentials{Token: string(mqttpkt.ConnectPassword(connect))}
		if cr.Token == "" {
			cr.Certs = state.PeerCertificates
		}
		m, aerr = s.authenticate(u.IDScope, u.RegistrationID, cr)
	}
	_ = conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if aerr != nil {
		log.Info("DPS connection refused: CONNACK 5 (not authorized)", zap.String("reason", aerr.msg))
		_ = mqttpkt.Write(conn, mqttpkt.Connack(5))
		return
	}
	if err := mqttpkt.Write(conn, mqttpkt.Connack(0)); err != nil {
		return
	}
	if tpmOnly {
		log.Info("DPS MQTT session of a TPM enrollment: its requests will be refused (TPM needs HTTPS)", zap.String("registration_id", u.RegistrationID))
	} else {
		log.Debug("DPS device connected", zap.String("registration_id", m.regID))
	}
	idle := DeadlineFor(ci.KeepAlive)
	r := bufio.NewReader(conn)
	var granted byte = 0x80 // no subscription yet
	var pid uint16
	send := func(rep reply, rid string) error {
		if granted == 0x80 {
			return nil // not subscribed: nowhere to deliver
		}
		body, _ := json.Marshal(rep.body)
		pub := mqttpkt.Publish(wire.DPSResponseTopic(rep.status, rid, rep.retryAfter), granted, 0, body)
		if granted == 1 {
			pid++
			if pid == 0 {
				pid = 1
			}
			pub.PacketID = pid
		}
		return mqttpkt.Write(conn, pub)
	}
	for {
		_ = conn.SetReadDeadline(time.Now().Add(idle))
		pk, err := mqttpkt.Read(r, maxPacket)
		var ve *mqttpkt.VersionError
		if err != nil {
			switch {
			case errors.Is(err, mqttpkt.ErrMalformed), errors.Is(err, mqttpkt.ErrMalformedConnect), errors.As(err, &ve):
				log.Info(MsgMalformedPacket, zap.Error(err))
			case !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed):
				log.Debug("DPS connection closed", zap.Error(err))
			}
			return
		}
		_ = conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
		switch pk.FixedHeader.Type {
		case packets.Subscribe:
			codes := make([]byte, len(pk.Filters))
			for i, f := range pk.Filters {
				if f.Filter != wire.DPSResponseFilter {
					codes[i] = 0x80
					continue
				}
				granted = min(f.Qos, 1)
				codes[i] = granted
			}
			if mqttpkt.Write(conn, mqttpkt.Suback(pk.PacketID, codes...)) != nil {
				return
			}
		case packets.Unsubscribe:
			granted = 0x80
			if mqttpkt.Write(conn, mqttpkt.Unsuback(pk.PacketID)) != nil {
				return
			}
		case packets.Pingreq:
			if mqttpkt.Write(conn, mqttpkt.Bare(packets.Pingresp)) != nil {
				return
			}
		case packets.Disconnect:
			return
		case packets.Puback: // of a reply
		case packets.Publish:
			if pk.FixedHeader.Qos > 1 {
				log.Info("DPS connection closed: bad PUBLISH", zap.Uint8("qos", pk.FixedHeader.Qos))
				return
			}
			if pk.FixedHeader.Qos == 1 && mqttpkt.Write(conn, mqttpkt.Puback(pk.PacketID)) != nil {
				return
			}
			t, err := wire.ParseDPSTopic(pk.TopicName)
			if err != nil || t.Kind == wire.DPSResponse {
				log.Info("DPS connection closed: topic not allowed", zap.String("topic", pk.TopicName))
				return
			}
			var rep reply
			frep, faulted := reply{}, false
			if !tpmOnly {
				frep, faulted = s.faultReply(context.Background(), m.regID)
				_ = conn.SetWriteDeadline(time.Now().Add(10 * time.Second)) // after a dps-delay
			}
			switch {
			case faulted:
				if t.Kind == wire.DPSRegister {
					s.registerRequests.Add(1)
				}
				rep = frep
			case tpmOnly || (t.Kind == wire.DPSRegister && hasTPM(pk.Payload)):
				if t.Kind == wire.DPSRegister {
					s.registerRequests.Add(1)
				}
				rep = errorReply(errTPMOverMQTT())
			case t.Kind == wire.DPSRegister:
				rep = s.register(m, pk.Payload)
			default:
				rep = s.poll(m.regID, t.OperationID)
			}
			if send(rep, t.RequestID) != nil {
				return
			}
		default:
			log.Info("DPS connection closed: unexpected packet", zap.Uint8("type", pk.FixedHeader.Type))
			return
		}
	}
}
