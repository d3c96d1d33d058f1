package rest

import (
	"encoding/json"
	"net/http/httptest"
	"slices"
	"testing"

	"github.com/iothubby/iothubby/pkg/wire"
)

func TestOrderedProperties(t *testing.T) {
	p, err := orderedProperties(json.RawMessage(`{"z":"1","a":null,"m":""}`))
	want := wire.Properties{{Key: "z", Value: "1"}, {Key: "a", Null: true}, {Key: "m", Value: ""}}
	if err != nil || !slices.Equal(p, want) {
		t.Fatalf("%+v %v", p, err)
	}
	for _, bad := range []string{`[]`, `{"a":1}`, `{"a":{}}`, `"x"`, `{"a":"b"`} {
		if _, err := orderedProperties(json.RawMessage(bad)); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
	if p, err := orderedProperties(nil); err != nil || p != nil {
		t.Fatal(p, err)
	}
}

func TestSegments(t *testing.T) {
	for path, want := range map[string][]string{
		"/devices/":                         {"devices"},
		"/devices":                          {"devices"},
		"/devices/a%2Fb":                    {"devices", "a/b"},
		"/devices/a+b%25c?api-version=1":    {"devices", "a+b%c"},
		"/hubsim/devices/x/messages/events": {"hubsim", "devices", "x", "messages", "events"},
	} {
		got, err := Segments(httptest.NewRequest("GET", path, nil))
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("%s: %q %v", path, got, err)
		}
	}
}
