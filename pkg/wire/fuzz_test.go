package wire

import (
	"reflect"
	"testing"
)

// FuzzParse: Parse never panics, and whatever it accepts formats to a topic that parses back to
// the same value (the canonical form is a fixed point).
func FuzzParse(f *testing.F) {
	for _, c := range Cases {
		f.Add(c.Topic)
	}
	for _, c := range BadCases {
		f.Add(c.Topic)
	}
	f.Fuzz(func(t *testing.T, topic string) {
		got, err := Parse(topic)
		if err != nil {
			return
		}
		s, err := Format(got)
		if err != nil {
			t.Fatalf("Format(%+v): %v", got, err)
		}
		again, err := Parse(s)
		if err != nil {
			t.Fatalf("canonical %q of %q does not parse: %v", s, topic, err)
		}
		if !reflect.DeepEqual(normal(again), normal(got)) {
			t.Fatalf("%q -> %+v -> %q -> %+v", topic, got, s, again)
		}
	})
}

// FuzzProperties: a decoded bag re-encodes to a bag that decodes to the same properties.
func FuzzProperties(f *testing.F) {
	for _, s := range []string{"", "a=b", "%24.mid=1&x&y=", "a=%FF", "k=a+b&&", "=x", "a=1&a=2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := DecodeProperties(s)
		if err != nil {
			return
		}
		q, err := DecodeProperties(EncodeProperties(p))
		if err != nil {
			t.Fatalf("re-encoded bag of %q fails: %v", s, err)
		}
		if !reflect.DeepEqual(normalProps(p), normalProps(q)) {
			t.Fatalf("%q: %+v != %+v", s, p, q)
		}
	})
}

func FuzzParseFilter(f *testing.F) {
	f.Add("devices/d/messages/devicebound/#")
	f.Add("$iothub/twin/res/#")
	f.Add("devices/d/modules/m/#")
	f.Fuzz(func(t *testing.T, s string) {
		fl, err := ParseFilter(s)
		if err == nil && fl.Kind == FilterUnknown {
			t.Fatalf("%q accepted as unknown kind", s)
		}
	})
}

func normal(t Topic) Topic { t.Properties = normalProps(t.Properties); return t }

func normalProps(p Properties) Properties {
	if len(p) == 0 {
		return nil
	}
	return p
}
