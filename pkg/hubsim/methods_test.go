package hubsim_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/wire"
)

// invokeAsync starts POST /twins/{id}/methods on its own goroutine; the channel gets the answer.
func (e *env) invokeAsync(id string, body string) <-chan response {
	ch := make(chan response, 1)
	tok := e.serviceToken("iothubowner", time.Now().Add(time.Hour))
	go func() {
		// e.do calls t.Fatal only on transport errors; those fail the test from this goroutine
		// too late to stop it, so the status carries them instead.
		ch <- e.do("POST", "/twins/"+id+"/methods?api-version=2021-04-12", []byte(body), tok)
	}()
	return ch
}

func await(t *testing.T, ch <-chan response) response {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(waitTimeout + 10*time.Second):
		t.Fatal("method call did not return")
		return response{}
	}
}

// methodErr decodes IoT Hub's direct-method error body: a JSON document nested as a string in
// Message, with no ErrorCode: prefix.
func methodErr(t *testing.T, r response) map[string]any {
	t.Helper()
	var outer struct{ Message, ExceptionMessage string }
	r.json(t, &outer)
	if strings.HasPrefix(outer.Message, "ErrorCode:") {
		t.Fatalf("method error body has an ErrorCode prefix: %s", r.body)
	}
	var inner map[string]any
	if err := json.Unmarshal([]byte(outer.Message), &inner); err != nil {
		t.Fatalf("Message %q is not a JSON document: %v", outer.Message, err)
	}
	return inner
}

func TestMethodRoundTripFirstAnswerWins(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("m1")
	rc := e.connectSAS(d)
	rc.subscribe(1, wire.MethodsFilter, wire.TwinResponseFilter)
	other := e.connectSAS(e.createSAS("m2"))
	other.subscribe(1, wire.MethodsFilter)

	ch := e.invokeAsync("m1", `{"methodName":"reboot","payload":{"a":[1,2]},"responseTimeoutInSeconds":30,"connectTimeoutInSeconds":0}`)
	pub := parsePublish(t, rc.mustRead())
	rid, ok := strings.CutPrefix(pub.topic, "$iothub/methods/POST/reboot/?$rid=")
	if !ok || rid == "" || pub.qos != 0 {
		t.Fatalf("request topic %q qos %d", pub.topic, pub.qos)
	}
	if string(pub.payload) != `{"a":[1,2]}` {
		t.Fatalf("request payload %s", pub.payload)
	}
	// Another device answering the same $rid is not the callee: ignored.
	other.send(publishPkt(wire.MethodResponse(500, rid), []byte(`{"from":"m2"}`), 0, 0, false))
	// The callee answers twice: the first answer completes the call.
	rc.send(publishPkt(wire.MethodResponse(201, rid), []byte(`{"ok":true}`), 0, 0, false))
	rc.send(publishPkt(wire.MethodResponse(202, rid), []byte(`{"ok":"again"}`), 1, 7, false))
	r := await(t, ch)
	if r.status != 200 {
		t.Fatalf("invoke: %d %s", r.status, r.body)
	}
	var res struct {
		Status  int             `json:"status"`
		Payload json.RawMessage `json:"payload"`
	}
	r.json(t, &res)
	if res.Status != 201 || string(res.Payload) != `{"ok":true}` {
		t.Fatalf("result %s", r.body)
	}
	if ct := r.header.Get("Content-Type"); !strings.Contains(ct, "application/json") {
		t.Fatalf("Content-Type %q", ct)
	}
	// The QoS 1 duplicate's PUBACK comes after hubsim handled it, so the count is final here.
	if p := rc.mustRead(); p.typ != 4 {
		t.Fatalf("expected PUBACK, got type %d", p.typ)
	}
	// m2's answer was handled before the other device's later packets: a round trip on m2 orders it.
	other.send(publishPkt(wire.MethodResponse(200, "unknown-rid"), nil, 1, 3, false))
	if p := other.mustRead(); p.typ != 4 {
		t.Fatalf("expected PUBACK, got type %d", p.typ)
	}
	if got := e.srv.Methods().Ignored(); got != 3 {
		t.Fatalf("ignored answers = %d, want 3 (other device, duplicate, unknown $rid)", got)
	}
}

