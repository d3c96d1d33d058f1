package mqttpkt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"

	"github.com/mochi-mqtt/server/v2/packets"
)

// The CONNECT screen. mochi v2.7.9 can crash on a malformed MQTT 5 CONNECT, and IoT Hub speaks
// 3.1.1 only, so the first packet of every connection is read and checked here before mochi
// sees a byte: protocol level 4 passes (the bytes are replayed to mochi), any other level is a
// *VersionError (hubsim answers CONNACK 1 and closes), anything malformed wraps
// ErrMalformedConnect (hubsim just closes).

// ErrMalformedConnect wraps every reason a first packet is not an acceptable CONNECT.
var ErrMalformedConnect = errors.New("malformed CONNECT")

// VersionError reports a CONNECT whose protocol level is not 4 (MQTT 3.1.1).
type VersionError struct {
	Name  string
	Level byte
}

func (e *VersionError) Error() string {
	return fmt.Sprintf("unsupported protocol %q level %d (IoT Hub requires MQTT 3.1.1, level 4)", e.Name, e.Level)
}

// ConnackUnacceptableVersion is the 3.1.1 CONNACK with return code 1 that answers a
// *VersionError.
const ConnackUnacceptableVersion = "\x20\x02\x00\x01"

// ConnectInfo is what ParseConnect reads from a CONNECT. It never holds the password.
type ConnectInfo struct {
	ClientID    string
	Username    string
	HasUsername bool
	HasPassword bool
	Clean       bool
	KeepAlive   uint16
	WillFlag    bool
	WillTopic   string
	WillQoS     byte
	WillRetain  bool
	PayloadLen  int // will payload length
}

// Screen reads the first packet of a connection from r (remaining length at most max) and checks
// it: ReadConnect, then ParseConnect. remaining is how many bytes of a refused packet were left
// unread (see ReadConnect).
func Screen(r io.Reader, max int) (pkt []byte, ci ConnectInfo, remaining int, err error) {
	pkt, remaining, err = ReadConnect(r, max)
	if err != nil {
		return nil, ci, remaining, err
	}
	ci, err = ParseConnect(pkt)
	if err != nil {
		return nil, ci, 0, err
	}
	return pkt, ci, 0, nil
}

// ReadConnect reads the first packet from r. It stops early, with a *VersionError, as soon as
// the protocol level byte shows a version other than 3.1.1 (so a truncated or malformed MQTT 5
// packet is refused on its first bytes); otherwise it reads the whole packet (at most max bytes of
// remaining length) and returns it, fixed header included. remaining is how many bytes of the
// packet were left unread when it returns early. It never reads past the packet.
func ReadConnect(r io.Reader, max int) (pkt []byte, remaining int, err error) {
	hdr := make([]byte, 1, 5)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return nil, 0, fmt.Errorf("%w: %v", ErrMalformedConnect, err)
	}
	if hdr[0] != 0x10 {
		return nil, 0, fmt.Errorf("%w: first byte 0x%02x is not CONNECT", ErrMalformedConnect, hdr[0])
	}
	rem, hdr, err := readLength(r, hdr)
	if err != nil {
		return nil, 0, lengthError(ErrMalformedConnect, err)
	}
	if rem > max {
		return nil, 0, fmt.Errorf("%w: %d bytes, limit %d", ErrMalformedConnect, rem, max)
	}
	// Protocol name (2-byte length, "MQTT" or "MQIsdp") and level.
	if rem < 2 {
		return nil, 0, fmt.Errorf("%w: too short for a protocol name", ErrMalformedConnect)
	}
	head := make([]byte, 2, 9)
	if _, err := io.ReadFull(r, head); err != nil {
		return nil, 0, fmt.Errorf("%w: %v", ErrMalformedConnect, unexpected(err))
	}
	nameLen := int(binary.BigEndian.Uint16(head))
	if nameLen != 4 && nameLen != 6 {
		return nil, 0, fmt.Errorf("%w: protocol name of %d bytes", ErrMalformedConnect, nameLen)
	}
	if rem < 2+nameLen+1 {
		return nil, 0, fmt.Errorf("%w: too short for a protocol level", ErrMalformedConnect)
	}
	head = head[:2+nameLen+1]
	if _, err := io.ReadFull(r, head[2:]); err != nil {
		return nil, 0, fmt.Errorf("%w: %v", ErrMalformedConnect, unexpected(err))
	}
	if err := checkProtocol(head); err != nil {
		return nil, rem - len(head), err
	}
	pkt = make([]byte, len(hdr)+rem)
	copy(pkt, hdr)
	copy(pkt[len(hdr):], head)
	if _, err := io.ReadFull(r, pkt[len(hdr)+len(head):]); err != nil {
		return nil, 0, fmt.Errorf("%w: %v", ErrMalformedConnect, unexpected(err))
	}
	return pkt, 0, nil
}

// checkProtocol checks the protocol name and level at the start of a CONNECT's body (b holds at
// least the name and the level byte): "MQTT" level 4 passes, "MQTT" or "MQIsdp" at another
// level is a *VersionError.
func checkProtocol(b []byte) error {
	n := int(binary.BigEndian.Uint16(b))
	name := string(b[2 : 2+n])
	level := b[2+n]
	if name != "MQTT" && name != "MQIsdp" {
		return fmt.Errorf("%w: protocol name %q", ErrMalformedConnect, name)
	}
	if name != "MQTT" || level != Level {
		return &VersionError{Name: name, Level: level}
	}
	return nil
}

