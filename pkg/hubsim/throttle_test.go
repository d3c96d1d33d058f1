package hubsim_test

import (
	"encoding/binary"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
	"github.com/iothubby/iothubby/pkg/wire"
)

// expectThrottled checks a service response is IoT Hub's 429: status, iothub-errorcode header and
// an Azure error body naming ThrottlingException and 429001.
func expectThrottled(t *testing.T, what string, r response) {
	t.Helper()
	if r.status != 429 {
		t.Fatalf("%s: status %d (%s), want 429", what, r.status, r.body)
	}
	if h := r.header.Get("iothub-errorcode"); h != "ThrottlingException" {
		t.Fatalf("%s: iothub-errorcode %q, want ThrottlingException", what, h)
	}
	if c := r.errorCode(t); c != "ThrottlingException" {
		t.Fatalf("%s: body error code %q, want ThrottlingException", what, c)
	}
	var b struct{ ExceptionMessage string }
	r.json(t, &b)
	if !strings.Contains(b.ExceptionMessage, "429001") {
		t.Fatalf("%s: ExceptionMessage %q lacks 429001", what, b.ExceptionMessage)
	}
}

// twinStatus sends a device twin GET and returns the status of its response.
func twinStatus(t *testing.T, rc *rawConn, rid string) (int, []byte) {
	t.Helper()
	rc.send(publishPkt(wire.TwinGet(rid), nil, 0, 0, false))
	pub := parsePublish(t, rc.mustRead())
	rest, ok := strings.CutPrefix(pub.topic, "$iothub/twin/res/")
	if !ok || !strings.Contains(rest, "$rid="+rid) {
		t.Fatalf("twin response topic %q for rid %s", pub.topic, rid)
	}
	code, _, _ := strings.Cut(rest, "/")
	switch code {
	case "200":
		return 200, pub.payload
	case "429":
		return 429, pub.payload
	}
	t.Fatalf("twin response topic %q", pub.topic)
	return 0, nil
}

