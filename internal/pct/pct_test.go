package pct

import (
	"errors"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	for _, s := range []string{"", "abc", "a/b:c d", "!'()*", "é€", "+/=", "%", "$.mid"} {
		d, err := Decode(Encode(s))
		if err != nil || d != s {
			t.Errorf("round trip %q: %q %v", s, d, err)
		}
	}
	if got := Encode("!'()* $/"); got != "%21%27%28%29%2A%20%24%2F" {
		t.Errorf("Encode = %s", got)
	}
	if d, _ := Decode("a+b%2f%2F"); d != "a+b//" {
		t.Errorf("Decode = %q", d)
	}
	for _, bad := range []string{"%", "%2", "a%zz", "%G0"} {
		if _, err := Decode(bad); !errors.Is(err, ErrEscape) {
			t.Errorf("Decode(%q) err = %v", bad, err)
		}
	}
}

func FuzzDecode(f *testing.F) {
	for _, s := range []string{"", "%24.mid", "a%zz", "%", "%e9%80"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := Decode(s)
		if err != nil {
			return
		}
		if again, err := Decode(Encode(d)); err != nil || again != d {
			t.Fatalf("%q -> %q -> %q (%v)", s, d, again, err)
		}
	})
}
