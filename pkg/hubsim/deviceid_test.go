package hubsim_test

import (
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Device IDs follow the identity registry's documented set (':' included), '+' and '#' are
// refused (MQTT wildcards), and a device whose ID uses every allowed special character connects
// and sends telemetry with its ID raw in the topic.
func TestDeviceIDCharacters(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		id     string
		status int
		why    string
	}{
		{"site:a:dev-1", 200, ""},
		{"a+b", 400, "does not support"},
		{"a#b", 400, "does not support"},
		{"a;b", 400, "invalid character"},
	} {
		r := e.do("PUT", "/devices/"+url.PathEscape(tc.id)+"?api-version=2021-04-12", []byte(`{"deviceId":"`+tc.id+`"}`), "")
		if r.status != tc.status || !strings.Contains(string(r.body), tc.why) {
			t.Errorf("create %q: %d %s, want %d mentioning %q", tc.id, r.status, r.body, tc.status, tc.why)
		}
	}

	id := "x" + wire.DeviceIDSpecials // every special character IoT Hub allows
	d, err := e.srv.Registry().Create(registry.Device{DeviceID: id})
	if err != nil {
		t.Fatal(err)
	}
	rc := e.connectSAS(d)
	mark := e.ev.mark()
	rc.send(publishPkt("devices/"+id+"/messages/events/", []byte(`{"t":1}`), 1, 7, false))
	if p := rc.mustRead(); p.typ != 4 {
		t.Fatalf("telemetry from %q: got packet type %d, want PUBACK", id, p.typ)
	}
	e.ev.waitFrom(t, mark, "telemetry", func(ev broker.Event) bool { return ev.Kind == broker.EventTelemetry && ev.DeviceID == id })

	// A method name with a wildcard would go raw into the request's topic name: refused.
	for _, m := range []string{"a#", "a+b"} {
		r := e.do("POST", "/twins/"+url.PathEscape(id)+"/methods?api-version=2021-04-12",
			[]byte(`{"methodName":"`+m+`","responseTimeoutInSeconds":5}`), e.serviceToken("iothubowner", time.Now().Add(time.Hour)))
		if r.status != 400 || !strings.Contains(string(r.body), "invalid character") {
			t.Errorf("method %q: %d %s, want 400 invalid character", m, r.status, r.body)
		}
	}
}
