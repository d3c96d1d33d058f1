package broker

import (
	"bytes"
	"encoding/json"
	"time"

	"github.com/iothubby/iothubby/pkg/wire"
)

// Message is a recorded device-to-cloud message, as a service reading the hub's built-in
// endpoint would see it: body, application properties (wire order, nulls kept) and system
// properties with the hub's stamps.
type Message struct {
	Body []byte
	// Properties are the application properties. A property sent as a bare key has Null set.
	Properties wire.Properties
	// SystemProperties use Azure's names: message-id, correlation-id, user-id, content-type,
	// content-encoding, absolute-expiry-time, creation-time, dt-dataschema, dt-subject,
	// iothub-connection-device-id, iothub-connection-auth-method,
	// iothub-connection-auth-generation-id, iothub-enqueuedtime, ...
	SystemProperties map[string]string
	EnqueuedTime     time.Time
}

// EnqueuedTimeFormat is how iothub-enqueuedtime is written (UTC, milliseconds).
const EnqueuedTimeFormat = "2006-01-02T15:04:05.000Z"

// sysName maps a property-bag system key to the name the service side uses; unknown keys keep
// their "$.x" form.
func sysName(key string) string {
	switch key {
	case wire.PropMessageID:
		return "message-id"
	case wire.PropCorrelationID:
		return "correlation-id"
	case wire.PropUserID:
		return "user-id"
	case wire.PropTo:
		return "to"
	case wire.PropExpiry:
		return "absolute-expiry-time"
	case wire.PropContentType:
		return "content-type"
	case wire.PropContentEncoding:
		return "content-encoding"
	case wire.PropCreationTime:
		return "creation-time"
	case wire.PropOutputName:
		return "iothub-outputname"
	case wire.PropInterfaceID:
		return "iothub-interface-id"
	case wire.PropComponent:
		return "dt-subject"
	case wire.PropSchema:
		return "message-schema"
	}
	return key
}

// telemetrySize is the message size as IoT Hub counts it: body, system property values, and
// application property names and values.
func telemetrySize(body []byte, props wire.Properties) int {
	n := len(body)
	for _, p := range props {
		if wire.System(p.Key) {
			n += len(p.Value)
		} else {
			n += len(p.Key) + len(p.Value)
		}
	}
	return n
}

// newMessage builds the record of a telemetry publish by session s.
func (s *session) newMessage(body []byte, props wire.Properties, retain bool, now time.Time) Message {
	m := Message{
		Body:             bytes.Clone(body),
		SystemProperties: make(map[string]string, 8),
		EnqueuedTime:     now.UTC(),
	}
	for _, p := range props {
		if wire.System(p.Key) {
			m.SystemProperties[sysName(p.Key)] = p.Value
			continue
		}
		m.Properties = append(m.Properties, p)
	}
	if retain {
		m.Properties.Set("mqtt-retain", "true")
	}
	if s.modelID != "" {
		m.SystemProperties["dt-dataschema"] = s.modelID
	}
	m.SystemProperties["iothub-connection-device-id"] = s.deviceID
	if s.moduleID != "" {
		m.SystemProperties["iothub-connection-module-id"] = s.moduleID
	}
	m.SystemProperties["iothub-connection-auth-method"] = s.authMethod
	m.SystemProperties["iothub-connection-auth-generation-id"] = s.generationID
	m.SystemProperties["iothub-enqueuedtime"] = m.EnqueuedTime.Format(EnqueuedTimeFormat)
	return m
}

// MarshalJSON renders {"body":"<base64>","properties":{...},"systemProperties":{...}}, with
// application properties in wire order and null for bare keys.
func (m Message) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(`{"body":`)
	body, _ := json.Marshal(m.Body)
	if m.Body == nil {
		body = []byte(`""`)
	}
	b.Write(body)
	b.WriteString(`,"properties":`)
	b.Write(propertiesJSON(m.Properties))
	b.WriteString(`,"systemProperties":`)
	sp, err := json.Marshal(m.SystemProperties)
	if err != nil {
		return nil, err
	}
	b.Write(sp)
	b.WriteByte('}')
	return b.Bytes(), nil
}

func propertiesJSON(p wire.Properties) []byte {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, e := range p {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(e.Key)
		b.Write(k)
		b.WriteByte(':')
		if e.Null {
			b.WriteString("null")
			continue
		}
		v, _ := json.Marshal(e.Value)
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes()
}

// ring keeps the last limit messages.
// ring is one device's recorded telemetry, oldest first, at most limit messages. Each record
// carries its size and a sequence number (increasing per device) for the broker-wide budget.
type ring struct {
	limit int
	buf   []record // circular, len(buf) grows up to limit
	start int      // index of the oldest record
	n     int
	seq   uint64 // sequence number of the last record added
}

type record struct {
	m    Message
	seq  uint64
	size int
}

// messageMemory approximates what a recorded message holds in memory.
func messageMemory(m *Message) int {
	n := len(m.Body) + 64
	for _, p := range m.Properties {
		n += len(p.Key) + len(p.Value) + 40
	}
	for k, v := range m.SystemProperties {
		n += len(k) + len(v) + 40
	}
	return n
}

// add records m and returns its sequence number and size, and the size of the record it
// evicted to stay within limit (0 if none). It records nothing when limit <= 0.
func (r *ring) add(m Message) (seq uint64, size, evicted int) {
	if r.limit <= 0 {
		return 0, 0, 0
	}
	r.seq++
	rec := record{m: m, seq: r.seq, size: messageMemory(&m)}
	if r.n == r.limit {
		evicted = r.buf[r.start].size
		r.buf[r.start] = rec
		r.start = (r.start + 1) % len(r.buf)
		return rec.seq, rec.size, evicted
	}
	if r.n == len(r.buf) {
		r.grow()
	}
	r.buf[(r.start+r.n)%len(r.buf)] = rec
	r.n++
	return rec.seq, rec.size, 0
}

// grow doubles the buffer (up to limit), oldest record first.
func (r *ring) grow() {
	nb := make([]record, min(r.limit, max(2*len(r.buf), 8)))
	for i := 0; i < r.n; i++ {
		nb[i] = r.buf[(r.start+i)%len(r.buf)]
	}
	r.buf, r.start = nb, 0
}

// dropOldestUpTo drops the oldest record if its sequence number is at most seq, returning its
// size (0 when nothing was dropped).
func (r *ring) dropOldestUpTo(seq uint64) int {
	if r.n == 0 || r.buf[r.start].seq > seq {
		return 0
	}
	size := r.buf[r.start].size
	r.buf[r.start] = record{}
	r.start = (r.start + 1) % len(r.buf)
	r.n--
	return size
}

// holds reports whether the record with sequence number seq may still be in the ring.
func (r *ring) holds(seq uint64) bool { return r.n > 0 && r.buf[r.start].seq <= seq }

// clear drops every record and returns their total size and number.
func (r *ring) clear() (size, n int) {
	for i := 0; i < r.n; i++ {
		size += r.buf[(r.start+i)%len(r.buf)].size
	}
	n = r.n
	r.buf, r.start, r.n = nil, 0, 0
	return size, n
}

func (r *ring) all() []Message {
	out := make([]Message, 0, r.n)
	for i := 0; i < r.n; i++ {
		out = append(out, r.buf[(r.start+i)%len(r.buf)].m)
	}
	return out
}