// TestTierS1Throttles runs hubsim as one S1 unit on a fake clock that stands still unless the test
// advances it, so every bucket holds exactly one second's worth: 100 connects, 100 twin reads,
// 100 telemetry messages, 1 registry call (100/min), 40 method meters of 4 KB.
func TestTierS1Throttles(t *testing.T) {
	clk := clock.NewFake(time.Now())
	e := newEnv(t, func(c *hubsim.Config) { c.Tier, c.Units, c.Clock = "S1", 1, clk })
	d := e.createSAS("thr1")
	user := e.host + "/thr1/?api-version=2021-04-12"

	// Connections: 100 in one instant, the 101st gets CONNACK 3 and is closed; after the clock
	// moves on by one token's time, a connect succeeds again.
	for i := range 100 {
		if code := e.dial().connect("thr1", user, e.token(d)); code != 0 {
			t.Fatalf("connect %d of 100: CONNACK %d", i+1, code)
		}
	}
	mark := e.ev.mark()
	rc := e.dial()
	if code := rc.connect("thr1", user, e.token(d)); code != 3 {
		t.Fatalf("the 101st connect in one instant: CONNACK %d, want 3 (server unavailable)", code)
	}
	rc.expectClosed()
	ev := e.ev.waitFrom(t, mark, "refused", func(ev broker.Event) bool { return ev.Kind == broker.EventRefused })
	if ev.Reason != broker.ReasonConnectThrottled || ev.DeviceID != "thr1" {
		t.Fatalf("refusal event %+v, want reason %q", ev, broker.ReasonConnectThrottled)
	}
	// The WebSocket listener shares the bucket.
	ws, _ := e.mustDialWS("/$iothub/websocket", []string{"mqtt"})
	if code := ws.connect("thr1", user, e.token(d)); code != 3 {
		t.Fatalf("a connect over WebSocket past the rate: CONNACK %d, want 3", code)
	}
	ws.expectClosed()
	clk.Advance(10 * time.Millisecond) // one connect token at 100/s
	rc = e.connectSAS(d)
	rc.subscribe(1, wire.TwinResponseFilter)

	// Twin reads: the service side and devices share IoT Hub's 100/s.
	for i := range 100 {
		if r := e.do("GET", "/twins/thr1?api-version=2021-04-12", nil, ""); r.status != 200 {
			t.Fatalf("twin GET %d of 100: %d %s", i+1, r.status, r.body)
		}
	}
	expectThrottled(t, "the 101st twin GET", e.do("GET", "/twins/thr1?api-version=2021-04-12", nil, ""))
	status, body := twinStatus(t, rc, "g1")
	var de wire.DeviceError
	if status != 429 || json.Unmarshal(body, &de) != nil || de.Code != 429001 {
		t.Fatalf("device twin GET over the rate: %d %s, want 429 with errorCode 429001", status, body)
	}
	clk.Advance(10 * time.Millisecond)
	if status, body := twinStatus(t, rc, "g2"); status != 200 {
		t.Fatalf("device twin GET after a token refilled: %d %s", status, body)
	}

	// Telemetry: 100 acknowledged, the 101st closes the connection (MQTT cannot refuse a PUBLISH).
	topic := "devices/thr1/messages/events/"
	for i := range 100 {
		rc.send(publishPkt(topic, []byte("x"), 1, uint16(i+10), false))
	}
	for i := range 100 {
		p := rc.mustRead()
		if p.typ != 4 || binary.BigEndian.Uint16(p.body) != uint16(i+10) {
			t.Fatalf("telemetry %d: packet type %d %x, want its PUBACK", i+1, p.typ, p.body)
		}
	}
	mark = e.ev.mark()
	rc.send(publishPkt(topic, []byte("x"), 1, 200, false))
	rc.expectClosed()
	ev = e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool { return ev.Kind == broker.EventDisconnected })
	if ev.Reason != broker.ReasonD2CThrottled {
		t.Fatalf("closed for %q, want %q", ev.Reason, broker.ReasonD2CThrottled)
	}
	msgs, err := e.srv.Broker().Telemetry("thr1")
	if err != nil || len(msgs) != 100 {
		t.Fatalf("recorded telemetry: %d messages (%v), want the 100 acknowledged", len(msgs), err)
	}

	// Registry: 100/min is a bucket of 1.67, so one call and then 429.
	if r := e.do("GET", "/devices/thr1?api-version=2021-04-12", nil, ""); r.status != 200 {
		t.Fatalf("registry GET: %d %s", r.status, r.body)
	}
	expectThrottled(t, "the second registry GET", e.do("GET", "/devices/thr1?api-version=2021-04-12", nil, ""))

	// Direct methods: 40 meters of 4 KB a second; a call of 36-40 KB counts 10. The device is
	// offline (its connection was closed), so the allowed calls answer 404 DeviceNotOnline.
	head := `{"methodName":"m","responseTimeoutInSeconds":5,"payload":"`
	call := []byte(head + strings.Repeat("a", 38*1024-len(head)-2) + `"}`)
	if n := throttle.MethodUnits(int64(len(call))); n != 10 {
		t.Fatalf("test call counts %d meters, want 10", n)
	}
	for i := range 4 {
		if r := e.do("POST", "/twins/thr1/methods?api-version=2021-04-12", call, ""); r.status != 404 || !strings.Contains(string(r.body), "404103") {
			t.Fatalf("method call %d of 4: %d %s, want 404 DeviceNotOnline", i+1, r.status, r.body)
		}
	}
	expectThrottled(t, "a fifth 38 KB method call", e.do("POST", "/twins/thr1/methods?api-version=2021-04-12", call, ""))

	// The counters view.
	r := e.do("GET", "/hubsim/throttle", nil, "")
	var st throttle.Status
	r.json(t, &st)
	if r.status != 200 || st.Tier != "S1" || st.Units != 1 {
		t.Fatalf("GET /hubsim/throttle: %d %s", r.status, r.body)
	}
	got := map[throttle.Op]throttle.Counter{}
	for _, c := range st.Operations {
		got[c.Op] = c
	}
	want := map[throttle.Op]throttle.Counter{
		throttle.Connect:  {Op: throttle.Connect, PerSecond: 100, Allowed: 101, Throttled: 2},
		throttle.TwinRead: {Op: throttle.TwinRead, PerSecond: 100, Allowed: 101, Throttled: 2},
		throttle.D2C:      {Op: throttle.D2C, PerSecond: 100, Allowed: 100, Throttled: 1},
		throttle.Registry: {Op: throttle.Registry, PerSecond: 100.0 / 60, Allowed: 1, Throttled: 1},
		throttle.Method:   {Op: throttle.Method, PerSecond: 40, Allowed: 4, Throttled: 1},
		throttle.Query:    {Op: throttle.Query, PerSecond: 20.0 / 60},
	}
	for op, w := range want {
		if got[op] != w {
			t.Errorf("counters of %s: %+v, want %+v", op, got[op], w)
		}
	}
	if c := got[hubsim.DPSRegistrationOp]; c.PerSecond != 1000.0/60 {
		t.Errorf("DPS registrations under a tier: %+v, want DPS's 1,000/min", c)
	}
	if s := e.srv.Throttle(); len(s.Operations) != len(st.Operations) {
		t.Errorf("Server.Throttle has %d rows, the view %d", len(s.Operations), len(st.Operations))
	}
}

