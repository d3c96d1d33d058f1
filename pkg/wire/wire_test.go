package wire

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestCases(t *testing.T) {
	for _, c := range Cases {
		t.Run(c.Name, func(t *testing.T) {
			got, err := Parse(c.Topic)
			if err != nil {
				t.Fatalf("Parse(%q): %v", c.Topic, err)
			}
			if !reflect.DeepEqual(got, c.Want) {
				t.Fatalf("Parse(%q)\n got %+v\nwant %+v", c.Topic, got, c.Want)
			}
			if c.ParseOnly {
				return
			}
			s, err := Format(got)
			if err != nil {
				t.Fatal(err)
			}
			if s != c.Topic {
				t.Fatalf("Format = %q, want %q", s, c.Topic)
			}
		})
	}
}

func TestBadCases(t *testing.T) {
	for _, c := range BadCases {
		if got, err := Parse(c.Topic); err == nil {
			t.Errorf("%s: Parse(%q) = %+v, want error", c.Name, c.Topic, got)
		} else if !errors.Is(err, ErrTopic) && !errors.Is(err, ErrPropertyBag) {
			t.Errorf("%s: error %v does not wrap ErrTopic or ErrPropertyBag", c.Name, err)
		}
	}
	if _, err := Parse("devices/d/messages/events/" + strings.Repeat("a", MaxTopicLength)); err == nil {
		t.Error("oversize topic accepted")
	}
}

func TestBuildersMatchCanonicalCases(t *testing.T) {
	props := Properties{{Key: PropMessageID, Value: "m 1"}, {Key: PropContentType, Value: "application/json"},
		{Key: PropContentEncoding, Value: "utf-8"}, {Key: "temp", Value: "21.5"}}
	checks := map[string]string{
		Telemetry("dev1", props):     "devices/dev1/messages/events/%24.mid=m%201&%24.ct=application%2Fjson&%24.ce=utf-8&temp=21.5",
		Telemetry("dev1", nil):       "devices/dev1/messages/events/",
		C2DFilter("dev1"):            "devices/dev1/messages/devicebound/#",
		TwinGet("1"):                 "$iothub/twin/GET/?$rid=1",
		TwinPatchReported("9"):       "$iothub/twin/PATCH/properties/reported/?$rid=9",
		TwinResponse(204, "1", 6):    "$iothub/twin/res/204/?$rid=1&$version=6",
		TwinResponse(200, "1", -1):   "$iothub/twin/res/200/?$rid=1",
		TwinDesired(3):               "$iothub/twin/PATCH/properties/desired/?$version=3",
		MethodRequest("reboot", "1"): "$iothub/methods/POST/reboot/?$rid=1",
		MethodResponse(404, "x"):     "$iothub/methods/res/404/?$rid=x",
	}
	for got, want := range checks {
		if got != want {
			t.Errorf("got %q want %q", got, want)
		}
	}
}

func TestPropertiesRoundTrip(t *testing.T) {
	p := Properties{
		{Key: PropMessageID, Value: "id&with=specials/é"},
		{Key: "nullprop", Null: true},
		{Key: "empty"},
		{Key: "sp ace", Value: "+plus%pct"},
	}
	enc := EncodeProperties(p)
	if strings.Contains(enc, "$") {
		t.Fatalf("encoded bag has a raw '$': %s", enc)
	}
	got, err := DecodeProperties(enc)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, p) {
		t.Fatalf("round trip\n got %+v\nwant %+v", got, p)
	}
	if v, ok := got.Get("nullprop"); !ok || v != "" {
		t.Fatal("Get on null property")
	}
	if e, _ := got.Lookup("nullprop"); !e.Null {
		t.Fatal("null lost")
	}
	got.Set("empty", "now set")
	got.Set("new", "x")
	if v, _ := got.Get("empty"); v != "now set" || len(got) != 5 {
		t.Fatalf("Set: %+v", got)
	}
	if !System(PropMessageID) || System("mid") {
		t.Fatal("System")
	}
}

func TestDecodePropertiesTolerance(t *testing.T) {
	got, err := DecodeProperties("a=1&&b=2&")
	if err != nil || len(got) != 2 {
		t.Fatalf("%+v %v", got, err)
	}
	if got, _ := DecodeProperties("k=a+b"); got[0].Value != "a+b" {
		t.Fatalf("'+' became %q", got[0].Value)
	}
	if _, err := DecodeProperties(strings.Repeat("a", MaxPropertyBagLength+1)); !errors.Is(err, ErrPropertyBag) {
		t.Fatalf("oversize bag: %v", err)
	}
}

