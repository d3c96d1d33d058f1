package mqttpkt

import (
	"fmt"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Case is one packet of the shared tables: its bytes exactly as they cross the wire, with a
// comment per field, and what the codec makes of them.
type Case struct {
	Name string
	Raw  []byte
	// Want is the decoded packet when Err is empty; Encode(Want) gives Raw back.
	Want packets.Packet
	// Err, when set, is what the refusal says: the codec's error, and the reason hubsim gives
	// when it closes the connection, contain it.
	Err string
	// Version marks a CONNECT refused for its protocol level (a *VersionError): hubsim answers
	// CONNACK 1 before it closes.
	Version bool
}

// Table is a list of cases.
type Table []Case

// Get returns the case called name. A name that is not in the table is a mistake in the test
// that asks, so Get panics.
func (t Table) Get(name string) Case {
	for _, c := range t {
		if c.Name == name {
			return c
		}
	}
	panic(fmt.Sprintf("mqttpkt: no case %q", name))
}

// raw concatenates bytes (given as ints) and strings, so that a case can spell each field as it
// crosses the wire.
func raw(parts ...any) []byte {
	var b []byte
	for _, p := range parts {
		switch v := p.(type) {
		case int:
			b = append(b, byte(v))
		case string:
			b = append(b, v...)
		default:
			panic(fmt.Sprintf("mqttpkt: raw part %T", p))
		}
	}
	return b
}

func connect(remaining int, c packets.ConnectParams) packets.Packet {
	c.ProtocolName = []byte("MQTT")
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect, Remaining: remaining}, ProtocolVersion: Level, Connect: c}
}

func pk(typ, qos byte, remaining int, p packets.Packet) packets.Packet {
	p.FixedHeader = packets.FixedHeader{Type: typ, Qos: qos, Remaining: remaining}
	p.ProtocolVersion = Level
	return p
}

