package amqp

import (
	"encoding/binary"
	"fmt"
	"math"
	"unicode/utf8"
)

// DefaultMaxDepth bounds how deeply compound values (lists, maps, arrays, described values)
// may nest.
const DefaultMaxDepth = 32

// DecodeError says what is wrong with an encoding and at which byte offset of the buffer given
// to the decoder.
type DecodeError struct {
	Offset int
	Msg    string
}

func (e *DecodeError) Error() string { return fmt.Sprintf("amqp: byte %d: %s", e.Offset, e.Msg) }

type decoder struct {
	b     []byte
	off   int
	depth int
}

func (d *decoder) fail(format string, args ...any) error {
	return &DecodeError{Offset: d.off, Msg: fmt.Sprintf(format, args...)}
}

// Unmarshal decodes exactly one value from b; bytes left over are an error.
func Unmarshal(b []byte) (any, error) {
	v, n, err := DecodeValue(b)
	if err != nil {
		return nil, err
	}
	if n != len(b) {
		return nil, &DecodeError{Offset: n, Msg: fmt.Sprintf("%d bytes after the value", len(b)-n)}
	}
	return v, nil
}

// DecodeValue decodes one value from the start of b and says how many bytes it took.
func DecodeValue(b []byte) (any, int, error) {
	d := &decoder{b: b}
	v, err := d.value()
	return v, d.off, err
}

func (d *decoder) left() int { return len(d.b) - d.off }

func (d *decoder) take(n int) ([]byte, error) {
	if n < 0 || n > d.left() {
		return nil, d.fail("need %d bytes, %d left", n, d.left())
	}
	s := d.b[d.off : d.off+n]
	d.off += n
	return s, nil
}

func (d *decoder) byte1() (byte, error) {
	s, err := d.take(1)
	if err != nil {
		return 0, err
	}
	return s[0], nil
}

func (d *decoder) u32() (uint32, error) {
	s, err := d.take(4)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(s), nil
}

func (d *decoder) value() (any, error) {
	start := d.off
	c, err := d.byte1()
	if err != nil {
		return nil, err
	}
	if c != codeDescribed {
		return d.payload(c)
	}
	if d.depth >= DefaultMaxDepth {
		d.off = start
		return nil, d.fail("nested deeper than %d", DefaultMaxDepth)
	}
	d.depth++
	defer func() { d.depth-- }()
	dstart := d.off
	desc, err := d.value()
	if err != nil {
		return nil, err
	}
	switch desc.(type) {
	case uint64, Symbol:
	default:
		d.off = dstart
		return nil, d.fail("descriptor is %T, want ulong or symbol", desc)
	}
	v, err := d.value()
	if err != nil {
		return nil, err
	}
	return Described{Descriptor: desc, Value: v}, nil
}

// fixedWidth is the payload width of fixed-width codes, -1 for variable or compound ones.
func fixedWidth(c byte) int {
	switch c >> 4 {
	case 0x4:
		return 0
	case 0x5:
		return 1
	case 0x6:
		return 2
	case 0x7:
		return 4
	case 0x8:
		return 8
	case 0x9:
		return 16
	}
	return -1
}

// payload decodes the value after constructor c.
func (d *decoder) payload(c byte) (any, error) {
	at := d.off - 1
	bad := func() (any, error) {
		d.off = at
		return nil, d.fail("unknown type code %#02x", c)
	}
	if w := fixedWidth(c); w >= 0 {
		p, err := d.take(w)
		if err != nil {
			return nil, err
		}
		switch c {
		case codeNull:
			return nil, nil
		case codeTrue:
			return true, nil
		case codeFalse:
			return false, nil
		case codeUint0:
			return uint32(0), nil
		case codeUlong0:
			return uint64(0), nil
		case codeList0:
			return []any{}, nil
		case codeUbyte:
			return p[0], nil
		case codeByte:
			return int8(p[0]), nil
		case codeSmallUint:
			return uint32(p[0]), nil
		case codeSmallUlong:
			return uint64(p[0]), nil
		case codeSmallInt:
			return int32(int8(p[0])), nil
		case codeSmallLong:
			return int64(int8(p[0])), nil
		case codeBool:
			switch p[0] {
			case 0:
				return false, nil
			case 1:
				return true, nil
			}
			d.off = at
			return nil, d.fail("boolean byte %#02x is neither 0 nor 1", p[0])
		case codeUshort:
			return binary.BigEndian.Uint16(p), nil
		case codeShort:
			return int16(binary.BigEndian.Uint16(p)), nil
		case codeUint:
			return binary.BigEndian.Uint32(p), nil
		case codeInt:
			return int32(binary.BigEndian.Uint32(p)), nil
		case codeFloat:
			return math.Float32frombits(binary.BigEndian.Uint32(p)), nil
		case codeChar:
			r := binary.BigEndian.Uint32(p)
			if r > utf8.MaxRune || (r >= 0xd800 && r <= 0xdfff) {
				d.off = at
				return nil, d.fail("char %#x is not a Unicode code point", r)
			}
			return Char(r), nil
		case codeDecimal32, codeDecimal64, codeDecimal128:
			return Decimal{Code: c, Bytes: append([]byte(nil), p...)}, nil
		case codeUlong:
			return binary.BigEndian.Uint64(p), nil
		case codeLong:
			return int64(binary.BigEndian.Uint64(p)), nil
		case codeDouble:
			return math.Float64frombits(binary.BigEndian.Uint64(p)), nil
		case codeTimestamp:
			return fromTimestamp(int64(binary.BigEndian.Uint64(p))), nil
		case codeUUID:
			var u UUID
			copy(u[:], p)
			return u, nil
		}
		return bad()
	}
	switch c {
	case codeVbin8, codeStr8, codeSym8, codeVbin32, codeStr32, codeSym32:
		var n uint32
		if c>>4 == 0xa {
			b, err := d.byte1()
			if err != nil {
				return nil, err
			}
			n = uint32(b)
		} else {
			var err error
			if n, err = d.u32(); err != nil {
				return nil, err
			}
		}
		if int64(n) > int64(d.left()) {
			return nil, d.fail("%d-byte value overruns the %d bytes left", n, d.left())
		}
		p, _ := d.take(int(n))
		switch c & 0x0f {
		case 0x0:
			return append([]byte(nil), p...), nil
		case 0x1:
			if !utf8.Valid(p) {
				d.off = at
				return nil, d.fail("string is not valid UTF-8")
			}
			return string(p), nil
		default:
			if !isASCII(string(p)) {
				d.off = at
				return nil, d.fail("symbol is not ASCII")
			}
			return Symbol(p), nil
		}
	case codeList8, codeList32, codeMap8, codeMap32, codeArray8, codeArray32:
		return d.compound(c, at)
	}
	return bad()
}