// ParseConnect validates a complete MQTT 3.1.1 CONNECT packet (fixed header included) against
// the specification: flags, field lengths that add up exactly, UTF-8 strings without U+0000,
// will QoS 0 or 1 (IoT Hub supports no QoS 2), password only with a username. A packet it
// accepts is safe for mochi's decoder.
func ParseConnect(pkt []byte) (ConnectInfo, error) {
	pk, err := decodeConnect(pkt)
	if err != nil {
		return ConnectInfo{}, err
	}
	c := pk.Connect
	return ConnectInfo{ClientID: c.ClientIdentifier, Username: string(c.Username), HasUsername: c.UsernameFlag,
		HasPassword: c.PasswordFlag, Clean: c.Clean, KeepAlive: c.Keepalive, WillFlag: c.WillFlag,
		WillTopic: c.WillTopic, WillQoS: c.WillQos, WillRetain: c.WillRetain, PayloadLen: len(c.WillPayload)}, nil
}

// ConnectPassword returns the password of a CONNECT that ParseConnect accepts (nil when it has
// none). It is kept apart from ConnectInfo so that the password is never logged with it.
func ConnectPassword(pkt []byte) []byte {
	pk, err := decodeConnect(pkt)
	if err != nil {
		return nil
	}
	return pk.Connect.Password
}

func decodeConnect(pkt []byte) (packets.Packet, error) {
	if len(pkt) < 2 || pkt[0] != 0x10 {
		return packets.Packet{}, fmt.Errorf("%w: not a CONNECT", ErrMalformedConnect)
	}
	rem, hdr, err := readLength(bytes.NewReader(pkt[1:]), nil)
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			err = errors.New("truncated remaining length")
		}
		return packets.Packet{}, lengthError(ErrMalformedConnect, err)
	}
	body := pkt[1+len(hdr):]
	if len(body) != rem {
		return packets.Packet{}, fmt.Errorf("%w: remaining length %d but %d bytes", ErrMalformedConnect, rem, len(body))
	}
	return connectBody(body)
}

// connectBody decodes and checks a CONNECT's body with mochi's decoder, once the protocol level
// is known to be 4 (mochi's MQTT 5 property decoder is where it can crash).
func connectBody(body []byte) (packets.Packet, error) {
	if len(body) < 2 {
		return packets.Packet{}, fmt.Errorf("%w: protocol name", ErrMalformedConnect)
	}
	if n := int(binary.BigEndian.Uint16(body)); (n != 4 && n != 6) || len(body) < 2+n+1 {
		return packets.Packet{}, fmt.Errorf("%w: protocol name", ErrMalformedConnect)
	}
	if err := checkProtocol(body); err != nil {
		return packets.Packet{}, err
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect, Remaining: len(body)}}
	if err := pk.ConnectDecode(body); err != nil {
		return packets.Packet{}, fmt.Errorf("%w: %s", ErrMalformedConnect, strings.TrimPrefix(err.Error(), "malformed packet: "))
	}
	c := &pk.Connect
	switch {
	case pk.ReservedBit != 0:
		return packets.Packet{}, fmt.Errorf("%w: reserved flag set", ErrMalformedConnect)
	case !c.WillFlag && (c.WillQos != 0 || c.WillRetain):
		return packets.Packet{}, fmt.Errorf("%w: will QoS or retain without will flag", ErrMalformedConnect)
	case c.WillQos > 1:
		return packets.Packet{}, fmt.Errorf("%w: will QoS %d (IoT Hub supports 0 and 1)", ErrMalformedConnect, c.WillQos)
	case c.PasswordFlag && !c.UsernameFlag:
		return packets.Packet{}, fmt.Errorf("%w: password flag without username flag", ErrMalformedConnect)
	case c.WillFlag && c.WillTopic == "":
		return packets.Packet{}, fmt.Errorf("%w: will topic", ErrMalformedConnect)
	case c.WillFlag && len(c.WillPayload) == 0:
		// mochi refuses an empty will payload with a CONNACK code 3.1.1 lacks.
		return packets.Packet{}, fmt.Errorf("%w: will payload", ErrMalformedConnect)
	case c.UsernameFlag && (!utf8.Valid(c.Username) || bytes.IndexByte(c.Username, 0) >= 0):
		return packets.Packet{}, fmt.Errorf("%w: user name is not UTF-8 without U+0000", ErrMalformedConnect)
	case c.PasswordFlag && len(c.Password) == 0:
		return packets.Packet{}, fmt.Errorf("%w: password", ErrMalformedConnect)
	}
	// mochi reads the fields it expects and ignores what follows them.
	used := 2 + len(c.ProtocolName) + 1 + 1 + 2 + 2 + len(c.ClientIdentifier)
	if c.WillFlag {
		used += 2 + len(c.WillTopic) + 2 + len(c.WillPayload)
	}
	if c.UsernameFlag {
		used += 2 + len(c.Username)
	}
	if c.PasswordFlag {
		used += 2 + len(c.Password)
	}
	if used != len(body) {
		return packets.Packet{}, fmt.Errorf("%w: %d trailing bytes", ErrMalformedConnect, len(body)-used)
	}
	normalize(&pk)
	return pk, nil
}
