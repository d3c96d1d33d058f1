package hubsim_test

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/wire"
)

type serviceTwin struct {
	DeviceID   string         `json:"deviceId"`
	ETag       string         `json:"etag"`
	Version    int64          `json:"version"`
	Tags       map[string]any `json:"tags"`
	Properties struct {
		Desired  map[string]any `json:"desired"`
		Reported map[string]any `json:"reported"`
	} `json:"properties"`
}

func (e *env) twin(id string) serviceTwin {
	e.t.Helper()
	r := e.do("GET", "/twins/"+id+"?api-version=2021-04-12", nil, "")
	if r.status != 200 {
		e.t.Fatalf("GET twin: %d %s", r.status, r.body)
	}
	var tw serviceTwin
	r.json(e.t, &tw)
	return tw
}

func TestTwinDeviceAndServiceViews(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("tw1")
	other := e.createSAS("tw2")
	rc := e.connectSAS(d)
	rc.subscribe(1, wire.TwinResponseFilter, wire.TwinDesiredFilter)
	oc := e.connectSAS(other)
	oc.subscribe(1, wire.TwinResponseFilter, wire.TwinDesiredFilter)

	// reported PATCH with a nested merge, then a null delete
	rc.send(publishPkt(wire.TwinPatchReported("r1"), []byte(`{"fw":{"v":"1.0","ok":true},"temp":21}`), 0, 0, false))
	if pub := parsePublish(t, rc.mustRead()); pub.topic != "$iothub/twin/res/204/?$rid=r1&$version=2" {
		t.Fatalf("PATCH 1: %s", pub.topic)
	}
	rc.send(publishPkt(wire.TwinPatchReported("r2"), []byte(`{"fw":{"ok":null},"temp":null}`), 0, 0, false))
	if pub := parsePublish(t, rc.mustRead()); pub.topic != "$iothub/twin/res/204/?$rid=r2&$version=3" {
		t.Fatalf("PATCH 2: %s", pub.topic)
	}

	// service PATCH with If-Match: the device gets the desired patch with $version, the other not
	tw := e.twin("tw1")
	if tw.Version != 3 || tw.ETag == "" {
		t.Fatalf("twin version %d etag %q", tw.Version, tw.ETag)
	}
	r := e.do("PATCH", "/twins/tw1?api-version=2021-04-12", []byte(`{"tags":{"site":"a"},"properties":{"desired":{"interval":5,"cfg":{"x":1}}}}`), "", "If-Match", `"`+tw.ETag+`"`)
	if r.status != 200 {
		t.Fatalf("PATCH twin: %d %s", r.status, r.body)
	}
	pub := parsePublish(t, rc.mustRead())
	if pub.topic != "$iothub/twin/PATCH/properties/desired/?$version=2" {
		t.Fatalf("desired notification topic %q", pub.topic)
	}
	var note map[string]any
	if err := json.Unmarshal(pub.payload, &note); err != nil || note["interval"] != 5.0 || note["$version"] != 2.0 {
		t.Fatalf("desired notification %s", pub.payload)
	}
	// a stale etag is 412 PreconditionFailed and changes nothing
	r = e.do("PATCH", "/twins/tw1", []byte(`{"properties":{"desired":{"interval":6}}}`), "", "If-Match", `"`+tw.ETag+`"`)
	if r.status != 412 || r.errorCode(t) != "PreconditionFailed" {
		t.Fatalf("stale etag: %d %s", r.status, r.body)
	}
	// a limit violation is 400 ArgumentInvalid and changes nothing
	r = e.do("PATCH", "/twins/tw1", []byte(`{"properties":{"desired":{"bad.key":1}}}`), "", "If-Match", "*")
	if r.status != 400 || r.errorCode(t) != "ArgumentInvalid" {
		t.Fatalf("bad key: %d %s", r.status, r.body)
	}
	r = e.do("PATCH", "/twins/nobody", []byte(`{"tags":{"a":1}}`), "")
	if r.status != 404 || r.errorCode(t) != "DeviceNotFound" {
		t.Fatalf("unknown device: %d %s", r.status, r.body)
	}

	// the device GET has no $metadata; the service view has it, with $lastUpdatedVersion on desired only
	rc.send(publishPkt(wire.TwinGet("g1"), nil, 0, 0, false))
	pub = parsePublish(t, rc.mustRead())
	if pub.topic != "$iothub/twin/res/200/?$rid=g1" {
		t.Fatalf("GET topic %q", pub.topic)
	}
	if strings.Contains(string(pub.payload), "$metadata") || strings.Contains(string(pub.payload), "properties") {
		t.Fatalf("device view carries $metadata or a properties wrapper: %s", pub.payload)
	}
	var dv struct{ Desired, Reported map[string]any }
	if err := json.Unmarshal(pub.payload, &dv); err != nil {
		t.Fatal(err)
	}
	if dv.Desired["$version"] != 2.0 || dv.Reported["$version"] != 3.0 || dv.Desired["interval"] != 5.0 {
		t.Fatalf("device view %s", pub.payload)
	}
	if fw, _ := dv.Reported["fw"].(map[string]any); fw["v"] != "1.0" || fw["ok"] != nil || dv.Reported["temp"] != nil {
		t.Fatalf("reported after null deletes: %s", pub.payload)
	}
	tw = e.twin("tw1")
	dm, _ := tw.Properties.Desired["$metadata"].(map[string]any)
	rm, _ := tw.Properties.Reported["$metadata"].(map[string]any)
	leaf, _ := dm["interval"].(map[string]any)
	if leaf["$lastUpdated"] == nil || leaf["$lastUpdatedVersion"] != 2.0 {
		t.Fatalf("desired $metadata %v", dm)
	}
	fwm, _ := rm["fw"].(map[string]any)
	if fwm["$lastUpdated"] == nil || fwm["$lastUpdatedVersion"] != nil || fwm["ok"] != nil {
		t.Fatalf("reported $metadata %v", rm)
	}
	if tw.Tags["site"] != "a" {
		t.Fatalf("tags %v", tw.Tags)
	}

	// PUT replaces tags and desired; the device is told which keys went away
	r = e.do("PUT", "/twins/tw1", []byte(`{"tags":{"b":1},"properties":{"desired":{"mode":"eco"}}}`), "", "If-Match", `"`+tw.ETag+`"`)
	if r.status != 200 {
		t.Fatalf("PUT: %d %s", r.status, r.body)
	}
	pub = parsePublish(t, rc.mustRead())
	note = nil
	if err := json.Unmarshal(pub.payload, &note); err != nil || note["mode"] != "eco" || note["$version"] != 3.0 {
		t.Fatalf("replace notification %s", pub.payload)
	}
	if v, ok := note["interval"]; !ok || v != nil {
		t.Fatalf("replace notification does not delete interval: %s", pub.payload)
	}
	tw = e.twin("tw1")
	if len(tw.Tags) != 1 || tw.Tags["b"] != 1.0 || tw.Properties.Desired["interval"] != nil {
		t.Fatalf("after PUT: %+v", tw)
	}

	// a reported PATCH that breaks a limit gets 400 with errorCode and message
	rc.send(publishPkt(wire.TwinPatchReported("bad"), []byte(`{"s":"`+strings.Repeat("x", 5000)+`"}`), 0, 0, false))
	pub = parsePublish(t, rc.mustRead())
	var de wire.DeviceError
	if pub.topic != "$iothub/twin/res/400/?$rid=bad" || json.Unmarshal(pub.payload, &de) != nil || de.Code != 400004 || de.Message == "" {
		t.Fatalf("oversized string: %s %s", pub.topic, pub.payload)
	}
	rc.send(publishPkt(wire.TwinPatchReported("notjson"), []byte(`{"a":`), 0, 0, false))
	if pub := parsePublish(t, rc.mustRead()); pub.topic != "$iothub/twin/res/400/?$rid=notjson" {
		t.Fatalf("malformed JSON: %s", pub.topic)
	}

	// the other device saw none of this: its next packet is the answer to its own GET
	oc.send(publishPkt(wire.TwinGet("o1"), nil, 0, 0, false))
	if pub := parsePublish(t, oc.mustRead()); pub.topic != "$iothub/twin/res/200/?$rid=o1" {
		t.Fatalf("other device received %q", pub.topic)
	}
}