// ConnectCases is what a connection may send first, read by Screen with a limit of 64 KiB or
// more (hubsim's broker allows 512 KiB, its DPS endpoint 64 KiB).
var ConnectCases = Table{
	{Name: "SAS device, clean session", Raw: raw(
		0x10, 58, // CONNECT, remaining length 58
		0, 4, "MQTT", // protocol name
		4,     // protocol level 4: MQTT 3.1.1
		0xc2,  // flags: user name, password, clean session
		0, 60, // keep-alive 60 s
		0, 4, "dev1", // client ID
		0, 17, "hub/dev1/?api-v=1", // user name (a shortened IoT Hub user name)
		0, 21, "SharedAccessSignature", // password (a SAS token in real life)
	), Want: connect(58, packets.ConnectParams{Clean: true, Keepalive: 60, ClientIdentifier: "dev1",
		UsernameFlag: true, Username: []byte("hub/dev1/?api-v=1"), PasswordFlag: true, Password: []byte("SharedAccessSignature")})},
	{Name: "X.509 device: user name, no password", Raw: raw(
		0x10, 26, // CONNECT, remaining length 26
		0, 4, "MQTT", // protocol name
		4,      // level 4
		0x80,   // flags: user name
		0, 240, // keep-alive 240 s (the Azure SDKs' default)
		0, 4, "dev1", // client ID
		0, 8, "hub/dev1", // user name
	), Want: connect(26, packets.ConnectParams{Keepalive: 240, ClientIdentifier: "dev1", UsernameFlag: true, Username: []byte("hub/dev1")})},
	{Name: "will at QoS 1, retained", Raw: raw(
		0x10, 24, // CONNECT, remaining length 24
		0, 4, "MQTT", // protocol name
		4,     // level 4
		0x2e,  // flags: will retain, will QoS 1, will, clean session
		0, 30, // keep-alive 30 s
		0, 2, "d1", // client ID
		0, 3, "t/1", // will topic
		0, 3, "bye", // will payload
	), Want: connect(24, packets.ConnectParams{Clean: true, Keepalive: 30, ClientIdentifier: "d1",
		WillFlag: true, WillQos: 1, WillRetain: true, WillTopic: "t/1", WillPayload: []byte("bye")})},

	{Name: "MQTT 5", Version: true, Err: `"MQTT" level 5`, Raw: raw(
		0x10, 15, // CONNECT, remaining length 15
		0, 4, "MQTT", // protocol name
		5,     // level 5: refused here, before mochi's MQTT 5 decoder
		0x02,  // flags: clean start
		0, 60, // keep-alive
		0,          // property length 0
		0, 2, "d1", // client ID
	)},
	{Name: "MQTT 5 cut after the level", Version: true, Err: `"MQTT" level 5`, Raw: raw(
		0x10, 40, // CONNECT, remaining length 40 (the rest never comes)
		0, 4, "MQTT", // protocol name
		5, // level 5
	)},
	{Name: "MQTT 5, property length past the end", Version: true, Err: `"MQTT" level 5`, Raw: raw(
		0x10, 17, // CONNECT, remaining length 17
		0, 4, "MQTT", // protocol name
		5,     // level 5
		0xc2,  // flags
		0, 60, // keep-alive
		0xff, 0xff, 0xff, 0x7f, // property length 268435455
		0, 1, "x", // client ID
	)},
	{Name: "MQTT 3.1 (MQIsdp level 3)", Version: true, Err: `"MQIsdp" level 3`, Raw: raw(
		0x10, 15, // CONNECT, remaining length 15
		0, 6, "MQIsdp", // protocol name of MQTT 3.1
		3,     // level 3
		0x02,  // flags: clean session
		0, 60, // keep-alive
		0, 1, "x", // client ID
	)},
	{Name: "MQTT level 3", Version: true, Err: `"MQTT" level 3`, Raw: raw(
		0x10, 13, // CONNECT, remaining length 13
		0, 4, "MQTT", // protocol name
		3,     // level 3 with the 3.1.1 name
		0x02,  // flags
		0, 60, // keep-alive
		0, 1, "x", // client ID
	)},

	{Name: "MQTT level 255", Version: true, Err: `"MQTT" level 255`, Raw: raw(
		0x10, 13, // CONNECT, remaining length 13
		0, 4, "MQTT", // protocol name
		255,         // level 255
		0x02, 0, 60, // flags, keep-alive
		0, 1, "x", // client ID
	)},

	{Name: "nothing at all", Err: "malformed CONNECT: EOF", Raw: raw()},
	{Name: "an HTTP request", Err: "first byte 0x47 is not CONNECT", Raw: raw("GET / HTTP/1.1\r\nHost: x\r\n\r\n")},
	{Name: "PUBLISH first", Err: "first byte 0x30 is not CONNECT", Raw: raw(
		0x30, 3, // PUBLISH QoS 0, remaining length 3
		0, 1, "t", // topic
	)},
	{Name: "CONNECT with fixed header flags", Err: "first byte 0x12 is not CONNECT", Raw: raw(
		0x12, 0, // CONNECT with a reserved flag bit set, remaining length 0
	)},
	{Name: "remaining length of 5 bytes", Err: "malformed CONNECT: remaining length longer than 4 bytes", Raw: raw(
		0x10, 0xff, 0xff, 0xff, 0xff, 0x01, // CONNECT, a fifth length byte
	)},
	{Name: "remaining length over the limit", Err: "malformed CONNECT: 268435455 bytes, limit", Raw: raw(
		0x10, 0xff, 0xff, 0xff, 0x7f, // CONNECT, remaining length 268435455, nothing after
	)},
	{Name: "too short for a protocol name", Err: "too short for a protocol name", Raw: raw(
		0x10, 1, // CONNECT, remaining length 1
		0, // half a length
	)},
	{Name: "protocol name of 2 bytes", Err: "protocol name of 2 bytes", Raw: raw(
		0x10, 9, // CONNECT, remaining length 9
		0, 2, "MQ", // protocol name
		4, 0x02, 0, 60, // level, flags, keep-alive
		0, // half a client ID length
	)},
	{Name: "protocol name MQTX", Err: `protocol name "MQTX"`, Raw: raw(
		0x10, 13, // CONNECT, remaining length 13
		0, 4, "MQTX", // protocol name
		4, 0x02, 0, 60, // level, flags, keep-alive
		0, 1, "x", // client ID
	)},
	{Name: "truncated", Err: "malformed CONNECT: unexpected EOF", Raw: raw(
		0x10, 20, // CONNECT, remaining length 20: 7 bytes short
		0, 4, "MQTT", // protocol name
		4, 0x02, 0, 60, // level, flags, keep-alive
		0, 1, "x", // client ID
	)},
	{Name: "reserved flag", Err: "reserved flag set", Raw: raw(
		0x10, 13, // CONNECT, remaining length 13
		0, 4, "MQTT", 4, // protocol name and level
		0x03,  // flags: clean session and the reserved bit
		0, 60, // keep-alive
		0, 1, "x", // client ID
	)},
	{Name: "trailing bytes", Err: "1 trailing bytes", Raw: raw(
		0x10, 14, // CONNECT, remaining length 14
		0, 4, "MQTT", 4, // protocol name and level
		0x02, 0, 60, // flags: clean session; keep-alive
		0, 1, "x", // client ID
		9, // one byte that no flag announces
	)},
	{Name: "will QoS 2", Err: "will QoS 2 (IoT Hub supports 0 and 1)", Raw: raw(
		0x10, 19, // CONNECT, remaining length 19
		0, 4, "MQTT", 4, // protocol name and level
		0x16, 0, 60, // flags: will QoS 2, will, clean session; keep-alive
		0, 1, "x", // client ID
		0, 1, "t", // will topic
		0, 1, "p", // will payload
	)},
	{Name: "will QoS 3", Err: "will QoS 3 (IoT Hub supports 0 and 1)", Raw: raw(
		0x10, 19, // CONNECT, remaining length 19
		0, 4, "MQTT", 4, // protocol name and level
		0x1e, 0, 60, // flags: will QoS 3, will, clean session; keep-alive
		0, 1, "x", // client ID
		0, 1, "t", // will topic
		0, 1, "p", // will payload
	)},
	{Name: "will retain without will", Err: "will QoS or retain without will flag", Raw: raw(
		0x10, 13, // CONNECT, remaining length 13
		0, 4, "MQTT", 4, // protocol name and level
		0x20, 0, 60, // flags: will retain only; keep-alive
		0, 1, "x", // client ID
	)},
	{Name: "empty will topic", Err: "malformed CONNECT: will topic", Raw: raw(
		0x10, 18, // CONNECT, remaining length 18
		0, 4, "MQTT", 4, // protocol name and level
		0x04, 0, 60, // flags: will; keep-alive
		0, 1, "x", // client ID
		0, 0, // will topic ""
		0, 1, "p", // will payload
	)},
	{Name: "empty will payload", Err: "malformed CONNECT: will payload", Raw: raw(
		0x10, 18, // CONNECT, remaining length 18
		0, 4, "MQTT", 4, // protocol name and level
		0x04, 0, 60, // flags: will; keep-alive
		0, 1, "x", // client ID
		0, 1, "t", // will topic
		0, 0, // will payload of 0 bytes
	)},
	{Name: "password without user name", Err: "password flag without username flag", Raw: raw(
		0x10, 16, // CONNECT, remaining length 16
		0, 4, "MQTT", 4, // protocol name and level
		0x40, 0, 60, // flags: password only; keep-alive
		0, 1, "x", // client ID
		0, 1, "p", // password
	)},
	{Name: "user name flag, no user name", Err: "username flag set but no value", Raw: raw(
		0x10, 13, // CONNECT, remaining length 13
		0, 4, "MQTT", 4, // protocol name and level
		0x80, 0, 60, // flags: user name; keep-alive
		0, 1, "x", // client ID, then nothing
	)},
	{Name: "empty password", Err: "malformed CONNECT: password", Raw: raw(
		0x10, 18, // CONNECT, remaining length 18
		0, 4, "MQTT", 4, // protocol name and level
		0xc0, 0, 60, // flags: user name, password; keep-alive
		0, 1, "x", // client ID
		0, 1, "u", // user name
		0, 0, // password of 0 bytes
	)},
	{Name: "NUL in the client ID", Err: "client identifier not valid", Raw: raw(
		0x10, 14, // CONNECT, remaining length 14
		0, 4, "MQTT", 4, // protocol name and level
		0x02, 0, 60, // flags: clean session; keep-alive
		0, 2, "x\x00", // client ID with U+0000
	)},
	{Name: "user name not UTF-8", Err: "user name is not UTF-8", Raw: raw(
		0x10, 16, // CONNECT, remaining length 16
		0, 4, "MQTT", 4, // protocol name and level
		0x80, 0, 60, // flags: user name; keep-alive
		0, 1, "x", // client ID
		0, 1, "\xff", // user name: not UTF-8
	)},
	{Name: "keep-alive cut short", Err: "malformed CONNECT: keepalive", Raw: raw(
		0x10, 9, // CONNECT, remaining length 9
		0, 4, "MQTT", 4, // protocol name and level
		0x02, 0, // flags; half a keep-alive
	)},
}

