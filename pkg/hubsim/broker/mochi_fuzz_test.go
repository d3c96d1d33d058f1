package broker

import (
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// FuzzMochiDecodeV4 checks the assumption the listener relies on: once a connection has passed
// the CONNECT check (so mochi decodes it as MQTT 3.1.1), no packet body makes mochi's decoders
// or validators panic.
func FuzzMochiDecodeV4(f *testing.F) {
	f.Add(byte(3), []byte{0, 3, 'a', '/', 'b', 0, 1, 'x'})
	f.Add(byte(8), []byte{0, 1, 0, 1, '#', 1})
	f.Add(byte(10), []byte{0, 1, 0, 1, '#'})
	f.Add(byte(4), []byte{0, 1})
	f.Fuzz(func(t *testing.T, typ byte, b []byte) {
		pk := packets.Packet{ProtocolVersion: 4, FixedHeader: packets.FixedHeader{Type: typ % 16, Qos: typ >> 4 & 3, Remaining: len(b)}}
		switch pk.FixedHeader.Type {
		case packets.Publish:
			if pk.PublishDecode(b) == nil {
				_ = pk.PublishValidate(0)
			}
		case packets.Puback:
			_ = pk.PubackDecode(b)
		case packets.Subscribe:
			if pk.SubscribeDecode(b) == nil {
				_ = pk.SubscribeValidate()
			}
		case packets.Unsubscribe:
			if pk.UnsubscribeDecode(b) == nil {
				_ = pk.UnsubscribeValidate()
			}
		case packets.Disconnect:
			_ = pk.DisconnectDecode(b)
		case packets.Pubrec:
			_ = pk.PubrecDecode(b)
		case packets.Pubrel:
			_ = pk.PubrelDecode(b)
		case packets.Pubcomp:
			_ = pk.PubcompDecode(b)
		case packets.Auth:
			_ = pk.AuthDecode(b)
		}
	})
}
