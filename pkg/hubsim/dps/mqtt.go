package dps

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/wire"
)

// maxPacket bounds a DPS MQTT packet.
const maxPacket = 64 * 1024

// ErrPacket wraps DPS MQTT packet errors.
var ErrPacket = errors.New("dps: malformed MQTT packet")

// ServeDPSMQTT runs one DPS MQTT session on conn, whose CONNECT (already validated by the
// broker) is connect. It authenticates the CONNECT (CONNACK 5 on failure), then answers
// SUBSCRIBE, register and poll PUBLISHes, UNSUBSCRIBE, PINGREQ and DISCONNECT until the client
// leaves, the keep-alive lapses or conn is closed (the broker closes it on shutdown).
//
// TPM attestation needs HTTPS. A session for a registration ID whose enrollment is TPM is
// accepted without credentials (it has none it could present) and every register and poll is
// answered 400 400004 saying so; a register body with a tpm object gets the same answer.
func (s *Server) ServeDPSMQTT(conn net.Conn, state tls.ConnectionState, connect []byte, ci broker.ConnectInfo) {
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
		cr := Credentials{Token: string(broker.ConnectPassword(connect))}
		if cr.Token == "" {
			cr.Certs = state.PeerCertificates
		}
		m, aerr = s.authenticate(u.IDScope, u.RegistrationID, cr)
	}
	_ = conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if aerr != nil {
		log.Info("DPS connection refused: CONNACK 5 (not authorized)", zap.String("reason", aerr.msg))
		_, _ = conn.Write([]byte{0x20, 0x02, 0x00, 0x05})
		return
	}
	if _, err := conn.Write([]byte{0x20, 0x02, 0x00, 0x00}); err != nil {
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
		body, _ := json.Marshal(rep.body)
		topic := wire.DPSResponseTopic(rep.status, rid, rep.retryAfter)
		if granted == 0x80 {
			return nil // not subscribed: nowhere to deliver
		}
		var vh []byte
		vh = appendString(vh, topic)
		hdr := byte(0x30)
		if granted == 1 {
			hdr |= 0x02
			pid++
			if pid == 0 {
				pid = 1
			}
			vh = binary.BigEndian.AppendUint16(vh, pid)
		}
		return writePacket(conn, hdr, append(vh, body...))
	}
	for {
		_ = conn.SetReadDeadline(time.Now().Add(idle))
		hdr, body, err := readPacket(r)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				log.Debug("DPS connection closed", zap.Error(err))
			}
			return
		}
		_ = conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
		switch hdr >> 4 {
		case 8: // SUBSCRIBE
			if hdr&0x0f != 0x02 || len(body) < 2 {
				return
			}
			id := body[:2]
			rest := body[2:]
			var codes []byte
			for len(rest) > 0 {
				f, n, ok := readString(rest)
				if !ok || len(rest) < n+1 {
					return
				}
				q := rest[n]
				rest = rest[n+1:]
				if f != wire.DPSResponseFilter {
					codes = append(codes, 0x80)
					continue
				}
				granted = min(q, 1)
				codes = append(codes, granted)
			}
			if len(codes) == 0 {
				return
			}
			if writePacket(conn, 0x90, append(append([]byte{}, id...), codes...)) != nil {
				return
			}
		case 10: // UNSUBSCRIBE
			if hdr&0x0f != 0x02 || len(body) < 2 {
				return
			}
			granted = 0x80
			if writePacket(conn, 0xb0, body[:2]) != nil {
				return
			}
		case 12: // PINGREQ
			if writePacket(conn, 0xd0, nil) != nil {
				return
			}
		case 14: // DISCONNECT
			return
		case 4: // PUBACK of a reply
		case 3: // PUBLISH
			qos := (hdr >> 1) & 0x03
			topic, n, ok := readString(body)
			if !ok || qos > 1 {
				log.Info("DPS connection closed: bad PUBLISH")
				return
			}
			rest := body[n:]
			if qos == 1 {
				if len(rest) < 2 {
					return
				}
				if writePacket(conn, 0x40, rest[:2]) != nil {
					return
				}
				rest = rest[2:]
			}
			t, err := wire.ParseDPSTopic(topic)
			if err != nil || t.Kind == wire.DPSResponse {
				log.Info("DPS connection closed: topic not allowed", zap.String("topic", topic))
				return
			}
			var rep reply
			switch {
			case tpmOnly || (t.Kind == wire.DPSRegister && hasTPM(rest)):
				if t.Kind == wire.DPSRegister {
					s.registerRequests.Add(1)
				}
				rep = errorReply(errTPMOverMQTT())
			case t.Kind == wire.DPSRegister:
				rep = s.register(m, rest)
			default:
				rep = s.poll(m.regID, t.OperationID)
			}
			if send(rep, t.RequestID) != nil {
				return
			}
		default:
			log.Info("DPS connection closed: unexpected packet", zap.Uint8("type", hdr>>4))
			return
		}
	}
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func readString(b []byte) (string, int, bool) {
	if len(b) < 2 {
		return "", 0, false
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b) < 2+n {
		return "", 0, false
	}
	return string(b[2 : 2+n]), 2 + n, true
}

// readPacket reads one MQTT packet: its first byte and its body.
func readPacket(r *bufio.Reader) (byte, []byte, error) {
	hdr, err := r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	rem, mult := 0, 1
	for i := 0; ; i++ {
		if i == 4 {
			return 0, nil, fmt.Errorf("%w: remaining length", ErrPacket)
		}
		b, err := r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		rem += int(b&0x7f) * mult
		if b&0x80 == 0 {
			break
		}
		mult *= 128
	}
	if rem > maxPacket {
		return 0, nil, fmt.Errorf("%w: %d bytes", ErrPacket, rem)
	}
	body := make([]byte, rem)
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, nil, err
	}
	return hdr, body, nil
}

func writePacket(w io.Writer, hdr byte, body []byte) error {
	pkt := []byte{hdr}
	n := len(body)
	for {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		pkt = append(pkt, b)
		if n == 0 {
			break
		}
	}
	_, err := w.Write(append(pkt, body...))
	return err
}
