package amqp

import (
	"bytes"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"
)

func u32p(v uint32) *uint32 { return &v }
func u16p(v uint16) *uint16 { return &v }

// valueCases are values with their exact encodings (AMQP 1.0 §1.6), both directions.
var valueCases = []struct {
	name string
	v    any
	enc  []byte
}{
	{"null", nil, []byte{0x40}},
	{"true", true, []byte{0x41}},
	{"false", false, []byte{0x42}},
	{"ubyte", uint8(7), []byte{0x50, 0x07}},
	{"ushort", uint16(0x1234), []byte{0x60, 0x12, 0x34}},
	{"uint0", uint32(0), []byte{0x43}},
	{"smalluint", uint32(200), []byte{0x52, 0xc8}},
	{"uint", uint32(0x01020304), []byte{0x70, 0x01, 0x02, 0x03, 0x04}},
	{"ulong0", uint64(0), []byte{0x44}},
	{"smallulong", uint64(0x10), []byte{0x53, 0x10}},
	{"ulong", uint64(256), []byte{0x80, 0, 0, 0, 0, 0, 0, 0x01, 0x00}},
	{"byte", int8(-2), []byte{0x51, 0xfe}},
	{"short", int16(-2), []byte{0x61, 0xff, 0xfe}},
	{"smallint", int32(-1), []byte{0x54, 0xff}},
	{"int", int32(200), []byte{0x71, 0, 0, 0, 0xc8}}, // 200 does not fit a signed byte
	{"smalllong", int64(5), []byte{0x55, 0x05}},      //
	{"long", int64(-129), []byte{0x81, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}},
	{"float", float32(1), []byte{0x72, 0x3f, 0x80, 0, 0}},
	{"double", float64(-2), []byte{0x82, 0xc0, 0, 0, 0, 0, 0, 0, 0}},
	{"char", Char('é'), []byte{0x73, 0, 0, 0, 0xe9}},
	{"timestamp", time.UnixMilli(1000).UTC(), []byte{0x83, 0, 0, 0, 0, 0, 0, 0x03, 0xe8}}, // ms since epoch
	{"uuid", UUID{0: 0xaa, 15: 0xbb}, []byte{0x98, 0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xbb}},
	{"vbin8", []byte{1, 2}, []byte{0xa0, 0x02, 0x01, 0x02}},
	{"str8", "hé", []byte{0xa1, 0x03, 'h', 0xc3, 0xa9}}, // length in bytes, UTF-8
	{"sym8", Symbol("$cbs"), []byte{0xa3, 0x04, '$', 'c', 'b', 's'}},
	{"list0", []any{}, []byte{0x45}},
	{"list8", []any{true, uint32(1)}, []byte{0xc0, 0x04, 0x02, 0x41, 0x52, 0x01}}, // size counts the count byte
	{"map8", Map{{Symbol("a"), int32(1)}}, []byte{0xc1, 0x06, 0x02, 0xa3, 0x01, 'a', 0x54, 0x01}},
	{"array8 of symbols", Array{Symbol("PLAIN"), Symbol("X")}, []byte{0xe0, 0x10, 0x02, 0xb3, // one sym32 constructor
		0, 0, 0, 5, 'P', 'L', 'A', 'I', 'N', 0, 0, 0, 1, 'X'}},
	{"described", Described{Descriptor: uint64(0x75), Value: []byte{9}}, []byte{0x00, 0x53, 0x75, 0xa0, 0x01, 0x09}},
	{"described symbolic", Described{Descriptor: Symbol("x:y"), Value: "v"}, []byte{0x00, 0xa3, 0x03, 'x', ':', 'y', 0xa1, 0x01, 'v'}},
	{"decimal32", Decimal{Code: 0x74, Bytes: []byte{1, 2, 3, 4}}, []byte{0x74, 1, 2, 3, 4}},
}

func TestValues(t *testing.T) {
	for _, c := range valueCases {
		got, err := AppendValue(nil, c.v)
		if err != nil || !bytes.Equal(got, c.enc) {
			t.Errorf("%s: encoded % x, %v; want % x", c.name, got, err, c.enc)
		}
		v, err := Unmarshal(c.enc)
		if err != nil || !reflect.DeepEqual(v, c.v) {
			t.Errorf("%s: decoded %#v, %v; want %#v", c.name, v, err, c.v)
		}
	}
}

