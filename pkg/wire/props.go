package wire

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/iothubby/iothubby/internal/pct"
)

// System property keys as they appear, decoded, in a property bag. On the wire the '$' is
// percent-encoded ("%24.mid"); Microsoft's C SDK matches the encoded form byte for byte, so
// EncodeProperties always emits it that way.
const (
	PropMessageID       = "$.mid"
	PropCorrelationID   = "$.cid"
	PropUserID          = "$.uid"
	PropTo              = "$.to"
	PropExpiry          = "$.exp"
	PropContentType     = "$.ct"
	PropContentEncoding = "$.ce"
	PropCreationTime    = "$.ctime"
	PropOutputName      = "$.on"
	PropInterfaceID     = "$.ifid"
	PropComponent       = "$.sub"
	PropSchema          = "$.schema"
)

// MaxPropertyBagLength bounds a property bag's encoded length: what is left of MQTT's topic-name
// limit after the longest telemetry prefix ("devices/{128}/modules/{128}/messages/events/").
// IoT Hub documents no separate limit on properties: they count toward the 256 KB message size
// (application property names and values, system property values), which is checked apart.
const MaxPropertyBagLength = MaxTopicLength - (len("devices/") + 128 + len("/modules/") + 128 + len("/messages/events/"))

// ErrPropertyBag is wrapped by every property-bag decoding error.
var ErrPropertyBag = errors.New("wire: malformed property bag")

// Property is one entry of a property bag. A property with Null set was sent as a bare key
// ("key"), which differs from an empty value ("key=").
type Property struct {
	Key   string
	Value string
	Null  bool
}

// Properties is a property bag in wire order. Keys are unique in a bag this package decodes.
type Properties []Property

// Get returns the value of key and whether it is present. A null property is present with an
// empty value; use Lookup to tell null from empty.
func (p Properties) Get(key string) (string, bool) {
	for _, e := range p {
		if e.Key == key {
			return e.Value, true
		}
	}
	return "", false
}

// Lookup returns the property named key.
func (p Properties) Lookup(key string) (Property, bool) {
	for _, e := range p {
		if e.Key == key {
			return e, true
		}
	}
	return Property{}, false
}

// Set replaces key's value, or appends it.
func (p *Properties) Set(key, value string) {
	for i := range *p {
		if (*p)[i].Key == key {
			(*p)[i] = Property{Key: key, Value: value}
			return
		}
	}
	*p = append(*p, Property{Key: key, Value: value})
}

// System reports whether key is a system property ("$." prefix).
func System(key string) bool { return strings.HasPrefix(key, "$.") }

// EncodeProperties renders a bag: key=value pairs joined by '&', keys and values percent-encoded
// (upper-case hex, '$' as %24), a null property as a bare key and an empty value as "key=".
func EncodeProperties(p Properties) string {
	var b strings.Builder
	for i, e := range p {
		if i > 0 {
			b.WriteByte('&')
		}
		escape(&b, e.Key)
		if e.Null {
			continue
		}
		b.WriteByte('=')
		escape(&b, e.Value)
	}
	return b.String()
}

// DecodeProperties parses a property bag. Keys and values are percent-decoded once; '+' stays a
// literal '+'. Empty segments (as in "a=1&&b=2" or a trailing '&') are skipped. Errors: invalid
// escapes, invalid UTF-8 after decoding, empty or duplicate keys, and bags over
// MaxPropertyBagLength.
func DecodeProperties(s string) (Properties, error) {
	if len(s) > MaxPropertyBagLength {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrPropertyBag, len(s), MaxPropertyBagLength)
	}
	if s == "" {
		return nil, nil
	}
	var p Properties
	for seg := range strings.SplitSeq(s, "&") {
		if seg == "" {
			continue
		}
		rawKey, rawVal, hasVal := strings.Cut(seg, "=")
		key, err := unescape(rawKey)
		if err != nil {
			return nil, fmt.Errorf("%w: key %q: %v", ErrPropertyBag, rawKey, err)
		}
		if key == "" {
			return nil, fmt.Errorf("%w: empty key", ErrPropertyBag)
		}
		if _, dup := p.Lookup(key); dup {
			return nil, fmt.Errorf("%w: duplicate key %q", ErrPropertyBag, key)
		}
		e := Property{Key: key, Null: !hasVal}
		if hasVal {
			if e.Value, err = unescape(rawVal); err != nil {
				return nil, fmt.Errorf("%w: value of %q: %v", ErrPropertyBag, key, err)
			}
		}
		p = append(p, e)
	}
	return p, nil
}

func escape(b *strings.Builder, s string) { pct.Append(b, s) }

// unescape decodes one level of percent-encoding and insists on UTF-8.
func unescape(s string) (string, error) {
	d, err := pct.Decode(s)
	if err != nil {
		return "", err
	}
	if !utf8.ValidString(d) {
		return "", errors.New("invalid UTF-8")
	}
	return d, nil
}
