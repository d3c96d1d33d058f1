package broker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

func mqttStr(s string) []byte {
	return append(binary.BigEndian.AppendUint16(nil, uint16(len(s))), s...)
}

func encodeConnect(name string, level, flags byte, fields ...string) []byte {
	body := append(mqttStr(name), level, flags, 0, 60)
	if level == 5 {
		body = append(body, 0)
	}
	for _, f := range fields {
		body = append(body, mqttStr(f)...)
	}
	var hdr []byte
	n := len(body)
	for {
		c := byte(n % 128)
		n /= 128
		if n > 0 {
			c |= 0x80
		}
		hdr = append(hdr, c)
		if n == 0 {
			break
		}
	}
	return append(append([]byte{0x10}, hdr...), body...)
}

var (
	goodConnect = encodeConnect("MQTT", 4, 0xc0, "dev1", "hub/dev1/?api-version=2021-04-12", "SharedAccessSignature sr=x&sig=y&se=1")
	willConnect = encodeConnect("MQTT", 4, 0x0e, "dev1", "devices/dev1/messages/events/", "bye")
	v5Connect   = encodeConnect("MQTT", 5, 0xc0, "dev1", "u", "p")
	v3Connect   = encodeConnect("MQIsdp", 3, 0x02, "dev1")
)

func TestParseConnect(t *testing.T) {
	ci, err := ParseConnect(goodConnect)
	if err != nil || ci.ClientID != "dev1" || ci.Username != "hub/dev1/?api-version=2021-04-12" || !ci.HasPassword || ci.KeepAlive != 60 || ci.Clean {
		t.Fatalf("%+v %v", ci, err)
	}
	ci, err = ParseConnect(willConnect)
	if err != nil || !ci.WillFlag || ci.WillQoS != 1 || ci.WillTopic != "devices/dev1/messages/events/" || ci.PayloadLen != 3 || !ci.Clean {
		t.Fatalf("will: %+v %v", ci, err)
	}
	var ve *VersionError
	if _, err := ParseConnect(v5Connect); !errors.As(err, &ve) || ve.Level != 5 {
		t.Fatalf("v5: %v", err)
	}
	bad := map[string][]byte{
		"empty":                 nil,
		"not connect":           {0x30, 0},
		"length mismatch":       append(bytes.Clone(goodConnect), 0),
		"truncated":             goodConnect[:len(goodConnect)-1],
		"reserved flag":         encodeConnect("MQTT", 4, 0x01, "dev1"),
		"will qos 2":            encodeConnect("MQTT", 4, 0x16, "dev1", "t", "p"),
		"will qos 3":            encodeConnect("MQTT", 4, 0x1e, "dev1", "t", "p"),
		"will retain, no will":  encodeConnect("MQTT", 4, 0x20, "dev1"),
		"password, no username": encodeConnect("MQTT", 4, 0x40, "dev1", "p"),
		"empty will payload":    encodeConnect("MQTT", 4, 0x04, "dev1", "t", ""),
		"empty password":        encodeConnect("MQTT", 4, 0xc0, "dev1", "u", ""),
		"NUL in client id":      encodeConnect("MQTT", 4, 0x02, "de\x00v"),
		"bad UTF-8 user":        encodeConnect("MQTT", 4, 0x80, "dev1", "\xff"),
		"name":                  encodeConnect("MQTX", 4, 0x02, "dev1"),
	}
	for name, b := range bad {
		if _, err := ParseConnect(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestReadConnect(t *testing.T) {
	pkt, _, err := readConnect(bytes.NewReader(append(bytes.Clone(goodConnect), 0xc0, 0)), 1<<20)
	if err != nil || !bytes.Equal(pkt, goodConnect) {
		t.Fatalf("%x %v", pkt, err)
	}
	var ve *VersionError
	for name, b := range map[string][]byte{
		"v5":             v5Connect,
		"v5 truncated":   v5Connect[:9],
		"v3.1":           v3Connect,
		"MQTT level 3":   encodeConnect("MQTT", 3, 0x02, "dev1"),
		"MQTT level 255": encodeConnect("MQTT", 255, 0x02, "dev1"),
	} {
		_, rem, err := readConnect(bytes.NewReader(b), 1<<20)
		if !errors.As(err, &ve) {
			t.Errorf("%s: %v, want a VersionError", name, err)
		}
		if rem < 0 {
			t.Errorf("%s: remaining %d", name, rem)
		}
	}
	for name, b := range map[string][]byte{
		"empty":      nil,
		"too big":    goodConnect,
		"publish":    {0x30, 0x00},
		"long len":   {0x10, 0x80, 0x80, 0x80, 0x80, 0x01},
		"short":      {0x10, 0x01, 0x00},
		"bad name":   encodeConnect("MQ", 4, 0, "x"),
		"truncated4": goodConnect[:20],
	} {
		max := 1 << 20
		if name == "too big" {
			max = 10
		}
		if _, _, err := readConnect(bytes.NewReader(b), max); err == nil || errors.As(err, &ve) {
			t.Errorf("%s: %v, want a malformed error", name, err)
		}
	}
}

// FuzzConnect checks that the listener's first-packet check never panics, and that whatever it
// lets through mochi decodes without panicking (mochi's decoder can crash on malformed input,
// which is why the check exists).
func FuzzConnect(f *testing.F) {
	for _, b := range [][]byte{goodConnect, willConnect, v5Connect, v3Connect, {0x10, 0x00}, {0x10, 0xff, 0xff, 0xff, 0x7f}} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		pkt, _, err := readConnect(bytes.NewReader(b), maxPacketSize)
		if err != nil {
			return
		}
		if !bytes.HasPrefix(b, pkt) {
			t.Fatalf("readConnect returned bytes that were not read")
		}
		ci, err := ParseConnect(pkt)
		if err != nil {
			return
		}
		// Accepted: mochi must decode the same packet without error or panic.
		rem, n, _ := decodeVarint(pkt[1:])
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect, Remaining: rem}}
		if err := pk.ConnectDecode(pkt[1+n:]); err != nil {
			t.Fatalf("accepted CONNECT that mochi refuses: %v", err)
		}
		if pk.ProtocolVersion != 4 || pk.Connect.ClientIdentifier != ci.ClientID || string(pk.Connect.Username) != ci.Username {
			t.Fatalf("mochi reads %+v, we read %+v", pk.Connect, ci)
		}
		if code := pk.ConnectValidate(); code != packets.CodeSuccess {
			t.Fatalf("accepted CONNECT that mochi's validation refuses: %v", code)
		}
	})
}