// wideCases decode only: encodings other encoders choose (str32, list32, map32, bool byte...).
func TestWideEncodings(t *testing.T) {
	for _, c := range []struct {
		enc  []byte
		want any
	}{
		{[]byte{0xb1, 0, 0, 0, 1, 'x'}, "x"},
		{[]byte{0xb3, 0, 0, 0, 1, 'x'}, Symbol("x")},
		{[]byte{0xb0, 0, 0, 0, 1, 7}, []byte{7}},
		{[]byte{0x56, 0x01}, true},
		{[]byte{0xd0, 0, 0, 0, 5, 0, 0, 0, 1, 0x40}, []any{nil}},
		{[]byte{0xd1, 0, 0, 0, 6, 0, 0, 0, 2, 0x43, 0x40}, Map{{uint32(0), nil}}},
		{[]byte{0xf0, 0, 0, 0, 6, 0, 0, 0, 1, 0x50, 9}, Array{uint8(9)}},
		{[]byte{0xe0, 0x02, 0x02, 0x40}, Array{nil, nil}}, // zero-width elements
		{[]byte{0xe0, 0x07, 0x01, 0x00, 0xa3, 0x01, 'd', 0x50, 0x05}, Array{Described{Symbol("d"), uint8(5)}}},
	} {
		v, err := Unmarshal(c.enc)
		if err != nil || !reflect.DeepEqual(v, c.want) {
			t.Errorf("% x: %#v, %v; want %#v", c.enc, v, err, c.want)
		}
	}
}

func TestDecodeErrors(t *testing.T) {
	deep := bytes.Repeat([]byte{0xc0, 0x00}, 0) // built below
	for range DefaultMaxDepth + 2 {
		deep = append(deep, 0x00, 0x53, 0x01) // described, nested
	}
	deep = append(deep, 0x40)
	for _, c := range []struct {
		name string
		enc  []byte
		want string
	}{
		{"empty", nil, "need 1 bytes, 0 left"},
		{"unknown code", []byte{0x01}, "unknown type code 0x01"},
		{"short uint", []byte{0x70, 0, 0}, "need 4 bytes, 2 left"},
		{"string overrun", []byte{0xa1, 0x05, 'a'}, "5-byte value overruns the 1 bytes left"},
		{"str32 huge", []byte{0xb1, 0xff, 0xff, 0xff, 0xff}, "overruns"},
		{"bad utf8", []byte{0xa1, 0x01, 0xff}, "not valid UTF-8"},
		{"symbol not ascii", []byte{0xa3, 0x01, 0x80}, "not ASCII"},
		{"bool byte", []byte{0x56, 0x02}, "neither 0 nor 1"},
		{"list count vs bytes", []byte{0xc0, 0x02, 0xff, 0x40}, "255 elements cannot fit in 1 bytes"},
		{"list32 count vs bytes", []byte{0xd0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0x40}, "cannot fit"},
		{"list trailing", []byte{0xc0, 0x03, 0x01, 0x40, 0x40}, "1 bytes after the last element"},
		{"list overrun", []byte{0xc0, 0x09, 0x01, 0x40}, "9-byte compound overruns"},
		{"odd map", []byte{0xc1, 0x02, 0x01, 0x40}, "odd number"},
		{"map key binary", []byte{0xc1, 0x04, 0x02, 0xa0, 0x00, 0x40}, "map key 0 is a []uint8"},
		{"array zero-width flood", []byte{0xf0, 0, 0, 0, 5, 0x7f, 0xff, 0xff, 0xff, 0x40}, "zero-width elements"},
		{"array count vs bytes", []byte{0xe0, 0x03, 0x09, 0x50, 0x01}, "cannot fit"},
		{"bad descriptor", []byte{0x00, 0x41, 0x40}, "descriptor is bool"},
		{"too deep", deep, "nested deeper than 32"},
		{"trailing", []byte{0x40, 0x40}, "1 bytes after the value"},
		{"char surrogate", []byte{0x73, 0, 0, 0xd8, 0}, "not a Unicode code point"},
	} {
		_, err := Unmarshal(c.enc)
		var de *DecodeError
		if err == nil || !errors.As(err, &de) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v; want a DecodeError containing %q", c.name, err, c.want)
		}
	}
}