func TestMethodPayloadShapes(t *testing.T) {
	e := newEnv(t)
	rc := e.connectSAS(e.createSAS("m3"))
	rc.subscribe(1, wire.MethodsFilter)
	for _, tc := range []struct {
		name, body, wantReq string
		answer              []byte
		wantPayload         string
	}{
		{"no payload key", `{"methodName":"a"}`, "null", nil, "null"},
		{"null payload, empty answer", `{"methodName":"b","payload":null}`, "null", []byte{}, "null"},
		{"string payload, non-JSON answer", `{"methodName":"c","payload":"hi"}`, `"hi"`, []byte("plain text"), `"plain text"`},
		{"number", `{"methodName":"d","payload":42}`, "42", []byte("[1]"), "[1]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ch := e.invokeAsync("m3", tc.body)
			pub := parsePublish(t, rc.mustRead())
			_, rid, _ := strings.Cut(pub.topic, "$rid=")
			if string(pub.payload) != tc.wantReq {
				t.Fatalf("request payload %q, want %q", pub.payload, tc.wantReq)
			}
			rc.send(publishPkt(wire.MethodResponse(200, rid), tc.answer, 0, 0, false))
			r := await(t, ch)
			var res struct {
				Status  int             `json:"status"`
				Payload json.RawMessage `json:"payload"`
			}
			r.json(t, &res)
			if r.status != 200 || res.Status != 200 || string(res.Payload) != tc.wantPayload {
				t.Fatalf("got %d %s, want payload %s", r.status, r.body, tc.wantPayload)
			}
		})
	}
}

func TestMethodDeviceOffline(t *testing.T) {
	e := newEnv(t)
	e.createSAS("off1")
	r := await(t, e.invokeAsync("off1", `{"methodName":"reboot","responseTimeoutInSeconds":5}`))
	if r.status != 404 || r.header.Get("iothub-errorcode") != "404103" {
		t.Fatalf("offline: %d %v %s", r.status, r.header, r.body)
	}
	in := methodErr(t, r)
	if in["errorCode"] != float64(404103) || in["message"] != "Timed out waiting for device to connect." {
		t.Fatalf("inner error %v", in)
	}
	if info, _ := in["info"].(map[string]any); info["timeout"] != "00:00:00" {
		t.Fatalf("info %v", in["info"])
	}
	// Connected but not subscribed to methods is offline too.
	rc := e.connectSAS(e.createSAS("off2"))
	rc.subscribe(1, wire.TwinResponseFilter)
	if r := await(t, e.invokeAsync("off2", `{"methodName":"x"}`)); r.status != 404 || methodErr(t, r)["errorCode"] != float64(404103) {
		t.Fatalf("unsubscribed: %d %s", r.status, r.body)
	}
}

// With a connect timeout the call waits for the device to connect and subscribe.
func TestMethodConnectTimeoutWaitsForDevice(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("late")
	ch := e.invokeAsync("late", `{"methodName":"hello","payload":{},"connectTimeoutInSeconds":60}`)
	rc := e.connectSAS(d)
	rc.subscribe(1, wire.MethodsFilter)
	pub := parsePublish(t, rc.mustRead())
	_, rid, ok := strings.Cut(pub.topic, "$rid=")
	if !ok || !strings.HasPrefix(pub.topic, "$iothub/methods/POST/hello/") {
		t.Fatalf("topic %q", pub.topic)
	}
	rc.send(publishPkt(wire.MethodResponse(200, rid), []byte(`"hi"`), 0, 0, false))
	if r := await(t, ch); r.status != 200 || !strings.Contains(string(r.body), `"payload":"hi"`) {
		t.Fatalf("got %d %s", r.status, r.body)
	}
}