func TestParseFilter(t *testing.T) {
	good := map[string]Filter{
		"devices/d1/messages/devicebound/#": {Kind: FilterC2D, DeviceID: "d1"},
		"devices/d1/modules/m/inputs/#":     {Kind: FilterModuleInputs, DeviceID: "d1", ModuleID: "m"},
		"devices/d1/modules/m/#":            {Kind: FilterModuleInputs, DeviceID: "d1", ModuleID: "m"},
		TwinResponseFilter:                  {Kind: FilterTwinResponse},
		TwinDesiredFilter:                   {Kind: FilterTwinDesired},
		MethodsFilter:                       {Kind: FilterMethods},
	}
	for f, want := range good {
		got, err := ParseFilter(f)
		if err != nil || got != want {
			t.Errorf("ParseFilter(%q) = %+v, %v", f, got, err)
		}
	}
	for _, f := range []string{"#", "devices/#", "devices/+/messages/devicebound/#", "devices/d1/messages/events/#",
		"$iothub/#", "$iothub/twin/res/+", "devices/d1/messages/devicebound/+", "", "devices/d~/messages/devicebound/#"} {
		if _, err := ParseFilter(f); !errors.Is(err, ErrTopic) {
			t.Errorf("ParseFilter(%q) accepted", f)
		}
	}
}

func TestValidate(t *testing.T) {
	for _, id := range []string{"a", "dev-1.x%_*?!(),=@$'", "site:a:dev-1", longID[:128]} {
		if err := ValidateDeviceID(id); err != nil {
			t.Errorf("%q: %v", id, err)
		}
	}
	for _, tc := range []struct{ id, why string }{
		{"", "1 to 128"}, {longID + "x", "1 to 128"}, {"a/b", "invalid character '/'"}, {"a b", "invalid character ' '"},
		{"é", "invalid character"}, {"a;b", "invalid character ';'"},
		{"a+b", "'+', which IoT Hub does not support"}, {"a#b", "'#', which IoT Hub does not support"},
	} {
		if err := ValidateDeviceID(tc.id); err == nil || !strings.Contains(err.Error(), tc.why) {
			t.Errorf("ValidateDeviceID(%q) = %v, want an error saying %q", tc.id, err, tc.why)
		}
	}
	for _, m := range []string{"", "a b", "a$", "x{", "\x7f", "a#", "a+b", "a/b"} {
		if ValidateMethodName(m) == nil {
			t.Errorf("method %q accepted", m)
		}
	}
}

func TestKindDirection(t *testing.T) {
	from := map[Kind]bool{KindTelemetry: true, KindTwinGet: true, KindTwinPatchReported: true, KindMethodResponse: true,
		KindC2D: false, KindTwinResponse: false, KindTwinDesired: false, KindMethodRequest: false, KindUnknown: false}
	for k, want := range from {
		if k.FromDevice() != want {
			t.Errorf("%v.FromDevice() = %v", k, !want)
		}
	}
	if Kind(99).String() != "kind(99)" || KindC2D.String() != "c2d" {
		t.Error("Kind.String")
	}
	if _, err := Format(Topic{}); err == nil {
		t.Error("Format of unknown kind")
	}
}

func TestServiceErrorBody(t *testing.T) {
	e := ErrDeviceNotFound.WithText("Device %s not found", "dev1")
	b, err := json.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"Message":"ErrorCode:DeviceNotFound;Device dev1 not found","ExceptionMessage":"ErrorCode:DeviceNotFound;404001"}`
	if string(b) != want {
		t.Fatalf("body %s", b)
	}
	got := ParseServiceError(404, b)
	if got.Code != "DeviceNotFound" || got.Number != 404001 || got.Text != "Device dev1 not found" || got.Status != 404 {
		t.Fatalf("parsed %+v", got)
	}
	if !errors.Is(got, ErrDeviceNotFound) || errors.Is(got, ErrDeviceAlreadyExists) {
		t.Fatal("Is")
	}
	odd := ParseServiceError(502, []byte("<html>bad gateway</html>"))
	if odd.Code != "" || !strings.Contains(odd.Text, "bad gateway") {
		t.Fatalf("non-JSON body: %+v", odd)
	}
}