func TestArrayOfBinaryKeyedMapIsRefused(t *testing.T) {
	// keys that Go cannot compare would make Map.Get panic: the decoder refuses them
	if _, err := Unmarshal([]byte{0xc1, 0x04, 0x02, 0xa0, 0x00, 0x40}); err == nil || !strings.Contains(err.Error(), "map key 0 is a []uint8") {
		t.Fatal(err)
	}
}

// frameCases are whole frames as they cross the wire.
var frameCases = []struct {
	name string
	typ  uint8
	ch   uint16
	p    Performative
	enc  []byte
}{
	{"open", FrameAMQP, 0, &Open{ContainerID: "c", MaxFrameSize: 65536, ChannelMax: 255, IdleTimeout: 120000},
		[]byte{
			0, 0, 0, 0x1f, 2, 0, 0, 0, // size 31, doff 2, AMQP, channel 0
			0x00, 0x53, 0x10, // descriptor open
			0xc0, 0x12, 0x05, // list8 of 18 bytes (count byte included), 5 fields
			0xa1, 0x01, 'c', // container-id
			0x40,             // hostname null
			0x70, 0, 1, 0, 0, // max-frame-size 65536
			0x60, 0, 0xff, // channel-max 255
			0x70, 0, 0x01, 0xd4, 0xc0, // idle-time-out 120000 ms
		}},
	{"begin", FrameAMQP, 3, &Begin{RemoteChannel: u16p(3), NextOutgoingID: 0, IncomingWindow: 5000, OutgoingWindow: 5000, HandleMax: 255},
		[]byte{
			0, 0, 0, 0x1e, 2, 0, 0, 3, // size 30, channel 3
			0x00, 0x53, 0x11,
			0xc0, 0x11, 0x05,
			0x60, 0, 3, // remote-channel 3
			0x43,                   // next-outgoing-id 0
			0x70, 0, 0, 0x13, 0x88, // incoming-window 5000
			0x70, 0, 0, 0x13, 0x88, // outgoing-window 5000
			0x52, 0xff, // handle-max 255
		}},
	{"flow granting credit", FrameAMQP, 0, &Flow{NextIncomingID: u32p(1), IncomingWindow: 100, NextOutgoingID: 0, OutgoingWindow: 100,
		Handle: u32p(0), DeliveryCount: u32p(0), LinkCredit: u32p(10)},
		[]byte{
			0, 0, 0, 0x19, 2, 0, 0, 0,
			0x00, 0x53, 0x13,
			0xc0, 0x0c, 0x07,
			0x52, 0x01, // next-incoming-id 1
			0x52, 0x64, // incoming-window 100
			0x43,       // next-outgoing-id 0
			0x52, 0x64, // outgoing-window 100
			0x43,       // handle 0
			0x43,       // delivery-count 0
			0x52, 0x0a, // link-credit 10
		}},
	{"disposition rejected", FrameAMQP, 0, &Disposition{Role: RoleReceiver, First: 2, Settled: true,
		State: &Rejected{Error: &Error{Condition: ErrNotFound}}},
		[]byte{
			0, 0, 0, 0x2f, 2, 0, 0, 0,
			0x00, 0x53, 0x15,
			0xc0, 0x22, 0x05,
			0x41,       // role receiver
			0x52, 0x02, // first 2
			0x40,                               // last null
			0x41,                               // settled
			0x00, 0x53, 0x25, 0xc0, 0x17, 0x01, // rejected, one field
			0x00, 0x53, 0x1d, 0xc0, 0x11, 0x01, // error, condition only
			0xa3, 0x0e, 'a', 'm', 'q', 'p', ':', 'n', 'o', 't', '-', 'f', 'o', 'u', 'n', 'd',
		}},
	{"sasl outcome", FrameSASL, 0, &SASLOutcome{Code: SASLOK},
		[]byte{0, 0, 0, 0x10, 2, 1, 0, 0, 0x00, 0x53, 0x44, 0xc0, 0x03, 0x01, 0x50, 0x00}},
}

