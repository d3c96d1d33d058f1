package broker

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// MQTT 3.1.1 CONNECT handling that runs before mochi sees a byte. mochi v2.7.9 can crash on a
// malformed MQTT 5 CONNECT, and IoT Hub speaks 3.1.1 only, so the first packet of every
// connection is read and validated here: protocol level 4 passes (the bytes are replayed to
// mochi), any other level is answered with CONNACK return code 1 and the connection closed,
// anything malformed just closes.

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

// connackUnacceptableVersion is a 3.1.1 CONNACK with return code 1.
const connackUnacceptableVersion = "\x20\x02\x00\x01"

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

// readConnect reads the first packet from r. It stops early, with a *VersionError, as soon as
// the protocol level byte shows a version other than 3.1.1 (so a truncated or malformed MQTT 5
// packet is refused on its first bytes); otherwise it reads the whole packet (at most max bytes of
// remaining length) and returns it, fixed header included, for ParseConnect and for mochi.
// remaining is how many bytes of the packet were left unread when it returns early.
func readConnect(r io.Reader, max int) (pkt []byte, remaining int, err error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:1]); err != nil {
		return nil, 0, fmt.Errorf("%w: %v", ErrMalformedConnect, err)
	}
	if hdr[0] != 0x10 {
		return nil, 0, fmt.Errorf("%w: first byte 0x%02x is not CONNECT", ErrMalformedConnect, hdr[0])
	}
	n := 1
	rem, mult := 0, 1
	for {
		if n == 5 {
			return nil, 0, fmt.Errorf("%w: remaining length longer than 4 bytes", ErrMalformedConnect)
		}
		if _, err := io.ReadFull(r, hdr[n:n+1]); err != nil {
			return nil, 0, fmt.Errorf("%w: %v", ErrMalformedConnect, err)
		}
		b := hdr[n]
		n++
		rem += int(b&0x7f) * mult
		if b&0x80 == 0 {
			break
		}
		mult *= 128
	}
	if rem > max {
		return nil, 0, fmt.Errorf("%w: %d bytes, limit %d", ErrMalformedConnect, rem, max)
	}
	// Protocol name (2-byte length, "MQTT" or "MQIsdp") and level.
	if rem < 2 {
		return nil, 0, fmt.Errorf("%w: too short for a protocol name", ErrMalformedConnect)
	}
	head := make([]byte, 2, 16)
	if _, err := io.ReadFull(r, head); err != nil {
		return nil, 0, fmt.Errorf("%w: %v", ErrMalformedConnect, err)
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
		return nil, 0, fmt.Errorf("%w: %v", ErrMalformedConnect, err)
	}
	name := string(head[2 : 2+nameLen])
	level := head[2+nameLen]
	if name != "MQTT" && name != "MQIsdp" {
		return nil, 0, fmt.Errorf("%w: protocol name %q", ErrMalformedConnect, name)
	}
	if name != "MQTT" || level != 4 {
		return nil, rem - len(head), &VersionError{Name: name, Level: level}
	}
	pkt = make([]byte, n+rem)
	copy(pkt, hdr[:n])
	copy(pkt[n:], head)
	if _, err := io.ReadFull(r, pkt[n+len(head):]); err != nil {
		return nil, 0, fmt.Errorf("%w: %v", ErrMalformedConnect, err)
	}
	return pkt, 0, nil
}