func TestMethodResponseTimeout(t *testing.T) {
	e := newEnv(t)
	rc := e.connectSAS(e.createSAS("slow"))
	rc.subscribe(1, wire.MethodsFilter)
	ch := e.invokeAsync("slow", `{"methodName":"hang","responseTimeoutInSeconds":5}`)
	pub := parsePublish(t, rc.mustRead())
	_, rid, _ := strings.Cut(pub.topic, "$rid=")
	r := await(t, ch)
	if r.status != 504 || r.header.Get("iothub-errorcode") != "504101" {
		t.Fatalf("timeout: %d %s", r.status, r.body)
	}
	if in := methodErr(t, r); in["errorCode"] != float64(504101) || in["message"] != "Timed out waiting for the response from device." {
		t.Fatalf("inner %v", in)
	}
	// A late answer is ignored and counted.
	before := e.srv.Methods().Ignored()
	rc.send(publishPkt(wire.MethodResponse(200, rid), nil, 1, 9, false))
	if p := rc.mustRead(); p.typ != 4 {
		t.Fatalf("expected PUBACK, got %d", p.typ)
	}
	if got := e.srv.Methods().Ignored(); got != before+1 {
		t.Fatalf("ignored %d, want %d", got, before+1)
	}
}

func TestMethodRequestRefusals(t *testing.T) {
	e := newEnv(t)
	e.createSAS("v1")
	big := `{"methodName":"m","payload":"` + strings.Repeat("x", 128*1024) + `"}`
	for _, tc := range []struct {
		name, path, method, body string
		status                   int
		code                     string
	}{
		{"response timeout too short", "/twins/v1/methods", "POST", `{"methodName":"m","responseTimeoutInSeconds":4}`, 400, "ArgumentInvalid"},
		{"response timeout too long", "/twins/v1/methods", "POST", `{"methodName":"m","responseTimeoutInSeconds":301}`, 400, "ArgumentInvalid"},
		{"connect timeout too long", "/twins/v1/methods", "POST", `{"methodName":"m","connectTimeoutInSeconds":301}`, 400, "ArgumentInvalid"},
		{"negative connect timeout", "/twins/v1/methods", "POST", `{"methodName":"m","connectTimeoutInSeconds":-1}`, 400, "ArgumentInvalid"},
		{"no method name", "/twins/v1/methods", "POST", `{"payload":1}`, 400, "ArgumentInvalid"},
		{"method name with slash", "/twins/v1/methods", "POST", `{"methodName":"a/b"}`, 400, "ArgumentInvalid"},
		{"not JSON", "/twins/v1/methods", "POST", `{"methodName":`, 400, "IotHubFormatError"},
		{"payload over 128 KB", "/twins/v1/methods", "POST", big, 413, "MessageTooLarge"},
		{"unknown device", "/twins/nobody/methods", "POST", `{"methodName":"m"}`, 404, "DeviceNotFound"},
		{"module form", "/twins/v1/modules/mod1/methods", "POST", `{"methodName":"m"}`, 404, "ModuleNotFound"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(tc.method, tc.path, []byte(tc.body), "")
			if r.status != tc.status || r.errorCode(t) != tc.code {
				t.Fatalf("got %d %s, want %d %s", r.status, r.body, tc.status, tc.code)
			}
		})
	}
	if r := e.do("GET", "/twins/v1/methods", nil, ""); r.status != 405 {
		t.Fatalf("GET: %d %s", r.status, r.body)
	}
	// A registry-only policy may not invoke methods.
	if r := e.do("POST", "/twins/v1/methods", []byte(`{"methodName":"m"}`), e.serviceToken("registryReadWrite", time.Now().Add(time.Hour))); r.status != 401 {
		t.Fatalf("registryReadWrite: %d %s", r.status, r.body)
	}
}
