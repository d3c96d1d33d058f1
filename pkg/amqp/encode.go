package amqp

import (
	"encoding/binary"
	"fmt"
	"math"
	"time"
	"unicode/utf8"
)

// Type codes (AMQP 1.0 §1.6).
const (
	codeDescribed  = 0x00
	codeNull       = 0x40
	codeTrue       = 0x41
	codeFalse      = 0x42
	codeUint0      = 0x43
	codeUlong0     = 0x44
	codeList0      = 0x45
	codeUbyte      = 0x50
	codeByte       = 0x51
	codeSmallUint  = 0x52
	codeSmallUlong = 0x53
	codeSmallInt   = 0x54
	codeSmallLong  = 0x55
	codeBool       = 0x56
	codeUshort     = 0x60
	codeShort      = 0x61
	codeUint       = 0x70
	codeInt        = 0x71
	codeFloat      = 0x72
	codeChar       = 0x73
	codeDecimal32  = 0x74
	codeUlong      = 0x80
	codeLong       = 0x81
	codeDouble     = 0x82
	codeTimestamp  = 0x83
	codeDecimal64  = 0x84
	codeDecimal128 = 0x94
	codeUUID       = 0x98
	codeVbin8      = 0xa0
	codeStr8       = 0xa1
	codeSym8       = 0xa3
	codeVbin32     = 0xb0
	codeStr32      = 0xb1
	codeSym32      = 0xb3
	codeList8      = 0xc0
	codeMap8       = 0xc1
	codeList32     = 0xd0
	codeMap32      = 0xd1
	codeArray8     = 0xe0
	codeArray32    = 0xf0
)

// AppendValue appends the encoding of v. It accepts the Go types Unmarshal produces, plus int
// and uint (written as long and ulong), []Symbol and []string (written as arrays),
// map[string]any and map[Symbol]any (written as maps, in no set order: use Map for order) and
// the section and performative types of this package.
func AppendValue(dst []byte, v any) ([]byte, error) {
	return appendValue(dst, v, 0)
}

// encoder for described types of this package.
type describedEncoder interface {
	descriptor() uint64
	fields() []any
}

