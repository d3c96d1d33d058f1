package wire

import (
	"reflect"
	"testing"
)

// TestParseQuick: the canonical hub-to-device $iothub topics of the shared table take the quick
// path and give what Parse gives; the others, and every bad case, are left to Parse.
func TestParseQuick(t *testing.T) {
	quickKinds := map[Kind]bool{KindTwinResponse: true, KindTwinDesired: true, KindMethodRequest: true}
	for _, c := range Cases {
		q := ParseQuick(c.Topic)
		got, ok := q.Topic(), q.Kind != KindUnknown
		if want := quickKinds[c.Want.Kind] && !c.ParseOnly; ok != want {
			t.Errorf("%s: ParseQuick(%q) ok = %v, want %v", c.Name, c.Topic, ok, want)
			continue
		}
		if ok && !reflect.DeepEqual(got, c.Want) {
			t.Errorf("%s: ParseQuick(%q) = %+v, want %+v", c.Name, c.Topic, got, c.Want)
		}
	}
	for _, c := range BadCases {
		if got := ParseQuick(c.Topic); got.Kind != KindUnknown {
			t.Errorf("%s: ParseQuick(%q) accepted a bad topic: %+v", c.Name, c.Topic, got)
		}
	}
	// Spellings Parse accepts that the quick path leaves to it (so callers must fall back).
	for _, topic := range []string{
		"$iothub/twin/res/200/?%24rid=1",                                      // escaped key
		"$iothub/twin/res/200/?$rid=a%20b",                                    // escaped value
		"$iothub/twin/res/204/?$rid=1&$version=+6",                            // signed version
		"$iothub/twin/res/200/?$rid=1&extra=x",                                // unknown parameter
		"$iothub/twin/PATCH/properties/desired/?$version=0000000000000000001", // 19 digits
		"$iothub/methods/POST/m/?$rid=é",                                      // non-ASCII
	} {
		if _, err := Parse(topic); err != nil {
			t.Fatalf("Parse(%q): %v (the case is meant to be one Parse accepts)", topic, err)
		}
		if got := ParseQuick(topic); got.Kind != KindUnknown {
			t.Errorf("ParseQuick(%q) = %+v, want it left to Parse", topic, got)
		}
	}
	// Refusals Parse makes that ParseQuick must make too.
	for _, topic := range []string{
		"$iothub/twin/res/099/?$rid=1", "$iothub/twin/res/200/?$rid=", "$iothub/twin/res/200/?$rid=1&$rid=1",
		"$iothub/twin/res/200/?$rid=1&$version=", "$iothub/twin/res/200/?$rid=1&$version=1x",
		"$iothub/methods/POST//?$rid=1", "$iothub/methods/POST/a+b/?$rid=1", "$iothub/?/twin/res/200/?$rid=1",
	} {
		if _, err := Parse(topic); err == nil {
			t.Fatalf("Parse(%q) accepted it (the case is meant to be a refusal)", topic)
		}
		if got := ParseQuick(topic); got.Kind != KindUnknown {
			t.Errorf("ParseQuick(%q) accepted a topic Parse refuses: %+v", topic, got)
		}
	}
}

// TestParseQuickAllocs: the quick path allocates nothing (Parse allocates its parameter map).
func TestParseQuickAllocs(t *testing.T) {
	for _, topic := range []string{
		"$iothub/twin/res/204/?$rid=5f0e4b2c-8c1a-4f5e-9a57-1c2d3e4f5a6b&$version=17",
		"$iothub/twin/PATCH/properties/desired/?$version=3",
		"$iothub/methods/POST/reboot/?$rid=9",
	} {
		if n := testing.AllocsPerRun(100, func() {
			if ParseQuick(topic).Kind == KindUnknown {
				t.Fatalf("ParseQuick(%q) not ok", topic)
			}
		}); n != 0 {
			t.Errorf("ParseQuick(%q): %.0f allocations, want 0", topic, n)
		}
	}
}

// FuzzParseQuick: whatever ParseQuick accepts, Parse accepts with the same result.
func FuzzParseQuick(f *testing.F) {
	for _, c := range Cases {
		f.Add(c.Topic)
	}
	for _, c := range BadCases {
		f.Add(c.Topic)
	}
	f.Add("$iothub/twin/res/204/?$version=2&$rid=1&")
	f.Add("$iothub/twin/PATCH/properties/desired/?$rid=&$version=007")
	f.Fuzz(func(t *testing.T, topic string) {
		q := ParseQuick(topic)
		if q.Kind == KindUnknown {
			return
		}
		p, err := Parse(topic)
		if err != nil {
			t.Fatalf("ParseQuick(%q) = %+v, but Parse refuses it: %v", topic, q, err)
		}
		if !reflect.DeepEqual(q.Topic(), p) {
			t.Fatalf("ParseQuick(%q) = %+v, Parse = %+v", topic, q, p)
		}
	})
}