// TestNoTierThrottlesNothing: without a tier the view says so and nothing is counted.
func TestNoTierThrottlesNothing(t *testing.T) {
	e := newEnv(t)
	r := e.do("GET", "/hubsim/throttle", nil, "")
	var st throttle.Status
	r.json(t, &st)
	if r.status != 200 || st.Tier != "" || len(st.Operations) != 1 || st.Operations[0].Op != hubsim.DPSRegistrationOp || st.Operations[0].PerSecond != 0 {
		t.Fatalf("GET /hubsim/throttle without a tier: %d %s", r.status, r.body)
	}
	if r := e.do("PUT", "/hubsim/throttle", nil, ""); r.status != 405 {
		t.Fatalf("PUT /hubsim/throttle: %d, want 405", r.status)
	}
}

func TestTierRefusedWhenUnknown(t *testing.T) {
	for _, c := range []hubsim.Config{{Tier: "S4"}, {Tier: "F1", Units: 2}, {Units: 3}} {
		c.StateDir, c.MQTTAddr, c.HTTPSAddr = t.TempDir(), "127.0.0.1:0", "127.0.0.1:0"
		srv, err := hubsim.Start(t.Context(), c, nil)
		if err == nil {
			_ = srv.Close()
			t.Fatalf("Start with tier %q units %d succeeded", c.Tier, c.Units)
		}
		if !strings.Contains(err.Error(), "tier") {
			t.Fatalf("tier %q units %d: error %q does not name the tier", c.Tier, c.Units, err)
		}
	}
}

// TestTierSetAtRuntime: POST /hubsim/throttle turns a tier on in a running hubsim, DELETE off.
func TestTierSetAtRuntime(t *testing.T) {
	clk := clock.NewFake(time.Now())
	e := newEnv(t, func(c *hubsim.Config) { c.Clock = clk })
	e.createSAS("rt1")
	get := func() response { return e.do("GET", "/devices/rt1?api-version=2021-04-12", nil, "") }
	for range 3 {
		if r := get(); r.status != 200 {
			t.Fatalf("registry GET without a tier: %d %s", r.status, r.body)
		}
	}
	for _, bad := range []string{`{"tier":"S7"}`, `{"tier":"S1","unitz":1}`, `not json`, `{"tier":"F1","units":4}`} {
		if r := e.do("POST", "/hubsim/throttle", []byte(bad), ""); r.status != 400 || r.errorCode(t) != "ArgumentInvalid" {
			t.Fatalf("POST /hubsim/throttle %s: %d %s, want 400 ArgumentInvalid", bad, r.status, r.body)
		}
	}
	r := e.do("POST", "/hubsim/throttle", []byte(`{"tier":"s2","units":2}`), "")
	var st throttle.Status
	r.json(t, &st)
	if r.status != 200 || st.Tier != "S2" || st.Units != 2 {
		t.Fatalf("POST /hubsim/throttle: %d %s", r.status, r.body)
	}
	// S2 x2: registry 200/min, a bucket of 3.33 calls.
	for i := range 3 {
		if r := get(); r.status != 200 {
			t.Fatalf("registry GET %d of 3 under S2 x2: %d", i+1, r.status)
		}
	}
	expectThrottled(t, "the fourth registry GET under S2 x2", get())
	// Overrides: S3 with registry at 1/s, a bucket of one call.
	r = e.do("POST", "/hubsim/throttle", []byte(`{"tier":"S3","limits":{"registry":1}}`), "")
	if r.json(t, &st); r.status != 200 || st.Tier != "S3" || st.Operations[2].PerSecond != 1 {
		t.Fatalf("POST /hubsim/throttle with limits: %d %s", r.status, r.body)
	}
	if r := get(); r.status != 200 {
		t.Fatalf("registry GET on a fresh 1/s bucket: %d", r.status)
	}
	expectThrottled(t, "the second registry GET at 1/s", get())
	if r := e.do("DELETE", "/hubsim/throttle", nil, ""); r.status != 200 {
		t.Fatalf("DELETE /hubsim/throttle: %d %s", r.status, r.body)
	}
	if r := get(); r.status != 200 {
		t.Fatalf("registry GET after DELETE: %d %s", r.status, r.body)
	}
	if st := e.srv.Throttle(); st.Tier != "" || len(st.Operations) != 1 {
		t.Fatalf("status after DELETE: %+v", st)
	}
}