func appendValue(b []byte, v any, depth int) ([]byte, error) {
	if depth > DefaultMaxDepth {
		return b, fmt.Errorf("amqp: encoding nests deeper than %d", DefaultMaxDepth)
	}
	switch v := v.(type) {
	case nil:
		return append(b, codeNull), nil
	case bool:
		if v {
			return append(b, codeTrue), nil
		}
		return append(b, codeFalse), nil
	case uint8:
		return append(b, codeUbyte, v), nil
	case uint16:
		return binary.BigEndian.AppendUint16(append(b, codeUshort), v), nil
	case uint32:
		return appendUint(b, v), nil
	case uint64:
		return appendUlong(b, v), nil
	case uint:
		return appendUlong(b, uint64(v)), nil
	case int8:
		return append(b, codeByte, byte(v)), nil
	case int16:
		return binary.BigEndian.AppendUint16(append(b, codeShort), uint16(v)), nil
	case int32:
		if v >= -128 && v <= 127 {
			return append(b, codeSmallInt, byte(int8(v))), nil
		}
		return binary.BigEndian.AppendUint32(append(b, codeInt), uint32(v)), nil
	case int64:
		return appendLong(b, v), nil
	case int:
		return appendLong(b, int64(v)), nil
	case float32:
		return binary.BigEndian.AppendUint32(append(b, codeFloat), math.Float32bits(v)), nil
	case float64:
		return binary.BigEndian.AppendUint64(append(b, codeDouble), math.Float64bits(v)), nil
	case Char:
		return binary.BigEndian.AppendUint32(append(b, codeChar), uint32(v)), nil
	case time.Time:
		return binary.BigEndian.AppendUint64(append(b, codeTimestamp), uint64(toTimestamp(v))), nil
	case UUID:
		return append(append(b, codeUUID), v[:]...), nil
	case []byte:
		return appendVariable(b, codeVbin8, codeVbin32, v), nil
	case string:
		if !utf8.ValidString(v) {
			return b, fmt.Errorf("amqp: string is not valid UTF-8")
		}
		return appendVariable(b, codeStr8, codeStr32, []byte(v)), nil
	case Symbol:
		if !isASCII(string(v)) {
			return b, fmt.Errorf("amqp: symbol %q is not ASCII", string(v))
		}
		return appendVariable(b, codeSym8, codeSym32, []byte(v)), nil
	case Decimal:
		want := map[byte]int{codeDecimal32: 4, codeDecimal64: 8, codeDecimal128: 16}[v.Code]
		if want == 0 || len(v.Bytes) != want {
			return b, fmt.Errorf("amqp: bad decimal (code %#x, %d bytes)", v.Code, len(v.Bytes))
		}
		return append(append(b, v.Code), v.Bytes...), nil
	case []any:
		return appendList(b, v, depth)
	case Map:
		return appendMap(b, v, depth)
	case map[string]any:
		m := make(Map, 0, len(v))
		for k, x := range v {
			m = append(m, MapEntry{k, x})
		}
		return appendMap(b, m, depth)
	case map[Symbol]any:
		m := make(Map, 0, len(v))
		for k, x := range v {
			m = append(m, MapEntry{k, x})
		}
		return appendMap(b, m, depth)
	case Array:
		return appendArray(b, v, depth)
	case []Symbol:
		a := make(Array, len(v))
		for i, s := range v {
			a[i] = s
		}
		return appendArray(b, a, depth)
	case []string:
		a := make(Array, len(v))
		for i, s := range v {
			a[i] = s
		}
		return appendArray(b, a, depth)
	case Described:
		b = append(b, codeDescribed)
		var err error
		if b, err = appendValue(b, v.Descriptor, depth+1); err != nil {
			return b, err
		}
		return appendValue(b, v.Value, depth+1)
	case describedEncoder:
		b = appendUlong(append(b, codeDescribed), v.descriptor())
		return appendList(b, trimNulls(v.fields()), depth)
	}
	return b, fmt.Errorf("amqp: cannot encode %T", v)
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

func appendUint(b []byte, v uint32) []byte {
	switch {
	case v == 0:
		return append(b, codeUint0)
	case v < 256:
		return append(b, codeSmallUint, byte(v))
	}
	return binary.BigEndian.AppendUint32(append(b, codeUint), v)
}

func appendUlong(b []byte, v uint64) []byte {
	switch {
	case v == 0:
		return append(b, codeUlong0)
	case v < 256:
		return append(b, codeSmallUlong, byte(v))
	}
	return binary.BigEndian.AppendUint64(append(b, codeUlong), v)
}

func appendLong(b []byte, v int64) []byte {
	if v >= -128 && v <= 127 {
		return append(b, codeSmallLong, byte(int8(v)))
	}
	return binary.BigEndian.AppendUint64(append(b, codeLong), uint64(v))
}

func appendVariable(b []byte, c8, c32 byte, v []byte) []byte {
	if len(v) < 256 {
		b = append(b, c8, byte(len(v)))
	} else {
		b = binary.BigEndian.AppendUint32(append(b, c32), uint32(len(v)))
	}
	return append(b, v...)
}

// trimNulls drops trailing nil fields, as the spec allows for performatives and sections.
func trimNulls(f []any) []any {
	for len(f) > 0 && f[len(f)-1] == nil {
		f = f[:len(f)-1]
	}
	return f
}

func appendCompound(b []byte, c0, c8, c32 byte, count int, body []byte) []byte {
	switch {
	case count == 0 && c0 != 0:
		return append(b, c0)
	case len(body)+1 < 256 && count < 256:
		return append(append(b, c8, byte(len(body)+1), byte(count)), body...)
	}
	b = binary.BigEndian.AppendUint32(append(b, c32), uint32(len(body)+4))
	b = binary.BigEndian.AppendUint32(b, uint32(count))
	return append(b, body...)
}

func appendList(b []byte, l []any, depth int) ([]byte, error) {
	var body []byte
	var err error
	for _, x := range l {
		if body, err = appendValue(body, x, depth+1); err != nil {
			return b, err
		}
	}
	return appendCompound(b, codeList0, codeList8, codeList32, len(l), body), nil
}

func appendMap(b []byte, m Map, depth int) ([]byte, error) {
	var body []byte
	var err error
	for _, e := range m {
		if body, err = appendValue(body, e.Key, depth+1); err != nil {
			return b, err
		}
		if body, err = appendValue(body, e.Value, depth+1); err != nil {
			return b, err
		}
	}
	return appendCompound(b, 0, codeMap8, codeMap32, 2*len(m), body), nil
}

// appendArray writes an array whose constructor is that of the first element; every element
// must have the same Go type. Elements use the wide encodings (uint, ulong, str32, ...) where
// the constructor fixes one encoding for all of them.
func appendArray(b []byte, a Array, depth int) ([]byte, error) {
	if len(a) == 0 {
		return append(b, codeArray8, 2, 0, codeNull), nil
	}
	var ctor []byte
	var body []byte
	for i, x := range a {
		if i > 0 && fmt.Sprintf("%T", x) != fmt.Sprintf("%T", a[0]) {
			return b, fmt.Errorf("amqp: array mixes %T and %T", a[0], x)
		}
		var c []byte
		var err error
		switch x := x.(type) {
		case Symbol:
			if !isASCII(string(x)) {
				return b, fmt.Errorf("amqp: symbol %q is not ASCII", string(x))
			}
			c, body = []byte{codeSym32}, binary.BigEndian.AppendUint32(body, uint32(len(x)))
			body = append(body, x...)
		case string:
			if !utf8.ValidString(x) {
				return b, fmt.Errorf("amqp: string is not valid UTF-8")
			}
			c, body = []byte{codeStr32}, binary.BigEndian.AppendUint32(body, uint32(len(x)))
			body = append(body, x...)
		case []byte:
			c, body = []byte{codeVbin32}, binary.BigEndian.AppendUint32(body, uint32(len(x)))
			body = append(body, x...)
		case uint32:
			c, body = []byte{codeUint}, binary.BigEndian.AppendUint32(body, x)
		case uint64:
			c, body = []byte{codeUlong}, binary.BigEndian.AppendUint64(body, x)
		case int32:
			c, body = []byte{codeInt}, binary.BigEndian.AppendUint32(body, uint32(x))
		case int64:
			c, body = []byte{codeLong}, binary.BigEndian.AppendUint64(body, uint64(x))
		case bool:
			var v byte
			if x {
				v = 1
			}
			c, body = []byte{codeBool}, append(body, v)
		case UUID:
			c, body = []byte{codeUUID}, append(body, x[:]...)
		case time.Time:
			c, body = []byte{codeTimestamp}, binary.BigEndian.AppendUint64(body, uint64(toTimestamp(x)))
		case Map:
			var enc []byte
			if enc, err = appendMap(nil, x, depth+1); err != nil {
				return b, err
			}
			// force map32 so that every element shares the constructor
			if enc[0] == codeMap8 {
				enc, _ = appendMap32(x, depth+1)
			}
			c, body = []byte{codeMap32}, append(body, enc[1:]...)
		default:
			return b, fmt.Errorf("amqp: cannot encode an array of %T", x)
		}
		ctor = c
	}
	var hdr []byte
	if len(body)+1+len(ctor) < 256 && len(a) < 256 {
		hdr = append([]byte{codeArray8, byte(len(body) + 1 + len(ctor)), byte(len(a))}, ctor...)
	} else {
		hdr = binary.BigEndian.AppendUint32([]byte{codeArray32}, uint32(len(body)+4+len(ctor)))
		hdr = binary.BigEndian.AppendUint32(hdr, uint32(len(a)))
		hdr = append(hdr, ctor...)
	}
	return append(append(b, hdr...), body...), nil
}

func appendMap32(m Map, depth int) ([]byte, error) {
	var body []byte
	var err error
	for _, e := range m {
		if body, err = appendValue(body, e.Key, depth+1); err != nil {
			return nil, err
		}
		if body, err = appendValue(body, e.Value, depth+1); err != nil {
			return nil, err
		}
	}
	out := binary.BigEndian.AppendUint32([]byte{codeMap32}, uint32(len(body)+4))
	out = binary.BigEndian.AppendUint32(out, uint32(2*len(m)))
	return append(out, body...), nil
}
