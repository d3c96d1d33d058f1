// Package mqttpkt is hubsim's MQTT 3.1.1 packet codec for the paths that do not go through mochi:
// the CONNECT screen in front of the broker (every connection's first packet) and the DPS
// device endpoint over MQTT. Framing (the fixed header, the remaining length and its bound) and
// the refusals IoT Hub's rules add are here; the fields of each packet are encoded and decoded by
// mochi's packets package, at protocol level 4.
//
// Cases and ConnectCases are the byte-commented packet tables that this package's tests and
// hubsim's broker and DPS tests all read.
package mqttpkt

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Level is the only MQTT protocol level IoT Hub and DPS speak (3.1.1).
const Level = 4

// ErrMalformed wraps every reason a packet after CONNECT cannot be decoded.
var ErrMalformed = errors.New("malformed MQTT packet")

// Read reads one MQTT 3.1.1 packet from r, whose remaining length may be at most max bytes, and
// decodes it. It reads exactly the packet's bytes. A CONNECT gets ParseConnect's checks. Errors
// from r are returned as they are (io.EOF when the peer closed between packets); anything
// malformed wraps ErrMalformed (ErrMalformedConnect for a CONNECT).
func Read(r io.Reader, max int) (packets.Packet, error) {
	first, body, err := ReadRaw(r, max)
	if err != nil {
		return packets.Packet{}, err
	}
	return decodeBody(first, body)
}

// ReadRaw reads one packet's framing from r: its first byte and its remaining bytes (at most
// max), undecoded. It reads exactly the packet's bytes; errors are as Read's.
func ReadRaw(r io.Reader, max int) (first byte, body []byte, err error) {
	var b [1]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return 0, nil, err
	}
	rem, _, err := readLength(r, nil)
	if err != nil {
		return 0, nil, lengthError(ErrMalformed, err)
	}
	if rem > max {
		return 0, nil, fmt.Errorf("%w: %d bytes, limit %d", ErrMalformed, rem, max)
	}
	body = make([]byte, rem)
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, nil, fmt.Errorf("%w: %v", ErrMalformed, unexpected(err))
	}
	return b[0], body, nil
}

// Frame puts the fixed header (first byte and remaining length) in front of body, for tests that
// build packets Encode would refuse to write.
func Frame(first byte, body []byte) []byte {
	var buf bytes.Buffer
	fh := packets.FixedHeader{Type: first >> 4, Dup: first&0x08 != 0, Qos: (first >> 1) & 3, Retain: first&1 != 0, Remaining: len(body)}
	fh.Encode(&buf)
	buf.Write(body)
	return buf.Bytes()
}

// Decode decodes b, which must hold exactly one packet.
func Decode(b []byte) (packets.Packet, error) {
	r := bytes.NewReader(b)
	pk, err := Read(r, len(b))
	if err == nil && r.Len() != 0 {
		return packets.Packet{}, fmt.Errorf("%w: %d bytes after the packet", ErrMalformed, r.Len())
	}
	if errors.Is(err, io.EOF) {
		err = fmt.Errorf("%w: empty", ErrMalformed)
	}
	return pk, err
}

// decodeBody decodes a packet whose first byte is first and whose remaining bytes are body.
func decodeBody(first byte, body []byte) (packets.Packet, error) {
	if first>>4 == packets.Connect {
		if first != 0x10 {
			return packets.Packet{}, fmt.Errorf("%w: CONNECT flags 0x%x", ErrMalformedConnect, first&0x0f)
		}
		return connectBody(body)
	}
	pk := packets.Packet{ProtocolVersion: Level}
	if err := pk.FixedHeader.Decode(first); err != nil {
		return packets.Packet{}, fmt.Errorf("%w: first byte 0x%02x: %v", ErrMalformed, first, err)
	}
	pk.FixedHeader.Remaining = len(body)
	name := typeName(pk.FixedHeader.Type)
	want := -1 // the remaining length fixed by the type, -1 when it varies
	var err error
	var code packets.Code = packets.CodeSuccess
	switch pk.FixedHeader.Type {
	case packets.Publish:
		if err = pk.PublishDecode(body); err == nil {
			code = pk.PublishValidate(0)
		}
	case packets.Subscribe:
		if err = pk.SubscribeDecode(body); err == nil {
			code = pk.SubscribeValidate()
		}
	case packets.Unsubscribe:
		if err = pk.UnsubscribeDecode(body); err == nil {
			code = pk.UnsubscribeValidate()
		}
	case packets.Suback:
		if err = pk.SubackDecode(body); err == nil {
			for _, c := range pk.ReasonCodes {
				if c > 2 && c != 0x80 {
					return packets.Packet{}, fmt.Errorf("%w: SUBACK return code 0x%02x", ErrMalformed, c)
				}
			}
			if len(pk.ReasonCodes) == 0 {
				return packets.Packet{}, fmt.Errorf("%w: SUBACK without return codes", ErrMalformed)
			}
		}
	case packets.Connack:
		want = 2
		if len(body) == 2 && body[0] > 1 {
			return packets.Packet{}, fmt.Errorf("%w: CONNACK flags 0x%02x", ErrMalformed, body[0])
		}
		err = pk.ConnackDecode(body)
	case packets.Puback, packets.Pubrec, packets.Pubrel, packets.Pubcomp, packets.Unsuback:
		want = 2
		pk.PacketID, err = packetID(body)
	case packets.Pingreq, packets.Pingresp, packets.Disconnect:
		want = 0
	default:
		return packets.Packet{}, fmt.Errorf("%w: packet type %d", ErrMalformed, pk.FixedHeader.Type)
	}
	if want >= 0 && len(body) != want {
		return packets.Packet{}, fmt.Errorf("%w: %s of %d bytes, want %d", ErrMalformed, name, len(body), want)
	}
	if err != nil {
		return packets.Packet{}, fmt.Errorf("%w: %s: %v", ErrMalformed, name, err)
	}
	if code != packets.CodeSuccess {
		return packets.Packet{}, fmt.Errorf("%w: %s: %v", ErrMalformed, name, code)
	}
	normalize(&pk)
	return pk, nil
}