// Cases is what follows a CONNECT on hubsim's DPS endpoint, in both directions: the packets a
// provisioning client sends, hubsim's answers, and packets that must be refused. Decode reads each
// Raw; Encode(Want) writes it back.
var Cases = Table{
	// From the device.
	{Name: "SUBSCRIBE to DPS responses", Raw: raw(
		0x82, 29, // SUBSCRIBE (flags 0010), remaining length 29
		0, 1, // packet ID 1
		0, 24, "$dps/registrations/res/#", // filter
		1, // requested QoS 1
	), Want: pk(packets.Subscribe, 1, 29, packets.Packet{PacketID: 1, Filters: packets.Subscriptions{{Filter: "$dps/registrations/res/#", Qos: 1}}})},
	{Name: "SUBSCRIBE to two filters", Raw: raw(
		0x82, 35, // SUBSCRIBE, remaining length 35
		0, 2, // packet ID 2
		0, 24, "$dps/registrations/res/#", 0, // filter, QoS 0
		0, 3, "a/b", 2, // filter, QoS 2
	), Want: pk(packets.Subscribe, 1, 35, packets.Packet{PacketID: 2, Filters: packets.Subscriptions{
		{Filter: "$dps/registrations/res/#"}, {Filter: "a/b", Qos: 2}}})},
	{Name: "register PUBLISH, QoS 1", Raw: raw(
		0x32, 74, // PUBLISH QoS 1, remaining length 74
		0, 47, "$dps/registrations/PUT/iotdps-register/?$rid=r1", // topic
		0, 7, // packet ID 7
		`{"registrationId":"m1"}`, // payload: the register body
	), Want: pk(packets.Publish, 1, 74, packets.Packet{TopicName: "$dps/registrations/PUT/iotdps-register/?$rid=r1", PacketID: 7,
		Payload: []byte(`{"registrationId":"m1"}`)})},
	{Name: "poll PUBLISH, QoS 0", Raw: raw(
		0x30, 75, // PUBLISH QoS 0, remaining length 75
		0, 73, "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=r2&operationId=op", // topic, no packet ID at QoS 0
	), Want: pk(packets.Publish, 0, 75, packets.Packet{TopicName: "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=r2&operationId=op"})},
	{Name: "PUBACK", Raw: raw(
		0x40, 2, // PUBACK, remaining length 2
		0, 1, // packet ID 1
	), Want: pk(packets.Puback, 0, 2, packets.Packet{PacketID: 1})},
	{Name: "UNSUBSCRIBE", Raw: raw(
		0xa2, 28, // UNSUBSCRIBE (flags 0010), remaining length 28
		0, 3, // packet ID 3
		0, 24, "$dps/registrations/res/#", // filter
	), Want: pk(packets.Unsubscribe, 1, 28, packets.Packet{PacketID: 3, Filters: packets.Subscriptions{{Filter: "$dps/registrations/res/#"}}})},
	{Name: "PINGREQ", Raw: raw(0xc0, 0), Want: pk(packets.Pingreq, 0, 0, packets.Packet{})},
	{Name: "DISCONNECT", Raw: raw(0xe0, 0), Want: pk(packets.Disconnect, 0, 0, packets.Packet{})},

	// From hubsim.
	{Name: "CONNACK accepted", Raw: raw(
		0x20, 2, // CONNACK, remaining length 2
		0, // no session present
		0, // return code 0: accepted
	), Want: pk(packets.Connack, 0, 2, packets.Packet{})},
	{Name: "CONNACK unacceptable protocol version", Raw: raw(0x20, 2, 0, 1 /* return code 1 */), Want: pk(packets.Connack, 0, 2, packets.Packet{ReasonCode: 1})},
	{Name: "CONNACK not authorized", Raw: raw(0x20, 2, 0, 5 /* return code 5 */), Want: pk(packets.Connack, 0, 2, packets.Packet{ReasonCode: 5})},
	{Name: "SUBACK granted QoS 1", Raw: raw(
		0x90, 3, // SUBACK, remaining length 3
		0, 1, // packet ID 1
		1, // granted QoS 1
	), Want: pk(packets.Suback, 0, 3, packets.Packet{PacketID: 1, ReasonCodes: []byte{1}})},
	{Name: "SUBACK granted QoS 0, refused", Raw: raw(
		0x90, 4, // SUBACK, remaining length 4
		0, 2, // packet ID 2
		0,    // first filter: granted QoS 0
		0x80, // second filter: refused
	), Want: pk(packets.Suback, 0, 4, packets.Packet{PacketID: 2, ReasonCodes: []byte{0, 0x80}})},
	{Name: "response PUBLISH, QoS 1", Raw: raw(
		0x32, 75, // PUBLISH QoS 1, remaining length 75
		0, 49, "$dps/registrations/res/202/?$rid=r1&retry-after=3", // topic
		0, 1, // packet ID 1
		`{"status":"assigning"}`, // payload
	), Want: pk(packets.Publish, 1, 75, packets.Packet{TopicName: "$dps/registrations/res/202/?$rid=r1&retry-after=3", PacketID: 1,
		Payload: []byte(`{"status":"assigning"}`)})},
	{Name: "UNSUBACK", Raw: raw(0xb0, 2, 0, 3 /* packet ID 3 */), Want: pk(packets.Unsuback, 0, 2, packets.Packet{PacketID: 3})},
	{Name: "PINGRESP", Raw: raw(0xd0, 0), Want: pk(packets.Pingresp, 0, 0, packets.Packet{})},

	// Refused.
	{Name: "PUBLISH at QoS 3", Err: "qos out of range", Raw: raw(
		0x36, 5, // PUBLISH with both QoS bits set
		0, 1, "t", 0, 1, // topic, packet ID
	)},
	{Name: "PUBLISH QoS 1 with packet ID 0", Err: "missing packet id", Raw: raw(
		0x32, 5, // PUBLISH QoS 1, remaining length 5
		0, 1, "t", // topic
		0, 0, // packet ID 0
	)},
	{Name: "PUBLISH DUP at QoS 0", Err: "dup true with no qos", Raw: raw(0x38, 3, 0, 1, "t")},
	{Name: "PUBLISH to a wildcard topic", Err: "topic contains wildcards", Raw: raw(0x30, 3, 0, 1, "#")},
	{Name: "PUBLISH to an empty topic", Err: "no topic", Raw: raw(0x30, 2, 0, 0)},
	{Name: "PUBLISH topic not UTF-8", Err: "invalid utf-8", Raw: raw(0x30, 3, 0, 1, "\xff")},
	{Name: "PUBLISH topic past the end", Err: "PUBLISH", Raw: raw(
		0x30, 3, // PUBLISH, remaining length 3
		0, 9, "t", // a topic length of 9 with 1 byte left
	)},
	{Name: "SUBSCRIBE with flags 0000", Err: "first byte 0x80", Raw: raw(0x80, 6, 0, 1, 0, 1, "#", 0)},
	{Name: "SUBSCRIBE without filters", Err: "must contain at least one filter", Raw: raw(0x82, 2, 0, 1)},
	{Name: "SUBSCRIBE at QoS 3", Err: "qos out of range", Raw: raw(0x82, 6, 0, 1, 0, 1, "#", 3)},
	{Name: "SUBSCRIBE filter without its QoS", Err: "SUBSCRIBE", Raw: raw(0x82, 5, 0, 1, 0, 1, "#")},
	{Name: "UNSUBSCRIBE without filters", Err: "must contain at least one filter", Raw: raw(0xa2, 2, 0, 1)},
	{Name: "PINGREQ with a body", Err: "PINGREQ of 1 bytes, want 0", Raw: raw(0xc0, 1, 0)},
	{Name: "PUBACK of 3 bytes", Err: "PUBACK of 3 bytes, want 2", Raw: raw(0x40, 3, 0, 1, 0)},
	{Name: "DISCONNECT with flags", Err: "first byte 0xe1", Raw: raw(0xe1, 0)},
	{Name: "SUBACK return code 3", Err: "SUBACK return code 0x03", Raw: raw(0x90, 3, 0, 1, 3)},
	{Name: "CONNACK flags 2", Err: "CONNACK flags 0x02", Raw: raw(0x20, 2, 2, 0)},
	{Name: "reserved packet type 0", Err: "packet type 0", Raw: raw(0x00, 0)},
	{Name: "AUTH, which only MQTT 5 has", Err: "packet type 15", Raw: raw(0xf0, 0)},
	{Name: "remaining length of 5 bytes", Err: "remaining length longer than 4 bytes", Raw: raw(0xc0, 0x80, 0x80, 0x80, 0x80, 0x01)},
	{Name: "body cut short", Err: "unexpected EOF", Raw: raw(0x40, 2, 0)},
	{Name: "second CONNECT at level 5", Version: true, Err: `"MQTT" level 5`, Raw: raw(
		0x10, 13, // CONNECT, remaining length 13
		0, 4, "MQTT", 5, // protocol name, level 5
		0x02, 0, 60, // flags, keep-alive
		0, 0, 0, // property length 0, half a client ID length
	)},
}