func TestFrames(t *testing.T) {
	for _, c := range frameCases {
		got, err := AppendPerformativeFrame(nil, c.typ, c.ch, c.p, nil)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		h, err := ParseFrameHeader([8]byte(c.enc[:8]), 1<<20)
		if err != nil || h.Type != c.typ || h.Channel != c.ch || int(h.Size) != len(c.enc) {
			t.Fatalf("%s: header %+v, %v", c.name, h, err)
		}
		p, payload, err := DecodeFrameBody(c.enc[8:])
		if err != nil || len(payload) != 0 {
			t.Fatalf("%s: decode: %v (payload %d)", c.name, err, len(payload))
		}
		again, _ := AppendPerformativeFrame(nil, c.typ, c.ch, p, nil)
		if !bytes.Equal(again, c.enc) {
			t.Errorf("%s: golden bytes re-encode to\n% x\nwant\n% x", c.name, again, c.enc)
		}
		if !bytes.Equal(got, c.enc) {
			t.Errorf("%s: encoded\n% x\nwant\n% x", c.name, got, c.enc)
		}
	}
}

func TestPerformativeRoundTrip(t *testing.T) {
	for _, p := range []Performative{
		&Attach{Name: "rheaSender_1", Handle: 1, Role: RoleSender, SndSettleMode: SndMixed, RcvSettleMode: RcvSecond,
			Source: &Source{Address: "a", Filter: Map{{Symbol("f"), Described{Symbol("apache.org:selector-filter:string"), "x > 1"}}}},
			Target: &Target{Address: "/messages/devicebound"}, InitialDeliveryCount: u32p(0), MaxMessageSize: 1 << 20,
			Properties: Map{{Symbol("com.microsoft:client-version"), "azure-iothub/1.16.6"}}},
		&Transfer{Handle: 1, DeliveryID: u32p(7), DeliveryTag: []byte("0"), MessageFormat: u32p(0), More: true},
		&Detach{Handle: 4, Closed: true, Error: &Error{Condition: ErrUnauthorizedAccess, Description: "no token"}},
		&End{}, &Close{Error: &Error{Condition: ErrDecodeError}},
		&SASLMechanisms{Mechanisms: []Symbol{"ANONYMOUS", "PLAIN"}},
		&SASLInit{Mechanism: "PLAIN", InitialResponse: []byte("\x00u\x00p"), Hostname: "h"},
		&Disposition{Role: RoleSender, First: 1, Last: u32p(3), State: &Modified{DeliveryFailed: true}},
	} {
		b, err := AppendPerformativeFrame(nil, FrameAMQP, 0, p, nil)
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := DecodeFrameBody(b[8:])
		if err != nil || !reflect.DeepEqual(got, p) {
			t.Errorf("%T: round trip %+v, %v", p, got, err)
		}
	}
}

func TestPerformativeErrors(t *testing.T) {
	for _, c := range []struct {
		name string
		body []byte
		want string
	}{
		{"not described", []byte{0x40}, "not a performative"},
		{"unknown descriptor", []byte{0x00, 0x53, 0x99, 0x45}, "unknown descriptor 153"},
		{"open without container", []byte{0x00, 0x53, 0x10, 0x45}, "open.container-id is mandatory"},
		{"open wrong type", []byte{0x00, 0x53, 0x10, 0xc0, 0x03, 0x01, 0x52, 0x01}, "open.container-id is uint32, want string"},
		{"begin window too wide", []byte{0x00, 0x53, 0x11, 0xc0, 0x0d, 0x04, 0x40, 0x43, 0x80, 0, 0, 0, 1, 0, 0, 0, 0, 0x43}, "incoming-window is uint64"},
		{"attach no role", []byte{0x00, 0x53, 0x12, 0xc0, 0x05, 0x02, 0xa1, 0x01, 'n', 0x43}, "attach.role is mandatory"},
		{"source not described", []byte{0x00, 0x53, 0x12, 0xc0, 0x09, 0x06, 0xa1, 0x01, 'n', 0x43, 0x41, 0x40, 0x40, 0x45}, "attach.source is []interface {}, want described type"},
		{"trailing after open", []byte{0x00, 0x53, 0x17, 0x45, 0x40}, "1 bytes after"},
		{"section as performative", []byte{0x00, 0x53, 0x75, 0xa0, 0x00}, "holds a []uint8, want a list"},
		{"long delivery tag", append([]byte{0x00, 0x53, 0x14, 0xc0, 0x26, 0x03, 0x43, 0x43, 0xa0, 0x21}, make([]byte, 33)...), "delivery-tag is 33 bytes"},
	} {
		_, _, err := DecodeFrameBody(c.body)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v; want %q", c.name, err, c.want)
		}
	}
}

