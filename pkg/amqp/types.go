package amqp

import (
	"encoding/hex"
	"fmt"
	"reflect"
	"time"
)

// Symbol is an AMQP symbol: an ASCII string naming something (a condition, a capability, a key).
type Symbol string

// Char is an AMQP char (one UTF-32 code point).
type Char rune

// UUID is an AMQP uuid (RFC 4122 byte order).
type UUID [16]byte

// String formats u in the canonical 8-4-4-4-12 form.
func (u UUID) String() string {
	var b [36]byte
	hex.Encode(b[0:8], u[0:4])
	b[8] = '-'
	hex.Encode(b[9:13], u[4:6])
	b[13] = '-'
	hex.Encode(b[14:18], u[6:8])
	b[18] = '-'
	hex.Encode(b[19:23], u[8:10])
	b[23] = '-'
	hex.Encode(b[24:], u[10:])
	return string(b[:])
}

// ParseUUID parses the canonical 8-4-4-4-12 form (either case).
func ParseUUID(s string) (UUID, error) {
	var u UUID
	if len(s) != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return u, fmt.Errorf("amqp: %q is not a uuid", s)
	}
	h := s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:]
	if _, err := hex.Decode(u[:], []byte(h)); err != nil {
		return u, fmt.Errorf("amqp: %q is not a uuid", s)
	}
	return u, nil
}

// Described is a described value whose descriptor this package does not interpret (for
// example a filter in a source's filter set).
type Described struct {
	// Descriptor is a uint64 (numeric descriptor) or a Symbol.
	Descriptor any
	Value      any
}

// Decimal is an IEEE 754 decimal value kept as its bytes (Code is 0x74, 0x84 or 0x94).
type Decimal struct {
	Code  byte
	Bytes []byte
}

// Array is an AMQP array: every element has the same type. An encoded Array takes its element
// constructor from the first element's Go type; an empty Array is written with the null
// constructor.
type Array []any

// MapEntry is one key/value pair of a Map.
type MapEntry struct {
	Key, Value any
}

// Map is an AMQP map, in wire order. Keys are compared by type and value (a Symbol key never
// equals a string key, as on the wire).
type Map []MapEntry

// Get returns the value for key.
func (m Map) Get(key any) (any, bool) {
	if !comparable(key) {
		return nil, false
	}
	for _, e := range m {
		if e.Key == key {
			return e.Value, true
		}
	}
	return nil, false
}

// Set replaces the value for key or appends it.
func (m *Map) Set(key, value any) {
	for i, e := range *m {
		if comparable(key) && e.Key == key {
			(*m)[i].Value = value
			return
		}
	}
	*m = append(*m, MapEntry{Key: key, Value: value})
}

// Timestamps are milliseconds since the Unix epoch.
func toTimestamp(t time.Time) int64 { return t.UnixMilli() }

func fromTimestamp(ms int64) time.Time { return time.UnixMilli(ms).UTC() }

func comparable(v any) bool { return v == nil || reflect.TypeOf(v).Comparable() }
