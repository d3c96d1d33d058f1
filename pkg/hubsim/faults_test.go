package hubsim_test

import (
	"errors"
	"syscall"
	"testing"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/faults"
)

func faultTopic(id, props string) string { return "devices/" + id + "/messages/events/" + props }

// TestFaultKillTcp: a telemetry message with AzIoTHub_FaultOperationType=KillTcp is PUBACKed,
// recorded, and then the device's TCP connection is reset (no TLS close_notify); the fault
// log under GET /hubsim/faults shows it.
func TestFaultKillTcp(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("fk1")
	rc := e.connectSAS(d)
	from := e.ev.mark()
	rc.send(publishPkt(faultTopic(d.DeviceID, "AzIoTHub_FaultOperationType=KillTcp&AzIoTHub_FaultOperationCloseReason=boom&AzIoTHub_FaultOperationDelayInSecs=0"), nil, 1, 7, false))
	p := rc.mustRead()
	if p.typ != 4 {
		t.Fatalf("expected the PUBACK of the fault message first, got packet type %d", p.typ)
	}
	e.ev.waitFrom(t, from, "disconnect", func(ev broker.Event) bool {
		return ev.Kind == broker.EventDisconnected && ev.DeviceID == d.DeviceID
	})
	_, err := rc.read()
	if err == nil {
		t.Fatal("connection still delivers packets after KillTcp")
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("KillTcp ended the connection with %v, want a TCP reset (ECONNRESET)", err)
	}
	var st faults.Status
	e.do("GET", "/hubsim/faults", nil, "").json(t, &st)
	if len(st.Log) != 1 || st.Log[0].Type != "KillTcp" || st.Log[0].Action != "tcp-reset" || st.Log[0].DeviceID != d.DeviceID || st.Log[0].Reason != "boom" {
		t.Fatalf("fault log = %+v", st.Log)
	}
	if st.Counters["KillTcp/requested"] != 1 || st.Counters["KillTcp/tcp-reset"] != 1 {
		t.Fatalf("counters = %v", st.Counters)
	}
	// The fault message is still telemetry (tests filter it by message id).
	msgs, err := e.srv.Broker().Telemetry(d.DeviceID)
	if err != nil || len(msgs) != 1 {
		t.Fatalf("recorded telemetry = %d, %v; want the fault message", len(msgs), err)
	}
	// The device reconnects at once: Kill* opens no window.
	e.connectSAS(d)
}

// TestFaultInvokeAuthError: the connection is closed after the delay and CONNECTs are refused
// with CONNACK 5 while the duration lasts.
func TestFaultInvokeAuthError(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("fa1")
	rc := e.connectSAS(d)
	rc.send(publishPkt(faultTopic(d.DeviceID, "AzIoTHub_FaultOperationType=InvokeAuthError&AzIoTHub_FaultOperationDelayInSecs=0&AzIoTHub_FaultOperationDurationInSecs=600"), nil, 1, 3, false))
	rc.expectClosed()
	rc2 := e.dial()
	if code := rc2.connect(d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", e.token(d)); code != 5 {
		t.Fatalf("CONNACK %d during an InvokeAuthError window, want 5", code)
	}
	other := e.createSAS("fa2")
	e.connectSAS(other) // the window is the faulted device's only
	var st faults.Status
	e.do("GET", "/hubsim/faults", nil, "").json(t, &st)
	if len(st.Active) != 1 || st.Active[0].DeviceID != d.DeviceID || st.Active[0].Kind != "auth" {
		t.Fatalf("active = %+v", st.Active)
	}
	if st.Counters["InvokeAuthError/closed"] != 1 || st.Counters["InvokeAuthError/connect-refused"] != 1 {
		t.Fatalf("counters = %v", st.Counters)
	}
}