func TestFrameHeader(t *testing.T) {
	for _, c := range []struct {
		h    [8]byte
		want string
	}{
		{[8]byte{0, 0, 0, 4, 2, 0, 0, 0}, "smaller than its header"},
		{[8]byte{0, 1, 0, 1, 2, 0, 0, 0}, "exceeds the maximum of 65536"},
		{[8]byte{0, 0, 0, 8, 1, 0, 0, 0}, "data offset 1"},
		{[8]byte{0, 0, 0, 8, 3, 0, 0, 0}, "beyond the 8-byte frame"},
		{[8]byte{0, 0, 0, 8, 2, 7, 0, 0}, "unknown frame type 0x07"},
	} {
		if _, err := ParseFrameHeader(c.h, 65536); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("% x: %v; want %q", c.h, err, c.want)
		}
	}
	if id, err := ParseProtocolHeader(HeaderSASL); err != nil || id != 3 {
		t.Fatal(id, err)
	}
	if _, err := ParseProtocolHeader([8]byte{'A', 'M', 'Q', 'P', 0, 0, 9, 1}); err != ErrProtocolHeader {
		t.Fatal(err)
	}
	if _, err := ParseProtocolHeader([8]byte{'H', 'T', 'T', 'P', '/', '1', '.', '1'}); err != ErrProtocolHeader {
		t.Fatal(err)
	}
}

// TestNodeC2DMessage decodes a message as azure-iothub's Client.send builds it
// (protocol-amqp.md §3.1): properties with a uuid message-id and the to address, the
// iothub-ack application property and one data section.
func TestNodeC2DMessage(t *testing.T) {
	enc := []byte{
		0x00, 0x53, 0x73, // properties
		0xc0, 0x3a, 0x03, // list8 of 58 bytes, 3 fields
		0x98, 0x6f, 0x1c, 0x0a, 0x9d, 0x3c, 0x4f, 0x4e, 0x8a, 0x9b, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, // message-id uuid
		0x40,       // user-id null
		0xa1, 0x25, // to: str8 of 37 bytes, the device id percent-encoded
		'/', 'd', 'e', 'v', 'i', 'c', 'e', 's', '/', 'd', 'e', 'v', '%', '2', '0', '1',
		'/', 'm', 'e', 's', 's', 'a', 'g', 'e', 's', '/', 'd', 'e', 'v', 'i', 'c', 'e', 'b', 'o', 'u', 'n', 'd',
		0x00, 0x53, 0x74, // application-properties
		0xc1, 0x13, 0x02, // map8 of 19 bytes, 2 elements
		0xa1, 0x0a, 'i', 'o', 't', 'h', 'u', 'b', '-', 'a', 'c', 'k', // "iothub-ack"
		0xa1, 0x04, 'f', 'u', 'l', 'l', // "full"
		0x00, 0x53, 0x75, 0xa0, 0x02, 'h', 'i', // data section "hi"
	}
	to := "/devices/dev%201/messages/devicebound"
	var m Message
	if err := m.UnmarshalBinary(enc); err != nil {
		t.Fatal(err)
	}
	if IDString(m.Properties.MessageID) != "6f1c0a9d-3c4f-4e8a-9b11-223344556677" || m.Properties.To != to {
		t.Fatalf("properties %+v", m.Properties)
	}
	if v, _ := m.ApplicationProperties.Get("iothub-ack"); v != "full" {
		t.Fatalf("application properties %v", m.ApplicationProperties)
	}
	if len(m.Data) != 1 || string(m.Data[0]) != "hi" {
		t.Fatalf("data %q", m.Data)
	}
	again, err := m.MarshalBinary()
	if err != nil || !bytes.Equal(again, enc) {
		t.Fatalf("re-encoded\n% x\nwant\n% x (%v)", again, enc, err)
	}
}

