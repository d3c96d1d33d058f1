package hubsim_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/faults"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

var faultT0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// newFaultEnv is an env whose faults run on a fake clock.
func newFaultEnv(t *testing.T) (*env, *clock.Fake) {
	clk := clock.NewFake(faultT0)
	return newEnv(t, func(c *hubsim.Config) { c.Clock = clk }), clk
}

func (e *env) addFault(body string) faults.Rule {
	e.t.Helper()
	r := e.do("POST", "/hubsim/faults", []byte(body), "")
	if r.status != 200 {
		e.t.Fatalf("POST /hubsim/faults %s: %d %s", body, r.status, r.body)
	}
	var rule faults.Rule
	r.json(e.t, &rule)
	return rule
}

func (e *env) faultStatus() faults.Status {
	e.t.Helper()
	var st faults.Status
	e.do("GET", "/hubsim/faults", nil, "").json(e.t, &st)
	return st
}

// waitArmed waits until the fake clock has a timer armed for at.
func waitArmed(t *testing.T, clk *clock.Fake, at time.Time) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := clk.WaitTimer(ctx, at); err != nil {
		t.Fatalf("no timer armed for %v: %v (armed %v)", at, err, clk.Armed())
	}
}

// pingFirst shows the device gets nothing but a PINGRESP for a PINGREQ sent now: whatever the
// hub had queued before it (a PUBACK) would have been written first.
func (rc *rawConn) pingFirst() {
	rc.t.Helper()
	rc.send(pingPkt())
	if p := rc.mustRead(); p.typ != 13 {
		rc.t.Fatalf("expected only a PINGRESP, got packet type %d", p.typ)
	}
}

func pubackID(t *testing.T, p packet) uint16 {
	t.Helper()
	if p.typ != 4 || len(p.body) != 2 {
		t.Fatalf("expected a PUBACK, got type %d body %x", p.typ, p.body)
	}
	return uint16(p.body[0])<<8 | uint16(p.body[1])
}

// TestFaultPubackDelay: under puback-delay 5s the telemetry is recorded at once, and its PUBACK
// reaches the device not before 5 s have passed on the fault clock.
func TestFaultPubackDelay(t *testing.T) {
	e, clk := newFaultEnv(t)
	d := e.createSAS("pd1")
	rc := e.connectSAS(d)
	rule := e.addFault(`{"action":"puback-delay","deviceId":"pd1","delaySecs":5,"durationSecs":60}`)
	if rule.DelaySecs != 5 || !rule.Until.Equal(faultT0.Add(time.Minute)) {
		t.Fatalf("rule %+v", rule)
	}
	from := e.ev.mark()
	rc.send(publishPkt("devices/pd1/messages/events/%24.mid=m1", []byte("x"), 1, 9, false))
	e.ev.waitFrom(t, from, "telemetry recorded", func(ev broker.Event) bool {
		return ev.Kind == broker.EventTelemetry && ev.MessageID == "m1"
	})
	waitArmed(t, clk, faultT0.Add(5*time.Second))
	rc.pingFirst()
	clk.Advance(4 * time.Second)
	rc.pingFirst()
	clk.Advance(time.Second)
	if id := pubackID(t, rc.mustRead()); id != 9 {
		t.Fatalf("PUBACK for %d, want 9", id)
	}
	if now := clk.Now(); now.Before(faultT0.Add(5 * time.Second)) {
		t.Fatalf("PUBACK at %v, before the 5 s delay", now)
	}
	// Another device is not delayed.
	o := e.connectSAS(e.createSAS("pd2"))
	o.send(publishPkt("devices/pd2/messages/events/", nil, 1, 3, false))
	if id := pubackID(t, o.mustRead()); id != 3 {
		t.Fatalf("pd2 PUBACK %d", id)
	}
	if st := e.faultStatus(); st.Counters["admin:puback-delay/puback-delayed"] != 1 || st.Log[len(st.Log)-1].Action != "puback-delayed" {
		t.Fatalf("counters %v log %+v", st.Counters, st.Log)
	}
}