// compound decodes a list, map or array after its constructor c (at offset at).
func (d *decoder) compound(c byte, at int) (any, error) {
	if d.depth >= DefaultMaxDepth {
		d.off = at
		return nil, d.fail("nested deeper than %d", DefaultMaxDepth)
	}
	var size, count uint32
	wide := c>>4 == 0xd || c>>4 == 0xf
	if wide {
		var err error
		if size, err = d.u32(); err != nil {
			return nil, err
		}
		if size < 4 {
			return nil, d.fail("compound size %d smaller than its count field", size)
		}
	} else {
		b, err := d.byte1()
		if err != nil {
			return nil, err
		}
		if size = uint32(b); size < 1 {
			return nil, d.fail("compound size 0 smaller than its count field")
		}
	}
	if int64(size) > int64(d.left()) {
		return nil, d.fail("%d-byte compound overruns the %d bytes left", size, d.left())
	}
	body, _ := d.take(int(size))
	sub := &decoder{b: body, depth: d.depth + 1}
	if wide {
		count, _ = sub.u32()
	} else {
		b, _ := sub.byte1()
		count = uint32(b)
	}
	base := d.off - int(size)
	wrap := func(err error) error {
		if de, ok := err.(*DecodeError); ok {
			de.Offset += base
		}
		return err
	}
	switch c {
	case codeList8, codeList32, codeMap8, codeMap32:
		// every element takes at least one byte
		if int64(count) > int64(sub.left()) {
			d.off = at
			return nil, d.fail("%d elements cannot fit in %d bytes", count, sub.left())
		}
		items := make([]any, 0, count)
		for range count {
			v, err := sub.value()
			if err != nil {
				return nil, wrap(err)
			}
			items = append(items, v)
		}
		if sub.left() != 0 {
			return nil, wrap(sub.fail("%d bytes after the last element", sub.left()))
		}
		if c == codeList8 || c == codeList32 {
			return items, nil
		}
		if count%2 != 0 {
			d.off = at
			return nil, d.fail("map has an odd number (%d) of elements", count)
		}
		m := make(Map, 0, count/2)
		for i := 0; i < len(items); i += 2 {
			if !comparable(items[i]) {
				d.off = at
				return nil, d.fail("map key %d is a %T", i/2, items[i])
			}
			m = append(m, MapEntry{Key: items[i], Value: items[i+1]})
		}
		return m, nil
	}
	// array: one constructor, then count payloads
	var desc any
	ec, err := sub.byte1()
	if err != nil {
		return nil, wrap(err)
	}
	if ec == codeDescribed {
		sub.depth++
		if desc, err = sub.value(); err != nil {
			return nil, wrap(err)
		}
		switch desc.(type) {
		case uint64, Symbol:
		default:
			return nil, wrap(sub.fail("array descriptor is %T, want ulong or symbol", desc))
		}
		if ec, err = sub.byte1(); err != nil {
			return nil, wrap(err)
		}
		if ec == codeDescribed {
			return nil, wrap(sub.fail("array element constructor is itself described twice"))
		}
	}
	w := fixedWidth(ec)
	if w == 0 {
		// zero-width elements (null, true, ...): bound the count by the array's own size
		if count > size {
			d.off = at
			return nil, d.fail("%d zero-width elements in a %d-byte array", count, size)
		}
	} else if int64(count) > int64(sub.left()) {
		d.off = at
		return nil, d.fail("%d elements cannot fit in %d bytes", count, sub.left())
	}
	items := make(Array, 0, count)
	for range count {
		v, err := sub.payload(ec)
		if err != nil {
			return nil, wrap(err)
		}
		if desc != nil {
			v = Described{Descriptor: desc, Value: v}
		}
		items = append(items, v)
	}
	if sub.left() != 0 {
		return nil, wrap(sub.fail("%d bytes after the last array element", sub.left()))
	}
	return items, nil
}
