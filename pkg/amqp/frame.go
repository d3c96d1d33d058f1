package amqp

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Protocol headers (AMQP 1.0 §2.2): "AMQP", protocol id, major 1, minor 0, revision 0.
var (
	HeaderAMQP = [8]byte{'A', 'M', 'Q', 'P', 0, 1, 0, 0}
	HeaderTLS  = [8]byte{'A', 'M', 'Q', 'P', 2, 1, 0, 0}
	HeaderSASL = [8]byte{'A', 'M', 'Q', 'P', 3, 1, 0, 0}
)

// ErrProtocolHeader is returned for eight bytes that are not an AMQP 1.0 protocol header.
var ErrProtocolHeader = errors.New("amqp: not an AMQP 1.0 protocol header")

// ParseProtocolHeader returns the protocol id (0 AMQP, 2 TLS, 3 SASL) of an AMQP 1.0 header.
func ParseProtocolHeader(h [8]byte) (byte, error) {
	if h[0] != 'A' || h[1] != 'M' || h[2] != 'Q' || h[3] != 'P' || h[5] != 1 || h[6] != 0 || h[7] != 0 {
		return 0, ErrProtocolHeader
	}
	switch h[4] {
	case 0, 2, 3:
		return h[4], nil
	}
	return 0, ErrProtocolHeader
}

// Frame types.
const (
	FrameAMQP = 0x00
	FrameSASL = 0x01
)

// MinMaxFrameSize is the smallest max-frame-size a peer may announce (AMQP 1.0 §2.7.1).
const MinMaxFrameSize = 512

// FrameHeader is the fixed 8-byte frame header (AMQP 1.0 §2.3.1).
type FrameHeader struct {
	// Size is the whole frame's size, header included.
	Size uint32
	// DataOffset is where the body starts, in 4-byte words (at least 2).
	DataOffset uint8
	Type       uint8
	// Channel is the channel for AMQP frames (ignored for SASL frames).
	Channel uint16
}

// ParseFrameHeader checks and decodes a frame header. maxSize is the largest frame accepted
// (the max-frame-size this side announced).
func ParseFrameHeader(h [8]byte, maxSize uint32) (FrameHeader, error) {
	f := FrameHeader{
		Size:       binary.BigEndian.Uint32(h[0:4]),
		DataOffset: h[4],
		Type:       h[5],
		Channel:    binary.BigEndian.Uint16(h[6:8]),
	}
	switch {
	case f.Size < 8:
		return f, fmt.Errorf("amqp: frame size %d is smaller than its header", f.Size)
	case f.Size > maxSize:
		return f, fmt.Errorf("amqp: frame size %d exceeds the maximum of %d", f.Size, maxSize)
	case f.DataOffset < 2:
		return f, fmt.Errorf("amqp: data offset %d is below 2", f.DataOffset)
	case uint32(f.DataOffset)*4 > f.Size:
		return f, fmt.Errorf("amqp: data offset %d lies beyond the %d-byte frame", f.DataOffset, f.Size)
	case f.Type != FrameAMQP && f.Type != FrameSASL:
		return f, fmt.Errorf("amqp: unknown frame type %#02x", f.Type)
	}
	return f, nil
}

// AppendFrame appends a frame with an 8-byte header around body.
func AppendFrame(dst []byte, typ uint8, channel uint16, body []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(8+len(body)))
	dst = append(dst, 2, typ)
	dst = binary.BigEndian.AppendUint16(dst, channel)
	return append(dst, body...)
}

// AppendPerformativeFrame appends a frame carrying p followed by payload (a transfer's message
// bytes; nil otherwise).
func AppendPerformativeFrame(dst []byte, typ uint8, channel uint16, p Performative, payload []byte) ([]byte, error) {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0, 2, typ, byte(channel>>8), byte(channel))
	var err error
	if dst, err = AppendValue(dst, p); err != nil {
		return dst[:start], err
	}
	dst = append(dst, payload...)
	binary.BigEndian.PutUint32(dst[start:], uint32(len(dst)-start))
	return dst, nil
}