// TestFaultPubackDrop: under puback-drop the publish gets no PUBACK and is not recorded; the
// device sends it again after reconnecting (once the rule is cleared) and it is accepted.
func TestFaultPubackDrop(t *testing.T) {
	e, _ := newFaultEnv(t)
	d := e.createSAS("pq1")
	rc := e.connectSAS(d)
	e.addFault(`{"action":"puback-drop","durationSecs":600,"seed":3}`)
	rc.send(publishPkt("devices/pq1/messages/events/%24.mid=lost", []byte("x"), 1, 4, false))
	rc.pingFirst() // no PUBACK came before the PINGRESP
	if msgs, _ := e.srv.Broker().Telemetry("pq1"); len(msgs) != 0 {
		t.Fatalf("a publish whose PUBACK was dropped was recorded: %d messages", len(msgs))
	}
	if r := e.do("DELETE", "/hubsim/faults", nil, ""); r.status != 200 {
		t.Fatalf("DELETE %d", r.status)
	}
	_ = rc.c.Close()
	rc = e.connectSAS(d)
	dup := publishPkt("devices/pq1/messages/events/%24.mid=lost", []byte("x"), 1, 4, false)
	dup[0] |= 0x08 // DUP, as a client re-sending an unacknowledged publish
	rc.send(dup)
	if id := pubackID(t, rc.mustRead()); id != 4 {
		t.Fatalf("PUBACK %d", id)
	}
	msgs, _ := e.srv.Broker().Telemetry("pq1")
	if len(msgs) != 1 || msgs[0].SystemProperties["message-id"] != "lost" {
		t.Fatalf("recorded %+v", msgs)
	}
	if st := e.faultStatus(); st.Counters["admin:puback-drop/puback-dropped"] != 1 {
		t.Fatalf("counters %v", st.Counters)
	}
}

// TestFaultRESTError: rest-error answers matching service requests with the status, Retry-After
// and IoT Hub's error body; other paths and hubsim's own API are untouched.
func TestFaultRESTError(t *testing.T) {
	e, _ := newFaultEnv(t)
	e.createSAS("re1")
	e.addFault(`{"action":"rest-error","code":429,"retryAfterSecs":7,"pathPrefix":"/twins/","method":"GET","durationSecs":60}`)
	r := e.do("GET", "/twins/re1?api-version=2021-04-12", nil, "")
	if r.status != 429 || r.header.Get("Retry-After") != "7" || r.header.Get("iothub-errorcode") != "ThrottlingException" {
		t.Fatalf("GET /twins/re1 under rest-error: %d Retry-After %q code %q", r.status, r.header.Get("Retry-After"), r.header.Get("iothub-errorcode"))
	}
	se := wire.ParseServiceError(r.status, r.body)
	if se.Code != "ThrottlingException" || se.Number != 429001 || !strings.Contains(se.Text, "fault injected") {
		t.Fatalf("error body %s parsed as %+v", r.body, se)
	}
	if r := e.do("GET", "/devices/re1?api-version=2021-04-12", nil, ""); r.status != 200 {
		t.Fatalf("GET /devices/re1 (not under the prefix) = %d", r.status)
	}
	e.addFault(`{"action":"rest-error","durationSecs":60}`) // 503, every path
	r = e.do("GET", "/devices/re1?api-version=2021-04-12", nil, "")
	if r.status != 503 || r.header.Get("Retry-After") != "1" || wire.ParseServiceError(r.status, r.body).Code != "ServiceUnavailable" {
		t.Fatalf("503 rule: %d %q %s", r.status, r.header.Get("Retry-After"), r.body)
	}
	if st := e.faultStatus(); st.Counters["admin:rest-error/answered 429"] != 1 || st.Counters["admin:rest-error/answered 503"] != 1 {
		t.Fatalf("hubsim's own API faulted, or counters wrong: %v", st.Counters)
	}
}

