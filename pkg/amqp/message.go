package amqp

import (
	"fmt"
	"time"
)

// Section descriptor codes (§3.2).
const (
	SectionHeader                = 0x70
	SectionDeliveryAnnotations   = 0x71
	SectionMessageAnnotations    = 0x72
	SectionProperties            = 0x73
	SectionApplicationProperties = 0x74
	SectionData                  = 0x75
	SectionSequence              = 0x76
	SectionValue                 = 0x77
	SectionFooter                = 0x78
)

// Header is the message header section (§3.2.1).
type Header struct {
	Durable  bool
	Priority uint8 // default 4
	// TTL is the time to live in milliseconds; 0 means none.
	TTL           uint32
	FirstAcquirer bool
	DeliveryCount uint32
}

// Properties is the properties section (§3.2.4). Message and correlation IDs keep their AMQP
// type: string, UUID, uint64 or []byte.
type Properties struct {
	MessageID          any
	UserID             []byte
	To                 string
	Subject            string
	ReplyTo            string
	CorrelationID      any
	ContentType        Symbol
	ContentEncoding    Symbol
	AbsoluteExpiryTime time.Time
	CreationTime       time.Time
	GroupID            string
	GroupSequence      *uint32
	ReplyToGroupID     string
}

// Message is an annotated AMQP message (§3.2). The body is Data sections, Sequence sections or
// one Value (set HasValue; Value may be nil).
type Message struct {
	Header                *Header
	DeliveryAnnotations   Map
	Annotations           Map
	Properties            *Properties
	ApplicationProperties Map
	Data                  [][]byte
	Sequence              [][]any
	Value                 any
	HasValue              bool
	Footer                Map
}

// MarshalBinary encodes the message as its sections in order.
func (m *Message) MarshalBinary() ([]byte, error) {
	var b []byte
	var err error
	add := func(code uint64, v any) {
		if err == nil {
			b = appendUlong(append(b, codeDescribed), code)
			b, err = AppendValue(b, v)
		}
	}
	if h := m.Header; h != nil {
		var ttl any
		if h.TTL != 0 {
			ttl = h.TTL
		}
		prio := any(h.Priority)
		if h.Priority == 4 {
			prio = nil
		}
		var dc any
		if h.DeliveryCount != 0 {
			dc = h.DeliveryCount
		}
		add(SectionHeader, trimNulls([]any{optBool(h.Durable), prio, ttl, optBool(h.FirstAcquirer), dc}))
	}
	if m.DeliveryAnnotations != nil {
		add(SectionDeliveryAnnotations, m.DeliveryAnnotations)
	}
	if m.Annotations != nil {
		add(SectionMessageAnnotations, m.Annotations)
	}
	if p := m.Properties; p != nil {
		var gs any
		if p.GroupSequence != nil {
			gs = *p.GroupSequence
		}
		add(SectionProperties, trimNulls([]any{p.MessageID, optBinary(p.UserID), optString(p.To), optString(p.Subject),
			optString(p.ReplyTo), p.CorrelationID, optSymbol(p.ContentType), optSymbol(p.ContentEncoding),
			optTime(p.AbsoluteExpiryTime), optTime(p.CreationTime), optString(p.GroupID), gs, optString(p.ReplyToGroupID)}))
	}
	if m.ApplicationProperties != nil {
		add(SectionApplicationProperties, m.ApplicationProperties)
	}
	for _, d := range m.Data {
		if d == nil {
			d = []byte{}
		}
		add(SectionData, d)
	}
	for _, s := range m.Sequence {
		add(SectionSequence, s)
	}
	if m.HasValue {
		add(SectionValue, m.Value)
	}
	if m.Footer != nil {
		add(SectionFooter, m.Footer)
	}
	return b, err
}

// UnmarshalBinary decodes a message: sections in the order §3.2 gives, a body of Data
// sections, Sequence sections or one Value, nothing else.
func (m *Message) UnmarshalBinary(b []byte) error {
	*m = Message{}
	last := uint64(0)
	for off := 0; off < len(b); {
		v, n, err := DecodeValue(b[off:])
		if err != nil {
			if de, ok := err.(*DecodeError); ok {
				de.Offset += off
			}
			return err
		}
		d, ok := v.(Described)
		if !ok {
			return fmt.Errorf("amqp: message byte %d: a %T where a section belongs", off, v)
		}
		code := descriptorCode(d.Descriptor)
		if code < SectionHeader || code > SectionFooter {
			return fmt.Errorf("amqp: message byte %d: unknown section %v", off, d.Descriptor)
		}
		repeatable := code == SectionData || code == SectionSequence
		if code < last || (code == last && !repeatable) {
			return fmt.Errorf("amqp: message byte %d: section %#x after section %#x", off, code, last)
		}
		if isBody(code) && isBody(last) && code != last {
			return fmt.Errorf("amqp: message byte %d: body mixes section %#x with %#x", off, code, last)
		}
		if err := m.section(code, d.Value); err != nil {
			return fmt.Errorf("amqp: message byte %d: %w", off, err)
		}
		last = code
		off += n
	}
	return nil
}

