package amqp

import (
	"reflect"
	"testing"
)

// FuzzValue: any input decodes or fails with a DecodeError; what decodes re-encodes to
// something that decodes to the same value.
func FuzzValue(f *testing.F) {
	for _, c := range valueCases {
		f.Add(c.enc)
	}
	f.Add([]byte{0xe0, 0x02, 0x02, 0x40})
	f.Add([]byte{0xd1, 0, 0, 0, 6, 0, 0, 0, 2, 0x43, 0x40})
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := Unmarshal(b)
		if err != nil {
			if _, ok := err.(*DecodeError); !ok {
				t.Fatalf("error %T %v is not a *DecodeError", err, err)
			}
			return
		}
		enc, err := AppendValue(nil, v)
		if err != nil {
			return // e.g. an array of described values: decodable, not encodable by this package
		}
		w, err := Unmarshal(enc)
		if err != nil {
			t.Fatalf("re-encoded % x does not decode: %v", enc, err)
		}
		if !reflect.DeepEqual(normalize(v), normalize(w)) {
			t.Fatalf("%#v re-decoded as %#v", v, w)
		}
	})
}

// normalize maps values whose encoding is lossy on purpose (NaN payloads) to comparable ones.
func normalize(v any) any {
	switch x := v.(type) {
	case float32:
		if x != x {
			return "NaN"
		}
	case float64:
		if x != x {
			return "NaN"
		}
	case []any:
		out := make([]any, len(x))
		for i := range x {
			out[i] = normalize(x[i])
		}
		return out
	case Array:
		out := make([]any, len(x))
		for i := range x {
			out[i] = normalize(x[i])
		}
		return out
	case Map:
		out := make([]any, 0, 2*len(x))
		for _, e := range x {
			out = append(out, normalize(e.Key), normalize(e.Value))
		}
		return out
	case Described:
		return Described{normalize(x.Descriptor), normalize(x.Value)}
	}
	return v
}

// FuzzFrameBody: performatives decode or fail cleanly; decoded ones re-encode and decode the same.
func FuzzFrameBody(f *testing.F) {
	for _, c := range frameCases {
		f.Add(c.enc[8:])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, payload, err := DecodeFrameBody(b)
		if err != nil {
			return
		}
		enc, err := AppendPerformativeFrame(nil, FrameAMQP, 0, p, payload)
		if err != nil {
			t.Fatalf("%T does not re-encode: %v", p, err)
		}
		q, payload2, err := DecodeFrameBody(enc[8:])
		if err != nil || !reflect.DeepEqual(normalize(p), normalize(q)) || string(payload) != string(payload2) {
			t.Fatalf("%#v re-decoded as %#v, %v", p, q, err)
		}
	})
}

// FuzzMessage: messages decode or fail cleanly; decoded ones re-encode and decode the same.
func FuzzMessage(f *testing.F) {
	f.Add([]byte{0x00, 0x53, 0x75, 0xa0, 0x02, 'h', 'i'})
	f.Add([]byte{0x00, 0x53, 0x77, 0xa1, 0x01, 'x'})
	f.Add([]byte{0x00, 0x53, 0x73, 0xc0, 0x03, 0x01, 0xa1, 0x00, 0x00, 0x53, 0x74, 0xc1, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		var m Message
		if err := m.UnmarshalBinary(b); err != nil {
			return
		}
		enc, err := m.MarshalBinary()
		if err != nil {
			return
		}
		var m2 Message
		if err := m2.UnmarshalBinary(enc); err != nil {
			t.Fatalf("re-encoded message does not decode: %v", err)
		}
	})
}
