package hub

import (
	"fmt"
	"sort"
	"time"

	"github.com/iothubby/iothubby/pkg/wire"
)

// Message is a device-to-cloud (telemetry) message. It is published at QoS 1 to
// devices/{id}/messages/events/{bag} with the system properties encoded as %24.-keys.
type Message struct {
	// Body is the payload. The session keeps a reference until the message completes; do not
	// modify it after Send or Enqueue.
	Body []byte
	// MessageID is $.mid. Give every message a unique one so duplicates can be spotted.
	MessageID string
	// CorrelationID is $.cid.
	CorrelationID string
	// ContentType is $.ct, e.g. "application/json".
	ContentType string
	// ContentEncoding is $.ce, e.g. "utf-8".
	ContentEncoding string
	// CreationTime, when set, is sent as $.ctime (UTC, milliseconds).
	CreationTime time.Time
	// Properties are application properties. Names must not start with "$.". They are sent in
	// name order.
	Properties map[string]string
	// Deadline, when set, fails the message with ErrMessageExpired if it has not been published
	// on a live connection by then. Default: Config.MessageTimeout after acceptance, or the
	// deadline of Send's context.
	Deadline time.Time
}

// Size is what counts toward IoT Hub's 256 KB limit: the body, the values of system properties
// and the names and values of application properties.
func (m *Message) Size() int {
	n := len(m.Body) + len(m.MessageID) + len(m.CorrelationID) + len(m.ContentType) + len(m.ContentEncoding)
	if !m.CreationTime.IsZero() {
		n += len(ctimeLayout)
	}
	for k, v := range m.Properties {
		n += len(k) + len(v)
	}
	return n
}

const ctimeLayout = "2006-01-02T15:04:05.000Z"

// properties returns the message's property bag in wire order: system properties first, then
// application properties sorted by name.
func (m *Message) properties() (wire.Properties, error) {
	var p wire.Properties
	add := func(k, v string) {
		if v != "" {
			p = append(p, wire.Property{Key: k, Value: v})
		}
	}
	add(wire.PropMessageID, m.MessageID)
	add(wire.PropCorrelationID, m.CorrelationID)
	add(wire.PropContentType, m.ContentType)
	add(wire.PropContentEncoding, m.ContentEncoding)
	if !m.CreationTime.IsZero() {
		add(wire.PropCreationTime, m.CreationTime.UTC().Format(ctimeLayout))
	}
	if len(m.Properties) > 0 {
		keys := make([]string, 0, len(m.Properties))
		for k := range m.Properties {
			if k == "" || wire.System(k) || len(k) > 2 && k[:3] == "%24" {
				return nil, fmt.Errorf("%w: application property name %q", ErrInvalidMessage, k)
			}
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			p = append(p, wire.Property{Key: k, Value: m.Properties[k]})
		}
	}
	return p, nil
}

// C2DMessage is a cloud-to-device message as delivered to Config.OnC2D.
type C2DMessage struct {
	Body            []byte
	MessageID       string // $.mid
	CorrelationID   string // $.cid
	UserID          string // $.uid
	To              string // $.to, e.g. /devices/{id}/messages/deviceBound
	ContentType     string // $.ct
	ContentEncoding string // $.ce
	// Expiry is $.exp (absolute expiry time); zero when absent or unparsable.
	Expiry time.Time
	// Properties are the application properties (and any system property not mapped above), in
	// wire order. A property sent as a bare key has Null set.
	Properties wire.Properties
	// Topic is the topic the message arrived on.
	Topic string
}

func newC2D(topic string, t wire.Topic, body []byte) *C2DMessage {
	m := &C2DMessage{Body: body, Topic: topic}
	for _, p := range t.Properties {
		switch p.Key {
		case wire.PropMessageID:
			m.MessageID = p.Value
		case wire.PropCorrelationID:
			m.CorrelationID = p.Value
		case wire.PropUserID:
			m.UserID = p.Value
		case wire.PropTo:
			m.To = p.Value
		case wire.PropContentType:
			m.ContentType = p.Value
		case wire.PropContentEncoding:
			m.ContentEncoding = p.Value
		case wire.PropExpiry:
			if ts, err := time.Parse(time.RFC3339Nano, p.Value); err == nil {
				m.Expiry = ts
			}
		default:
			m.Properties = append(m.Properties, p)
		}
	}
	return m
}

// DesiredPatch is a desired-properties notification as delivered to Config.OnDesired.
type DesiredPatch struct {
	// Version is the $version from the topic.
	Version int64
	// Body is the JSON patch (it also carries "$version").
	Body []byte
}

// MethodRequest is a direct-method call as delivered to Config.OnMethod. Answer it exactly once
// with Session.RespondMethod(ctx, RequestID, status, payload).
type MethodRequest struct {
	Name      string
	RequestID string
	Payload   []byte
}

// Request is a twin operation correlated by $rid.
type Request struct {
	// Topic renders the request topic for a $rid, e.g. wire.TwinGet or wire.TwinPatchReported.
	Topic func(rid string) string
	// Body is the request payload (empty for GET).
	Body []byte
}

// Response is the hub's answer to a Request.
type Response struct {
	RequestID string
	// Status is the status from the response topic (200, 204, 4xx, 5xx).
	Status int
	// Version is $version from the topic when HasVersion (e.g. the new reported version).
	Version    int64
	HasVersion bool
	Body       []byte
}

// OK reports whether Status is 2xx.
func (r Response) OK() bool { return r.Status >= 200 && r.Status < 300 }