func TestMessageRoundTrip(t *testing.T) {
	m := &Message{
		Header:              &Header{Durable: true, Priority: 4, TTL: 1000, DeliveryCount: 2},
		DeliveryAnnotations: Map{{Symbol("x-opt-lock-token"), UUID{1}}},
		Annotations:         Map{{Symbol("iothub-enqueuedtime"), time.UnixMilli(1700000000000).UTC()}, {Symbol("x-opt-offset"), "12"}},
		Properties: &Properties{MessageID: "m1", UserID: []byte("hub"), To: "/x", CorrelationID: uint64(5),
			ContentType: "application/vnd.microsoft.iothub.feedback.json", AbsoluteExpiryTime: time.UnixMilli(1).UTC(), GroupSequence: u32p(3)},
		ApplicationProperties: Map{{"status-code", int32(200)}, {"status-description", "OK"}},
		Data:                  [][]byte{[]byte("a"), []byte("b")},
		Footer:                Map{{Symbol("f"), nil}},
	}
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var got Message
	if err := got.UnmarshalBinary(b); err != nil || !reflect.DeepEqual(&got, m) {
		t.Fatalf("round trip %+v, %v", got, err)
	}
	v := &Message{Value: "SharedAccessSignature sr=x", HasValue: true}
	b, _ = v.MarshalBinary()
	if err := got.UnmarshalBinary(b); err != nil || got.Value != v.Value || !got.HasValue {
		t.Fatalf("amqp-value %+v, %v", got, err)
	}
}

func TestMessageErrors(t *testing.T) {
	data := []byte{0x00, 0x53, 0x75, 0xa0, 0x00}
	props := []byte{0x00, 0x53, 0x73, 0x45}
	value := []byte{0x00, 0x53, 0x77, 0x40}
	for _, c := range []struct {
		name string
		enc  []byte
		want string
	}{
		{"out of order", append(append([]byte{}, data...), props...), "section 0x73 after section 0x75"},
		{"two property sections", append(append([]byte{}, props...), props...), "section 0x73 after section 0x73"},
		{"mixed body", append(append([]byte{}, data...), value...), "body mixes"},
		{"not a section", []byte{0x40}, "where a section belongs"},
		{"unknown section", []byte{0x00, 0x53, 0x10, 0x45}, "unknown section"},
		{"app props non-string key", []byte{0x00, 0x53, 0x74, 0xc1, 0x03, 0x02, 0x43, 0x40}, "key is a uint32"},
		{"data not binary", []byte{0x00, 0x53, 0x75, 0x40}, "want binary"},
		{"message-id bool", []byte{0x00, 0x53, 0x73, 0xc0, 0x02, 0x01, 0x41}, "message-id is bool"},
		{"truncated", []byte{0x00, 0x53, 0x75, 0xa0, 0x05, 1}, "overruns"},
	} {
		var m Message
		if err := m.UnmarshalBinary(c.enc); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v; want %q", c.name, err, c.want)
		}
	}
}

func TestEncodeErrors(t *testing.T) {
	for _, v := range []any{struct{}{}, "\xff", Symbol("é"), Array{Symbol("a"), "b"}, Decimal{Code: 0x74}, math.NaN} {
		if _, err := AppendValue(nil, v); err == nil {
			t.Errorf("%#v encoded", v)
		}
	}
	if id, err := ParseUUID("6F1C0A9D-3C4F-4E8A-9B11-223344556677"); err != nil || id.String() != "6f1c0a9d-3c4f-4e8a-9b11-223344556677" {
		t.Fatal(id, err)
	}
}