func TestTwinNotificationOnlyWhileSubscribed(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("tw3")
	rc := e.connectSAS(d)
	rc.subscribe(1, wire.TwinResponseFilter)
	if r := e.do("PATCH", "/twins/tw3", []byte(`{"properties":{"desired":{"a":1}}}`), "", "If-Match", "*"); r.status != 200 {
		t.Fatalf("PATCH: %d", r.status)
	}
	// not subscribed to desired: the next packet is the GET answer, already at desired version 2
	rc.send(publishPkt(wire.TwinGet("g"), nil, 0, 0, false))
	pub := parsePublish(t, rc.mustRead())
	if pub.topic != "$iothub/twin/res/200/?$rid=g" || !strings.Contains(string(pub.payload), `"a":1`) {
		t.Fatalf("got %q %s", pub.topic, pub.payload)
	}
}

func TestTwinsSurviveRestart(t *testing.T) {
	dir := t.TempDir()
	e := newEnvIn(t, dir)
	d := e.createSAS("tw4")
	rc := e.connectSAS(d)
	rc.subscribe(1, wire.TwinResponseFilter)
	rc.send(publishPkt(wire.TwinPatchReported("r"), []byte(`{"n":1.5,"big":4503599627370495}`), 0, 0, false))
	parsePublish(t, rc.mustRead())
	if r := e.do("PATCH", "/twins/tw4", []byte(`{"tags":{"t":"x"},"properties":{"desired":{"d":true}}}`), "", "If-Match", "*"); r.status != 200 {
		t.Fatalf("PATCH: %d", r.status)
	}
	before := e.twin("tw4")
	rc.c.Close()
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	e2 := newEnvIn(t, dir)
	after := e2.twin("tw4")
	if after.Version != before.Version || after.ETag != before.ETag || after.Tags["t"] != "x" ||
		after.Properties.Desired["d"] != true || after.Properties.Reported["n"] != 1.5 ||
		after.Properties.Reported["$version"] != before.Properties.Reported["$version"] {
		t.Fatalf("after restart %+v, before %+v", after, before)
	}
	// deleting the device deletes its twin: a new device of the same name starts at version 1
	if r := e2.do("DELETE", "/devices/tw4", nil, ""); r.status != 204 {
		t.Fatalf("delete: %d", r.status)
	}
	e2.createSAS("tw4")
	if tw := e2.twin("tw4"); tw.Version != 1 || len(tw.Tags) != 0 || tw.Properties.Reported["n"] != nil {
		t.Fatalf("recreated device kept the old twin: %+v", tw)
	}
}

func TestTwinRateLimit(t *testing.T) {
	e := newEnv(t, func(c *hubsim.Config) { c.TwinRateLimit = 2 })
	d := e.createSAS("tw5")
	rc := e.connectSAS(d)
	rc.subscribe(1, wire.TwinResponseFilter)
	throttled := false
	for i := 0; i < 10 && !throttled; i++ {
		rc.send(publishPkt(wire.TwinGet("g"), nil, 0, 0, false))
		pub := parsePublish(t, rc.mustRead())
		if strings.HasPrefix(pub.topic, "$iothub/twin/res/429/") {
			var de wire.DeviceError
			if json.Unmarshal(pub.payload, &de) != nil || de.Code != 429001 {
				t.Fatalf("429 body %s", pub.payload)
			}
			throttled = true
		}
	}
	if !throttled {
		t.Fatal("10 GETs at a limit of 2/s were all answered")
	}
}