func packetID(b []byte) (uint16, error) {
	if len(b) < 2 {
		return 0, packets.ErrMalformedPacketID
	}
	return uint16(b[0])<<8 | uint16(b[1]), nil
}

// normalize makes empty byte fields nil, so that a decoded packet compares equal to a table's.
func normalize(pk *packets.Packet) {
	for _, b := range []*[]byte{&pk.Payload, &pk.ReasonCodes, &pk.Connect.Username, &pk.Connect.Password, &pk.Connect.WillPayload} {
		if len(*b) == 0 {
			*b = nil
		}
	}
}

// Encode encodes pk at protocol level 4 (unless pk says otherwise), setting the fixed header
// flags that the packet type fixes.
func Encode(pk packets.Packet) ([]byte, error) {
	if pk.ProtocolVersion == 0 {
		pk.ProtocolVersion = Level
	}
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		if pk.Connect.ProtocolName == nil {
			pk.Connect.ProtocolName = []byte("MQTT")
		}
		err = pk.ConnectEncode(&buf)
	case packets.Connack:
		err = pk.ConnackEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Puback:
		err = pk.PubackEncode(&buf)
	case packets.Pubrec:
		err = pk.PubrecEncode(&buf)
	case packets.Pubrel:
		pk.FixedHeader.Qos = 1
		err = pk.PubrelEncode(&buf)
	case packets.Pubcomp:
		err = pk.PubcompEncode(&buf)
	case packets.Subscribe:
		pk.FixedHeader.Qos = 1
		err = pk.SubscribeEncode(&buf)
	case packets.Suback:
		err = pk.SubackEncode(&buf)
	case packets.Unsubscribe:
		pk.FixedHeader.Qos = 1
		err = pk.UnsubscribeEncode(&buf)
	case packets.Unsuback:
		err = pk.UnsubackEncode(&buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(&buf)
	case packets.Pingresp:
		err = pk.PingrespEncode(&buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&buf)
	default:
		return nil, fmt.Errorf("mqttpkt: cannot encode packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("mqttpkt: encode %s: %w", typeName(pk.FixedHeader.Type), err)
	}
	return buf.Bytes(), nil
}

// Write encodes pk and writes it to w in one call.
func Write(w io.Writer, pk packets.Packet) error {
	b, err := Encode(pk)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// Connack is a CONNACK with return code code (0 accepted, 1 unacceptable protocol version,
// 5 not authorized).
func Connack(code byte) packets.Packet {
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, ReasonCode: code}
}

// Publish is a PUBLISH of payload to topic; id is its packet identifier when qos > 0.
func Publish(topic string, qos byte, id uint16, payload []byte) packets.Packet {
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, TopicName: topic, PacketID: id, Payload: payload}
}

// Puback acknowledges the QoS 1 PUBLISH id.
func Puback(id uint16) packets.Packet {
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: id}
}

// Subscribe asks for filters, each at qos.
func Subscribe(id uint16, qos byte, filters ...string) packets.Packet {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: id, Filters: packets.Subscriptions{}}
	for _, f := range filters {
		pk.Filters = append(pk.Filters, packets.Subscription{Filter: f, Qos: qos})
	}
	return pk
}

// Suback answers SUBSCRIBE id with one return code per filter (0 or 1 granted, 0x80 refused).
func Suback(id uint16, codes ...byte) packets.Packet {
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Suback}, PacketID: id, ReasonCodes: codes}
}

// Unsubscribe drops filters.
func Unsubscribe(id uint16, filters ...string) packets.Packet {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Unsubscribe, Qos: 1}, PacketID: id, Filters: packets.Subscriptions{}}
	for _, f := range filters {
		pk.Filters = append(pk.Filters, packets.Subscription{Filter: f})
	}
	return pk
}

// Unsuback answers UNSUBSCRIBE id.
func Unsuback(id uint16) packets.Packet {
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Unsuback}, PacketID: id}
}

// Bare is a packet of type typ that has no fields (PINGREQ, PINGRESP, DISCONNECT).
func Bare(typ byte) packets.Packet {
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: typ}}
}

// readLength reads a remaining length (1 to 4 bytes) from r one byte at a time, so that nothing
// after it is consumed; the bytes read are appended to hdr.
func readLength(r io.Reader, hdr []byte) (int, []byte, error) {
	var b [1]byte
	value, mult := 0, 1
	for i := 0; ; i++ {
		if i == 4 {
			return 0, hdr, errLongLength
		}
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return 0, hdr, unexpected(err)
		}
		hdr = append(hdr, b[0])
		value += int(b[0]&0x7f) * mult
		if b[0]&0x80 == 0 {
			return value, hdr, nil
		}
		mult *= 128
	}
}

var errLongLength = errors.New("remaining length longer than 4 bytes")

func lengthError(kind, err error) error {
	return fmt.Errorf("%w: %v", kind, err)
}

// unexpected turns an io.EOF inside a packet into io.ErrUnexpectedEOF.
func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

func typeName(t byte) string {
	if n, ok := packets.PacketNames[t]; ok {
		return strings.ToUpper(n)
	}
	return fmt.Sprintf("type %d", t)
}
