package amqp

import (
	"fmt"
	"time"
)

// fieldReader reads the fields of a described list (a performative, a section, a source, ...),
// recording the first type error with the field's name.
type fieldReader struct {
	what string
	f    []any
	err  error
}

func (r *fieldReader) get(i int) any {
	if i < len(r.f) {
		return r.f[i]
	}
	return nil
}

func (r *fieldReader) bad(field string, v any, want string) {
	if r.err == nil {
		r.err = fmt.Errorf("amqp: %s.%s is %T, want %s", r.what, field, v, want)
	}
}

func (r *fieldReader) required(i int, field string) bool {
	if r.get(i) == nil {
		if r.err == nil {
			r.err = fmt.Errorf("amqp: %s.%s is mandatory", r.what, field)
		}
		return false
	}
	return true
}

func unsigned(v any) (uint64, bool) {
	switch v := v.(type) {
	case uint8:
		return uint64(v), true
	case uint16:
		return uint64(v), true
	case uint32:
		return uint64(v), true
	case uint64:
		return v, true
	}
	return 0, false
}

func (r *fieldReader) uintN(i int, field string, bits int, def uint64) (uint64, bool) {
	v := r.get(i)
	if v == nil {
		return def, false
	}
	n, ok := unsigned(v)
	if !ok || (bits < 64 && n >= 1<<bits) {
		r.bad(field, v, fmt.Sprintf("an unsigned %d-bit integer", bits))
		return def, false
	}
	return n, true
}

func (r *fieldReader) u8(i int, field string, def uint8) uint8 {
	n, _ := r.uintN(i, field, 8, uint64(def))
	return uint8(n)
}

func (r *fieldReader) u16(i int, field string, def uint16) uint16 {
	n, _ := r.uintN(i, field, 16, uint64(def))
	return uint16(n)
}

func (r *fieldReader) u32(i int, field string, def uint32) uint32 {
	n, _ := r.uintN(i, field, 32, uint64(def))
	return uint32(n)
}

func (r *fieldReader) u64(i int, field string, def uint64) uint64 {
	n, _ := r.uintN(i, field, 64, def)
	return n
}

func (r *fieldReader) optU16(i int, field string) *uint16 {
	if n, ok := r.uintN(i, field, 16, 0); ok {
		v := uint16(n)
		return &v
	}
	return nil
}

func (r *fieldReader) optU32(i int, field string) *uint32 {
	if n, ok := r.uintN(i, field, 32, 0); ok {
		v := uint32(n)
		return &v
	}
	return nil
}

func (r *fieldReader) boolean(i int, field string) bool {
	switch v := r.get(i).(type) {
	case nil:
		return false
	case bool:
		return v
	default:
		r.bad(field, v, "boolean")
		return false
	}
}

func (r *fieldReader) str(i int, field string) string {
	switch v := r.get(i).(type) {
	case nil:
		return ""
	case string:
		return v
	default:
		r.bad(field, v, "string")
		return ""
	}
}

func (r *fieldReader) sym(i int, field string) Symbol {
	switch v := r.get(i).(type) {
	case nil:
		return ""
	case Symbol:
		return v
	default:
		r.bad(field, v, "symbol")
		return ""
	}
}

func (r *fieldReader) bin(i int, field string) []byte {
	switch v := r.get(i).(type) {
	case nil:
		return nil
	case []byte:
		return v
	default:
		r.bad(field, v, "binary")
		return nil
	}
}

func (r *fieldReader) timestamp(i int, field string) time.Time {
	switch v := r.get(i).(type) {
	case nil:
		return time.Time{}
	case time.Time:
		return v
	default:
		r.bad(field, v, "timestamp")
		return time.Time{}
	}
}

func (r *fieldReader) mapf(i int, field string) Map {
	switch v := r.get(i).(type) {
	case nil:
		return nil
	case Map:
		return v
	default:
		r.bad(field, v, "map")
		return nil
	}
}

// symbols reads a multiple-symbol field: one symbol or an array of them.
func (r *fieldReader) symbols(i int, field string) []Symbol {
	switch v := r.get(i).(type) {
	case nil:
		return nil
	case Symbol:
		return []Symbol{v}
	case Array:
		out := make([]Symbol, 0, len(v))
		for _, x := range v {
			s, ok := x.(Symbol)
			if !ok {
				r.bad(field, x, "symbol array")
				return nil
			}
			out = append(out, s)
		}
		return out
	default:
		r.bad(field, v, "symbol or symbol array")
		return nil
	}
}

// described reads a described field into one of this package's types.
func (r *fieldReader) described(i int, field string, codes ...uint64) any {
	v := r.get(i)
	if v == nil {
		return nil
	}
	d, ok := v.(Described)
	if !ok {
		r.bad(field, v, "described type")
		return nil
	}
	x, err := fromDescribed(d)
	if err != nil {
		if r.err == nil {
			r.err = fmt.Errorf("amqp: %s.%s: %w", r.what, field, err)
		}
		return nil
	}
	code := descriptorCode(d.Descriptor)
	for _, c := range codes {
		if c == code {
			return x
		}
	}
	r.bad(field, x, "another described type")
	return nil
}

// optional-field helpers for encoding: absent values become null.
func optString(s string) any {
	if s == "" {
		return nil
	}
	return s
}

func optSymbol(s Symbol) any {
	if s == "" {
		return nil
	}
	return s
}

func optBool(b bool) any {
	if !b {
		return nil
	}
	return true
}

func optBinary(b []byte) any {
	if b == nil {
		return nil
	}
	return b
}

func optMap(m Map) any {
	if m == nil {
		return nil
	}
	return m
}

func optSymbols(s []Symbol) any {
	if s == nil {
		return nil
	}
	return s
}

func optU32(p *uint32) any {
	if p == nil {
		return nil
	}
	return *p
}

func optTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
}