// TestFaultRESTDelay: a request under rest-delay is answered not before the delay has passed on
// the fault clock.
func TestFaultRESTDelay(t *testing.T) {
	e, clk := newFaultEnv(t)
	e.createSAS("rd1")
	e.addFault(`{"action":"rest-delay","deviceId":"rd1","delaySecs":30,"durationSecs":60}`)
	done := make(chan response, 1)
	go func() { done <- e.do("GET", "/devices/rd1?api-version=2021-04-12", nil, "") }()
	waitArmed(t, clk, faultT0.Add(30*time.Second))
	if r := e.do("GET", "/devices/other?api-version=2021-04-12", nil, ""); r.status != 404 {
		t.Fatalf("another device's request = %d (held?)", r.status)
	}
	select {
	case r := <-done:
		t.Fatalf("answered %d before the delay", r.status)
	default:
	}
	clk.Advance(30 * time.Second)
	r := <-done
	if r.status != 200 {
		t.Fatalf("delayed request = %d %s", r.status, r.body)
	}
}

// dpsEnv enrolls registration regID with a symmetric key and returns its DPS SAS token.
func dpsEnroll(t *testing.T, e *env, regID string) string {
	t.Helper()
	key := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))
	if _, err := e.srv.DPS().PutEnrollment(hubapi.Enrollment{RegistrationID: regID,
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: key, SecondaryKey: key}}}, false, ""); err != nil {
		t.Fatal(err)
	}
	k, err := sas.ParseKey(key)
	if err != nil {
		t.Fatal(err)
	}
	scope := e.srv.DPS().IDScope()
	tok, err := sas.Build(context.Background(), k, sas.Params{Resource: sas.DPSResource(scope, regID), KeyName: "registration", Expiry: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestFaultDPSError: dps-error answers a registration over HTTPS with the status and a
// Retry-After header, and over MQTT on $dps/registrations/res/{status}/?$rid=..&retry-after=N;
// another registration is served.
func TestFaultDPSError(t *testing.T) {
	e, _ := newFaultEnv(t)
	tok := dpsEnroll(t, e, "dr1")
	scope := e.srv.DPS().IDScope()
	e.addFault(`{"action":"dps-error","deviceId":"dr1","code":429,"retryAfterSecs":9,"durationSecs":60}`)
	r := e.do("PUT", "/"+scope+"/registrations/dr1/register?api-version=2021-06-01", []byte(`{"registrationId":"dr1"}`), tok)
	if r.status != 429 || r.header.Get("Retry-After") != "9" {
		t.Fatalf("HTTPS register under dps-error: %d Retry-After %q %s", r.status, r.header.Get("Retry-After"), r.body)
	}
	var de wire.DPSError
	if err := json.Unmarshal(r.body, &de); err != nil || de.ErrorCode != 429001 {
		t.Fatalf("DPS error body %s: %v", r.body, err)
	}

	rc := e.dial()
	user := scope + "/registrations/dr1/api-version=2019-03-31"
	if code := rc.connect("dr1", user, tok); code != 0 {
		t.Fatalf("DPS CONNACK %d", code)
	}
	rc.subscribe(1, "$dps/registrations/res/#")
	rc.send(publishPkt("$dps/registrations/PUT/iotdps-register/?$rid=42", []byte(`{"registrationId":"dr1"}`), 0, 0, false))
	p := parsePublish(t, rc.mustRead())
	if p.topic != "$dps/registrations/res/429/?$rid=42&retry-after=9" {
		t.Fatalf("DPS MQTT response topic %q", p.topic)
	}
	e.addFault(`{"action":"dps-error","deviceId":"dr1","code":503,"retryAfterSecs":4,"durationSecs":60}`)
	if r := e.do("DELETE", "/hubsim/faults", nil, ""); r.status != 200 {
		t.Fatal(r.status)
	}
	rc.send(publishPkt("$dps/registrations/PUT/iotdps-register/?$rid=43", []byte(`{"registrationId":"dr1"}`), 0, 0, false))
	if p := parsePublish(t, rc.mustRead()); !strings.HasPrefix(p.topic, "$dps/registrations/res/202/?$rid=43") {
		t.Fatalf("after DELETE: %q", p.topic)
	}
	if st := e.faultStatus(); st.Counters["admin:dps-error/answered 429"] != 2 {
		t.Fatalf("counters %v", st.Counters)
	}
}

// TestFaultDPSDelay: a registration under dps-delay is answered not before the delay.
func TestFaultDPSDelay(t *testing.T) {
	e, clk := newFaultEnv(t)
	tok := dpsEnroll(t, e, "dd1")
	scope := e.srv.DPS().IDScope()
	e.addFault(`{"action":"dps-delay","delaySecs":20,"durationSecs":60}`)
	done := make(chan response, 1)
	go func() {
		done <- e.do("PUT", "/"+scope+"/registrations/dd1/register?api-version=2021-06-01", []byte(`{"registrationId":"dd1"}`), tok)
	}()
	waitArmed(t, clk, faultT0.Add(20*time.Second))
	select {
	case r := <-done:
		t.Fatalf("answered %d before the delay", r.status)
	default:
	}
	clk.Advance(20 * time.Second)
	if r := <-done; r.status != 202 {
		t.Fatalf("delayed register = %d %s", r.status, r.body)
	}
}

// TestFaultTokenExpire: the device's connection is closed as at SAS token expiry when the
// rule's time comes on the fault clock, not before; the reason is in the event and the log.
func TestFaultTokenExpire(t *testing.T) {
	e, clk := newFaultEnv(t)
	d := e.createSAS("te1")
	rc := e.connectSAS(d)
	e.addFault(`{"action":"token-expire","deviceId":"te1","delaySecs":90}`)
	waitArmed(t, clk, faultT0.Add(90*time.Second))
	clk.Advance(89 * time.Second)
	rc.pingFirst()
	from := e.ev.mark()
	clk.Advance(time.Second)
	ev := e.ev.waitFrom(t, from, "disconnect", func(ev broker.Event) bool {
		return ev.Kind == broker.EventDisconnected && ev.DeviceID == "te1"
	})
	if ev.Reason != broker.ReasonTokenExpiredByFault || !strings.HasPrefix(ev.Reason, broker.ReasonTokenExpired) {
		t.Fatalf("close reason %q", ev.Reason)
	}
	rc.expectClosed()
	st := e.faultStatus()
	if st.Counters["admin:token-expire/token-expired"] != 1 || len(st.Rules) != 0 {
		t.Fatalf("counters %v rules %+v", st.Counters, st.Rules)
	}
	if last := st.Log[len(st.Log)-1]; last.Action != "token-expired" || last.Reason != ev.Reason || last.DeviceID != "te1" || !last.Time.Equal(faultT0.Add(90*time.Second)) {
		t.Fatalf("fault log record %+v, want the close reason %q at t0+90s", last, ev.Reason)
	}
	e.connectSAS(d) // a fresh token connects
}

// TestFaultStall: a stalled connection stays open but gets no answer (a PINGREQ waits); a paho
// client's keep-alive detects it; the PINGRESP comes once the stall is cleared.
func TestFaultStall(t *testing.T) {
	e, _ := newFaultEnv(t)
	d := e.createSAS("st1")
	rc := e.connectSAS(d)
	rule := e.addFault(`{"action":"stall","deviceId":"st1","durationSecs":3600}`)
	if rule.Count != 1 {
		t.Fatalf("stalled %d connections", rule.Count)
	}
	rc.send(pingPkt())
	_ = rc.c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if p, err := readPkt(rc.r); err == nil {
		t.Fatalf("stalled connection answered packet type %d", p.typ)
	} else if ne := (net.Error)(nil); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("stalled connection ended: %v", err)
	}

	// A paho client with a 1 s keep-alive detects the stall.
	pd := e.createSAS("st2")
	lost := make(chan error, 1)
	c, code, err := e.pahoWith(pd.DeviceID, e.token(pd), func(o *paho.ClientOptions) {
		o.SetKeepAlive(time.Second).SetPingTimeout(time.Second).SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	})
	if err != nil || code != 0 {
		t.Fatalf("paho: %d %v", code, err)
	}
	defer c.Disconnect(0)
	e.addFault(`{"action":"stall","deviceId":"st2","durationSecs":3600}`)
	select {
	case err := <-lost:
		if err == nil || !strings.Contains(err.Error(), "pingresp not received") {
			t.Fatalf("connection lost with %v, want paho's keep-alive timeout", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("paho's keep-alive did not detect the stall")
	}

	if r := e.do("DELETE", "/hubsim/faults", nil, ""); r.status != 200 {
		t.Fatal(r.status)
	}
	if p := rc.mustRead(); p.typ != 13 {
		t.Fatalf("after the stall: packet %d, want the held PINGRESP", p.typ)
	}
	st := e.faultStatus()
	if st.Counters["admin:stall/stalled 1"] != 2 {
		t.Fatalf("counters %v", st.Counters)
	}
}

// pahoWith connects a paho client as e.paho does, with mod applied to its options.
func (e *env) pahoWith(id, password string, mod func(*paho.ClientOptions)) (paho.Client, byte, error) {
	e.t.Helper()
	o := paho.NewClientOptions().
		AddBroker("ssl://" + e.srv.Endpoints().MQTTAddress).
		SetTLSConfig(e.srv.ClientTLSConfig()).
		SetClientID(id).
		SetUsername(e.host + "/" + id + "/?api-version=2021-04-12").
		SetPassword(password).
		SetProtocolVersion(4).
		SetAutoReconnect(false).
		SetConnectTimeout(waitTimeout)
	mod(o)
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(waitTimeout) {
		e.t.Fatalf("paho connect for %s did not finish", id)
	}
	return c, tok.(*paho.ConnectToken).ReturnCode(), tok.Error()
}

// TestFaultC2DDuplicate: the next cloud-to-device delivery is made twice with the same message
// ID; the one after it once.
func TestFaultC2DDuplicate(t *testing.T) {
	e, _ := newFaultEnv(t)
	d := e.createSAS("cd1")
	rc := e.connectSAS(d)
	rc.subscribe(1, "devices/cd1/messages/devicebound/#")
	e.addFault(`{"action":"c2d-duplicate","deviceId":"cd1"}`)
	if _, err := e.srv.Broker().SendC2D("cd1", broker.C2DMessage{MessageID: "once-twice", Body: []byte("a")}); err != nil {
		t.Fatal(err)
	}
	var pids []uint16
	for range 2 {
		p := parsePublish(t, rc.mustRead())
		if !strings.Contains(p.topic, "%24.mid=once-twice") {
			t.Fatalf("delivery %q", p.topic)
		}
		pids = append(pids, p.pid)
	}
	if pids[0] == pids[1] {
		t.Fatalf("duplicate reused packet ID %d", pids[0])
	}
	for _, id := range pids {
		rc.send(pubackPkt(id))
	}
	if _, err := e.srv.Broker().SendC2D("cd1", broker.C2DMessage{MessageID: "once", Body: []byte("b")}); err != nil {
		t.Fatal(err)
	}
	p := parsePublish(t, rc.mustRead())
	if !strings.Contains(p.topic, "%24.mid=once&") && !strings.HasSuffix(p.topic, "%24.mid=once") {
		t.Fatalf("second message %q", p.topic)
	}
	rc.send(pubackPkt(p.pid))
	rc.pingFirst() // no third copy
	st := e.faultStatus()
	if st.Counters["admin:c2d-duplicate/duplicated"] != 1 || len(st.Rules) != 0 {
		t.Fatalf("counters %v rules %+v", st.Counters, st.Rules)
	}
}