// TestFaultMalformedIgnored: an unknown fault type or a bad delay is logged, counted and
// otherwise ignored; the connection stays up.
func TestFaultMalformedIgnored(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("fm1")
	rc := e.connectSAS(d)
	rc.send(publishPkt(faultTopic(d.DeviceID, "AzIoTHub_FaultOperationType=Explode"), nil, 1, 1, false))
	rc.send(publishPkt(faultTopic(d.DeviceID, "AzIoTHub_FaultOperationType=KillTcp&AzIoTHub_FaultOperationDelayInSecs=soon"), nil, 1, 2, false))
	for i := 0; i < 2; i++ {
		if p := rc.mustRead(); p.typ != 4 {
			t.Fatalf("expected PUBACK, got %d", p.typ)
		}
	}
	rc.send(pingPkt())
	if p := rc.mustRead(); p.typ != 13 {
		t.Fatalf("connection not alive after malformed faults: packet %d", p.typ)
	}
	var st faults.Status
	e.do("GET", "/hubsim/faults", nil, "").json(t, &st)
	if len(st.Log) != 2 || st.Log[0].Type != "Explode" {
		t.Fatalf("log = %+v", st.Log)
	}
	if r := e.do("PUT", "/hubsim/faults", nil, ""); r.status != 405 {
		t.Fatalf("PUT /hubsim/faults = %d, want 405", r.status)
	}
	if r := e.do("GET", "/hubsim/faults", nil, "none"); r.status != 401 {
		t.Fatalf("GET /hubsim/faults without a token = %d, want 401", r.status)
	}
}

func pingPkt() []byte { return []byte{0xc0, 0} }

// TestFaultAdminRefuseAndDrop: POST /hubsim/faults refuses one device's CONNECTs with the
// requested return code, drops every connection, lists the rule, and DELETE clears it.
func TestFaultAdminRefuseAndDrop(t *testing.T) {
	e := newEnv(t)
	d1, d2 := e.createSAS("adm1"), e.createSAS("adm2")
	rc1 := e.connectSAS(d1)
	rc2 := e.connectSAS(d2)
	if r := e.do("POST", "/hubsim/faults", []byte(`{"action":"drop"}`), ""); r.status != 200 {
		t.Fatalf("drop: %d %s", r.status, r.body)
	}
	rc1.expectClosed()
	rc2.expectClosed()
	r := e.do("POST", "/hubsim/faults", []byte(`{"action":"refuse-connect","deviceId":"adm1","code":3,"durationSecs":600,"seed":7}`), "")
	if r.status != 200 {
		t.Fatalf("refuse-connect: %d %s", r.status, r.body)
	}
	c := e.dial()
	if code := c.connect(d1.DeviceID, e.host+"/"+d1.DeviceID+"/?api-version=2021-04-12", e.token(d1)); code != 3 {
		t.Fatalf("CONNACK %d under a refuse-connect rule, want 3", code)
	}
	e.connectSAS(d2) // the rule names adm1 only
	var st faults.Status
	e.do("GET", "/hubsim/faults", nil, "").json(t, &st)
	if len(st.Rules) != 1 || st.Rules[0].DeviceID != "adm1" || st.Rules[0].Code != 3 || st.Rules[0].Seed != 7 {
		t.Fatalf("rules = %+v", st.Rules)
	}
	if st.Counters["admin:drop/dropped 2"] != 1 || st.Counters["admin:refuse-connect/connect-refused 3"] != 1 {
		t.Fatalf("counters = %v", st.Counters)
	}
	for _, bad := range []string{`{"action":"explode"}`, `{"action":"refuse-connect","durationSecs":5,"code":9}`, `{"action":"refuse-connect"}`, `{"action":"drop","extra":1}`, `not json`} {
		if r := e.do("POST", "/hubsim/faults", []byte(bad), ""); r.status != 400 {
			t.Fatalf("POST %s = %d, want 400", bad, r.status)
		}
	}
	if r := e.do("DELETE", "/hubsim/faults", nil, ""); r.status != 200 {
		t.Fatalf("DELETE: %d", r.status)
	}
	e.connectSAS(d1)
}