// ParseConnect validates a complete MQTT 3.1.1 CONNECT packet (fixed header included) against
// the specification: flags, field lengths that add up exactly, UTF-8 strings without U+0000,
// will QoS 0 or 1 (IoT Hub supports no QoS 2), password only with a username. A packet it
// accepts is safe for mochi's decoder.
func ParseConnect(pkt []byte) (ConnectInfo, error) {
	var ci ConnectInfo
	if len(pkt) < 2 || pkt[0] != 0x10 {
		return ci, fmt.Errorf("%w: not a CONNECT", ErrMalformedConnect)
	}
	rem, n, err := decodeVarint(pkt[1:])
	if err != nil {
		return ci, err
	}
	body := pkt[1+n:]
	if len(body) != rem {
		return ci, fmt.Errorf("%w: remaining length %d but %d bytes", ErrMalformedConnect, rem, len(body))
	}
	d := decoder{b: body}
	name, ok := d.str()
	if !ok || name != "MQTT" {
		return ci, fmt.Errorf("%w: protocol name", ErrMalformedConnect)
	}
	level, ok := d.byte()
	if !ok {
		return ci, fmt.Errorf("%w: no protocol level", ErrMalformedConnect)
	}
	if level != 4 {
		return ci, &VersionError{Name: name, Level: level}
	}
	flags, ok := d.byte()
	if !ok {
		return ci, fmt.Errorf("%w: no connect flags", ErrMalformedConnect)
	}
	if flags&0x01 != 0 {
		return ci, fmt.Errorf("%w: reserved flag set", ErrMalformedConnect)
	}
	ci.Clean = flags&0x02 != 0
	ci.WillFlag = flags&0x04 != 0
	ci.WillQoS = (flags >> 3) & 0x03
	ci.WillRetain = flags&0x20 != 0
	ci.HasPassword = flags&0x40 != 0
	ci.HasUsername = flags&0x80 != 0
	if !ci.WillFlag && (ci.WillQoS != 0 || ci.WillRetain) {
		return ci, fmt.Errorf("%w: will QoS or retain without will flag", ErrMalformedConnect)
	}
	if ci.WillQoS > 1 {
		return ci, fmt.Errorf("%w: will QoS %d (IoT Hub supports 0 and 1)", ErrMalformedConnect, ci.WillQoS)
	}
	if ci.HasPassword && !ci.HasUsername {
		return ci, fmt.Errorf("%w: password flag without username flag", ErrMalformedConnect)
	}
	if ci.KeepAlive, ok = d.uint16(); !ok {
		return ci, fmt.Errorf("%w: no keep-alive", ErrMalformedConnect)
	}
	if ci.ClientID, ok = d.str(); !ok {
		return ci, fmt.Errorf("%w: client identifier", ErrMalformedConnect)
	}
	if ci.WillFlag {
		if ci.WillTopic, ok = d.str(); !ok || ci.WillTopic == "" {
			return ci, fmt.Errorf("%w: will topic", ErrMalformedConnect)
		}
		p, ok := d.bin()
		if !ok || len(p) == 0 {
			// mochi refuses an empty will payload with a CONNACK code 3.1.1 lacks.
			return ci, fmt.Errorf("%w: will payload", ErrMalformedConnect)
		}
		ci.PayloadLen = len(p)
	}
	if ci.HasUsername {
		if ci.Username, ok = d.str(); !ok {
			return ci, fmt.Errorf("%w: user name", ErrMalformedConnect)
		}
	}
	if ci.HasPassword {
		p, ok := d.bin()
		if !ok || len(p) == 0 {
			return ci, fmt.Errorf("%w: password", ErrMalformedConnect)
		}
	}
	if len(d.b) != 0 {
		return ci, fmt.Errorf("%w: %d trailing bytes", ErrMalformedConnect, len(d.b))
	}
	return ci, nil
}

func decodeVarint(b []byte) (value, n int, err error) {
	mult := 1
	for i := 0; i < 4; i++ {
		if i >= len(b) {
			return 0, 0, fmt.Errorf("%w: truncated remaining length", ErrMalformedConnect)
		}
		value += int(b[i]&0x7f) * mult
		if b[i]&0x80 == 0 {
			return value, i + 1, nil
		}
		mult *= 128
	}
	return 0, 0, fmt.Errorf("%w: remaining length longer than 4 bytes", ErrMalformedConnect)
}

type decoder struct{ b []byte }

func (d *decoder) byte() (byte, bool) {
	if len(d.b) < 1 {
		return 0, false
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c, true
}

func (d *decoder) uint16() (uint16, bool) {
	if len(d.b) < 2 {
		return 0, false
	}
	v := binary.BigEndian.Uint16(d.b)
	d.b = d.b[2:]
	return v, true
}

func (d *decoder) bin() ([]byte, bool) {
	n, ok := d.uint16()
	if !ok || len(d.b) < int(n) {
		return nil, false
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v, true
}

func (d *decoder) str() (string, bool) {
	v, ok := d.bin()
	if !ok || !utf8.Valid(v) {
		return "", false
	}
	for _, c := range v {
		if c == 0 {
			return "", false
		}
	}
	return string(v), true
}

// ConnectPassword returns the password of a CONNECT that ParseConnect accepted (nil when it has
// none). It is kept apart from ConnectInfo so that the password is never logged with it.
func ConnectPassword(pkt []byte) []byte {
	ci, err := ParseConnect(pkt)
	if err != nil || !ci.HasPassword {
		return nil
	}
	rem, n, err := decodeVarint(pkt[1:])
	if err != nil || len(pkt[1+n:]) != rem {
		return nil
	}
	d := decoder{b: pkt[1+n:]}
	_, _ = d.str()    // protocol name
	_, _ = d.byte()   // level
	_, _ = d.byte()   // flags
	_, _ = d.uint16() // keep-alive
	_, _ = d.str()    // client ID
	if ci.WillFlag {
		_, _ = d.str()
		_, _ = d.bin()
	}
	_, _ = d.str() // user name
	p, _ := d.bin()
	return p
}