func isBody(code uint64) bool {
	return code == SectionData || code == SectionSequence || code == SectionValue
}

func (m *Message) section(code uint64, v any) error {
	asMap := func(what string) (Map, error) {
		switch x := v.(type) {
		case Map:
			return x, nil
		case nil:
			return Map{}, nil
		}
		return nil, fmt.Errorf("%s is a %T, want a map", what, v)
	}
	var err error
	switch code {
	case SectionHeader, SectionProperties:
		l, ok := v.([]any)
		if !ok {
			return fmt.Errorf("section %#x is a %T, want a list", code, v)
		}
		r := &fieldReader{f: l}
		if code == SectionHeader {
			r.what = "header"
			m.Header = &Header{Durable: r.boolean(0, "durable"), Priority: r.u8(1, "priority", 4),
				TTL: r.u32(2, "ttl", 0), FirstAcquirer: r.boolean(3, "first-acquirer"), DeliveryCount: r.u32(4, "delivery-count", 0)}
		} else {
			r.what = "properties"
			p := &Properties{}
			p.MessageID = messageID(r, 0, "message-id")
			p.UserID = r.bin(1, "user-id")
			p.To = addressString(r, 2, "to")
			p.Subject = r.str(3, "subject")
			p.ReplyTo = addressString(r, 4, "reply-to")
			p.CorrelationID = messageID(r, 5, "correlation-id")
			p.ContentType = r.sym(6, "content-type")
			p.ContentEncoding = r.sym(7, "content-encoding")
			p.AbsoluteExpiryTime = r.timestamp(8, "absolute-expiry-time")
			p.CreationTime = r.timestamp(9, "creation-time")
			p.GroupID = r.str(10, "group-id")
			p.GroupSequence = r.optU32(11, "group-sequence")
			p.ReplyToGroupID = r.str(12, "reply-to-group-id")
			m.Properties = p
		}
		return r.err
	case SectionDeliveryAnnotations:
		m.DeliveryAnnotations, err = asMap("delivery-annotations")
	case SectionMessageAnnotations:
		m.Annotations, err = asMap("message-annotations")
	case SectionApplicationProperties:
		m.ApplicationProperties, err = asMap("application-properties")
		for _, e := range m.ApplicationProperties {
			if _, ok := e.Key.(string); !ok {
				return fmt.Errorf("application-properties key is a %T, want a string", e.Key)
			}
		}
	case SectionFooter:
		m.Footer, err = asMap("footer")
	case SectionData:
		b, ok := v.([]byte)
		if !ok {
			return fmt.Errorf("data section is a %T, want binary", v)
		}
		m.Data = append(m.Data, b)
	case SectionSequence:
		l, ok := v.([]any)
		if !ok {
			return fmt.Errorf("amqp-sequence section is a %T, want a list", v)
		}
		m.Sequence = append(m.Sequence, l)
	case SectionValue:
		m.Value, m.HasValue = v, true
	}
	return err
}

// messageID reads a message-id or correlation-id: ulong, uuid, binary or string.
func messageID(r *fieldReader, i int, field string) any {
	switch v := r.get(i).(type) {
	case nil, uint64, UUID, []byte, string:
		return v
	default:
		r.bad(field, v, "ulong, uuid, binary or string")
		return nil
	}
}

// addressString reads an address field (the spec allows any address type; everyone uses
// strings, and some clients send symbols).
func addressString(r *fieldReader, i int, field string) string {
	if s, ok := r.get(i).(Symbol); ok {
		return string(s)
	}
	return r.str(i, field)
}

// IDString formats a message-id or correlation-id as text (uuids canonical, binary as hex).
func IDString(id any) string {
	switch v := id.(type) {
	case nil:
		return ""
	case string:
		return v
	case UUID:
		return v.String()
	case uint64:
		return fmt.Sprint(v)
	case []byte:
		return fmt.Sprintf("%x", v)
	}
	return fmt.Sprint(id)
}
