package hubsim_test

import (
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/wire"
)

func (e *env) paho(id, password string, cert ...tls.Certificate) (paho.Client, byte, error) {
	e.t.Helper()
	tc := e.srv.ClientTLSConfig()
	tc.Certificates = cert
	o := paho.NewClientOptions().
		AddBroker("ssl://" + e.srv.Endpoints().MQTTAddress).
		SetTLSConfig(tc).
		SetClientID(id).
		SetUsername(e.host + "/" + id + "/?api-version=2021-04-12&DeviceClientType=hubsim-test").
		SetPassword(password).
		SetCleanSession(false).
		SetProtocolVersion(4).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetKeepAlive(60 * time.Second).
		SetConnectTimeout(waitTimeout)
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(waitTimeout) {
		e.t.Fatalf("paho connect for %s did not finish", id)
	}
	ct := tok.(*paho.ConnectToken)
	if tok.Error() == nil {
		e.t.Cleanup(func() { c.Disconnect(0) })
	}
	return c, ct.ReturnCode(), tok.Error()
}

func TestSASConnectPrimaryAndSecondaryKey(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-sas")
	for _, key := range []string{d.Authentication.SymmetricKey.PrimaryKey, d.Authentication.SymmetricKey.SecondaryKey} {
		mark := e.ev.mark()
		c, code, err := e.paho(d.DeviceID, deviceToken(t, e.host, d.DeviceID, key, time.Now().Add(time.Hour)))
		if err != nil || code != 0 {
			t.Fatalf("connect: code %d, %v", code, err)
		}
		e.ev.waitFrom(t, mark, "connected", func(ev broker.Event) bool { return ev.Kind == broker.EventConnected })
		got, _ := e.srv.Registry().Get(d.DeviceID)
		if got.ConnectionState != registry.Connected || got.LastActivityTime.IsZero() || got.ConnectionStateUpdatedTime.IsZero() {
			t.Fatalf("after connect: %+v", got)
		}
		c.Disconnect(0)
		e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool { return ev.Kind == broker.EventDisconnected })
		got, _ = e.srv.Registry().Get(d.DeviceID)
		if got.ConnectionState != registry.Disconnected {
			t.Fatalf("after disconnect: %s", got.ConnectionState)
		}
	}
}

func TestUsernameForms(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-user")
	tok := e.token(d)
	for _, u := range []string{
		"localhost/dev-user/?api-version=2021-04-12",
		"LOCALHOST:8883/dev-user/?api-version=2020-09-30&DeviceClientType=x%2F1&unknown=1",
		"localhost/dev-user/api-version=2016-11-14",
		"localhost/dev-user/",
	} {
		rc := e.dial()
		if code := rc.connect("dev-user", u, tok); code != 0 {
			t.Errorf("user name %q: CONNACK %d", u, code)
		}
		_ = rc.c.Close()
	}
	for _, u := range []string{
		"otherhub/dev-user/?api-version=2021-04-12",
		"localhost/other/?api-version=2021-04-12",
		"localhost/dev-user",
		"localhost",
	} {
		rc := e.dial()
		if code := rc.connect("dev-user", u, tok); code != 5 {
			t.Errorf("user name %q: CONNACK %d, want 5", u, code)
		}
	}
}

func TestSASRefusals(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-refuse")
	other := e.createSAS("dev-other")
	disabled, err := e.srv.Registry().Create(registry.Device{DeviceID: "dev-disabled", Status: registry.StatusDisabled})
	if err != nil {
		t.Fatal(err)
	}
	wrongKey := registry.GenerateKey()
	user := func(id string) string { return e.host + "/" + id + "/?api-version=2021-04-12" }
	cases := []struct {
		name, client, user, password, reason string
	}{
		{"wrong key", d.DeviceID, user(d.DeviceID), deviceToken(t, e.host, d.DeviceID, wrongKey, time.Now().Add(time.Hour)), "signature"},
		{"expired", d.DeviceID, user(d.DeviceID), deviceToken(t, e.host, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey, time.Now().Add(-time.Minute)), "expired"},
		{"other device's token", d.DeviceID, user(d.DeviceID), e.token(other), "does not cover"},
		{"not a token", d.DeviceID, user(d.DeviceID), "hunter2", "not a SAS token"},
		{"disabled", disabled.DeviceID, user(disabled.DeviceID), e.token(disabled), "disabled"},
		{"unknown device", "ghost", user("ghost"), e.token(registry.Device{DeviceID: "ghost", Authentication: d.Authentication}), "not registered"},
		{"client id differs", "dev-other", user(d.DeviceID), e.token(d), "client identifier"},
		{"no password, no certificate", d.DeviceID, user(d.DeviceID), "", "no password"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mark := e.ev.mark()
			rc := e.dial()
			if code := rc.connect(c.client, c.user, c.password); code != 5 {
				t.Fatalf("CONNACK %d, want 5", code)
			}
			rc.expectClosed()
			ev := e.ev.waitFrom(t, mark, "refused", func(ev broker.Event) bool { return ev.Kind == broker.EventRefused })
			if !strings.Contains(ev.Reason, c.reason) {
				t.Errorf("reason %q does not mention %q", ev.Reason, c.reason)
			}
			if strings.Contains(ev.Reason, "sig=") || strings.Contains(ev.Reason, d.Authentication.SymmetricKey.PrimaryKey) {
				t.Errorf("reason leaks a secret: %q", ev.Reason)
			}
		})
	}
	// paho sees the refusal as return code 5 too.
	_, code, err := e.paho(d.DeviceID, deviceToken(t, e.host, d.DeviceID, wrongKey, time.Now().Add(time.Hour)))
	if err == nil || code != 5 {
		t.Fatalf("paho: code %d err %v, want 5", code, err)
	}
}

func TestPolicyTokenConnects(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-policy")
	for _, policy := range []string{"device", "iothubowner"} {
		p, _ := e.srv.Registry().Policy(policy)
		tok := deviceTokenWithPolicy(t, e.host, d.DeviceID, p)
		rc := e.dial()
		if code := rc.connect(d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", tok); code != 0 {
			t.Fatalf("%s policy token: CONNACK %d", policy, code)
		}
		_ = rc.c.Close()
	}
	p, _ := e.srv.Registry().Policy("service")
	rc := e.dial()
	if code := rc.connect(d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", deviceTokenWithPolicy(t, e.host, d.DeviceID, p)); code != 5 {
		t.Fatalf("service policy (no DeviceConnect): CONNACK %d, want 5", code)
	}
}

func TestTokenExpiryClosesConnection(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-expiring")
	mark := e.ev.mark()
	rc := e.dial()
	tok := deviceToken(t, e.host, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey, time.Now().Add(2*time.Second))
	if code := rc.connect(d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", tok); code != 0 {
		t.Fatalf("CONNACK %d", code)
	}
	rc.expectClosed()
	ev := e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool { return ev.Kind == broker.EventDisconnected })
	if ev.Reason != broker.ReasonTokenExpired {
		t.Fatalf("closed for %q, want %q", ev.Reason, broker.ReasonTokenExpired)
	}
	if got, _ := e.srv.Registry().Get(d.DeviceID); got.ConnectionState != registry.Disconnected {
		t.Fatalf("state %s", got.ConnectionState)
	}
}

func TestX509Thumbprint(t *testing.T) {
	e := newEnv(t)
	cert, err := pki.SelfSigned(pki.LeafOptions{CommonName: "dev-x509", Client: true})
	if err != nil {
		t.Fatal(err)
	}
	other, _ := pki.SelfSigned(pki.LeafOptions{CommonName: "dev-x509", Client: true})
	for _, tp := range []struct{ name, primary, secondary string }{
		{"sha1 primary", strings.ToLower(pki.ThumbprintSHA1(cert.Leaf)), ""},
		{"sha256 secondary", pki.ThumbprintSHA1(other.Leaf), pki.ThumbprintSHA256(cert.Leaf)},
	} {
		t.Run(tp.name, func(t *testing.T) {
			id := "dev-x509-" + strings.ReplaceAll(tp.name, " ", "-")
			_, err := e.srv.Registry().Create(registry.Device{DeviceID: id, Authentication: registry.Authentication{
				Type: registry.AuthSelfSigned, X509Thumbprint: registry.X509Thumbprint{PrimaryThumbprint: tp.primary, SecondaryThumbprint: tp.secondary}}})
			if err != nil {
				t.Fatal(err)
			}
			rc := e.dial(cert)
			if code := rc.connect(id, e.host+"/"+id+"/?api-version=2021-04-12", ""); code != 0 {
				t.Fatalf("CONNACK %d", code)
			}
			rc2 := e.dial(other)
			if tp.secondary == "" {
				if code := rc2.connect(id, e.host+"/"+id+"/?api-version=2021-04-12", ""); code != 5 {
					t.Fatalf("unregistered certificate: CONNACK %d, want 5", code)
				}
			}
			_ = rc.c.Close()
			_ = rc2.c.Close()
		})
	}
	// A SAS device cannot use a certificate.
	d := e.createSAS("dev-sas-with-cert")
	rc := e.dial(cert)
	if code := rc.connect(d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", ""); code != 5 {
		t.Fatalf("SAS device with a certificate: CONNACK %d, want 5", code)
	}
	// paho with a client certificate.
	id := "dev-x509-paho"
	if _, err := e.srv.Registry().Create(registry.Device{DeviceID: id, Authentication: registry.Authentication{
		X509Thumbprint: registry.X509Thumbprint{PrimaryThumbprint: pki.ThumbprintSHA256(cert.Leaf)}}}); err != nil {
		t.Fatal(err)
	}
	if _, code, err := e.paho(id, "", cert); err != nil || code != 0 {
		t.Fatalf("paho x509: %d %v", code, err)
	}
}

func TestX509CertificateAuthority(t *testing.T) {
	e := newEnv(t)
	ca, err := pki.NewCA("device CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(map[string]string{"name": "test-ca", "certificate": string(ca.CertPEM())})
	if r := e.do("POST", "/hubsim/certificates", body, ""); r.status != 200 {
		t.Fatalf("register CA: %d %s", r.status, r.body)
	}
	r := e.do("GET", "/hubsim/certificates", nil, "")
	var list struct{ Certificates []registry.CACertificate }
	r.json(t, &list)
	if len(list.Certificates) != 1 || list.Certificates[0].Name != "test-ca" || list.Certificates[0].Thumbprint != pki.ThumbprintSHA256(ca.Cert) {
		t.Fatalf("certificates: %s", r.body)
	}
	id := "dev-ca"
	if _, err := e.srv.Registry().Create(registry.Device{DeviceID: id, Authentication: registry.Authentication{Type: registry.AuthCertificateAuthority}}); err != nil {
		t.Fatal(err)
	}
	good, _ := ca.Issue(pki.LeafOptions{CommonName: id, Client: true})
	wrongCN, _ := ca.Issue(pki.LeafOptions{CommonName: "someone-else", Client: true})
	otherCA, _ := pki.NewCA("other CA", time.Hour)
	foreign, _ := otherCA.Issue(pki.LeafOptions{CommonName: id, Client: true})
	user := e.host + "/" + id + "/?api-version=2021-04-12"

	rc := e.dial(good)
	if code := rc.connect(id, user, ""); code != 0 {
		t.Fatalf("CA-signed: CONNACK %d", code)
	}
	_ = rc.c.Close()
	for name, cert := range map[string]tls.Certificate{"CN mismatch": wrongCN, "unregistered CA": foreign} {
		mark := e.ev.mark()
		rc := e.dial(cert)
		if code := rc.connect(id, user, ""); code != 5 {
			t.Fatalf("%s: CONNACK %d, want 5", name, code)
		}
		ev := e.ev.waitFrom(t, mark, "refused", func(ev broker.Event) bool { return ev.Kind == broker.EventRefused })
		t.Logf("%s: %s", name, ev.Reason)
	}
	// A PEM body with ?name= works too, and replaces by name.
	if r := e.do("POST", "/hubsim/certificates?name=test-ca", otherCA.CertPEM(), ""); r.status != 200 {
		t.Fatalf("register PEM: %d %s", r.status, r.body)
	}
	rc = e.dial(foreign)
	if code := rc.connect(id, user, ""); code != 0 {
		t.Fatalf("after replacing the CA: CONNACK %d", code)
	}
	if r := e.do("POST", "/hubsim/certificates", []byte("not a certificate"), ""); r.status != 400 {
		t.Fatalf("bad certificate: %d", r.status)
	}
}

// What the screen refuses, and why, is mqttpkt.ConnectCases, sent byte for byte by
// TestConnectCasesOnTheDeviceEndpoint; here, the refusals that need a live client.
func TestMQTT5AndGarbageAreRejected(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-after")
	user := e.host + "/" + d.DeviceID + "/?api-version=2021-04-12"
	v5 := connectPkt(5, d.DeviceID, user, e.token(d), false)
	// A v5 client whose connection stays open still gets CONNACK 1 and a close.
	rc := e.dial()
	rc.send(v5)
	if p := rc.mustRead(); p.typ != 2 || !bytes.Equal(p.body, []byte{0, 1}) {
		t.Fatalf("want CONNACK 1, got %+v", p)
	}
	rc.expectClosed()
	// The server still serves a normal client.
	_ = e.connectSAS(d)
}

func TestProtocolViolationsClose(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-rules")
	other := e.createSAS("dev-victim")
	cases := map[string]struct {
		act    func(rc *rawConn)
		reason string
	}{
		"qos 2 publish": {func(rc *rawConn) { rc.send(publishPkt("devices/dev-rules/messages/events/", []byte("x"), 2, 1, false)) }, broker.ReasonQoS2Publish},
		"other device telemetry": {func(rc *rawConn) {
			rc.send(publishPkt("devices/dev-victim/messages/events/", []byte("x"), 1, 1, false))
		}, broker.ReasonOtherDeviceTelemetry},
		"unknown topic": {func(rc *rawConn) { rc.send(publishPkt("hello/world", []byte("x"), 0, 0, false)) }, broker.ReasonNotDeviceTopic},
		"hub-to-device topic": {func(rc *rawConn) {
			rc.send(publishPkt("devices/dev-rules/messages/devicebound/", []byte("x"), 0, 0, false))
		}, broker.ReasonNotDeviceTopic},
		"wildcard topic": {func(rc *rawConn) {
			rc.send(publishPkt("devices/dev-rules/messages/events/a=+", []byte("x"), 0, 0, false))
		}, broker.ReasonWildcardTopic},
		"subscribe #":            {func(rc *rawConn) { rc.send(subscribePkt(1, "#")) }, broker.ReasonUndocumentedFilter},
		"subscribe other device": {func(rc *rawConn) { rc.send(subscribePkt(1, wire.C2DFilter(other.DeviceID))) }, broker.ReasonOtherDeviceFilter},
		"subscribe twin res +":   {func(rc *rawConn) { rc.send(subscribePkt(1, "$iothub/twin/res/+")) }, broker.ReasonUndocumentedFilter},
		"module filter on a device connection": {func(rc *rawConn) {
			rc.subscribe(1, wire.C2DFilter("dev-rules"), wire.TwinResponseFilter, wire.TwinDesiredFilter)
			rc.send(subscribePkt(2, wire.MethodsFilter, "devices/dev-rules/modules/m/#"))
		}, broker.ReasonOtherDeviceFilter},
		"oversize telemetry": {func(rc *rawConn) {
			// 256 KB + 1 counting the property name and value.
			rc.send(publishPkt("devices/dev-rules/messages/events/k=v", make([]byte, 256*1024-1), 1, 1, false))
		}, broker.ReasonTelemetryTooLarge},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			mark := e.ev.mark()
			rc := e.connectSAS(d)
			c.act(rc)
			rc.expectClosed()
			ev := e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool { return ev.Kind == broker.EventDisconnected })
			if ev.Reason != c.reason {
				t.Fatalf("closed for %q, want %q", ev.Reason, c.reason)
			}
		})
	}
	// Exactly 256 KB is accepted; five subscriptions are fine.
	rc := e.connectSAS(d)
	codes := rc.subscribe(1, wire.C2DFilter("dev-rules"), wire.TwinResponseFilter, wire.TwinDesiredFilter, wire.MethodsFilter)
	if !bytes.Equal(codes, []byte{1, 1, 1, 1}) { // QoS 1 granted to each of the four filters
		t.Fatalf("SUBACK codes %v", codes)
	}
	rc.send(publishPkt("devices/dev-rules/messages/events/k=v", make([]byte, 256*1024-2), 1, 7, false))
	if p := rc.mustRead(); p.typ != 4 || binary.BigEndian.Uint16(p.body) != 7 {
		t.Fatalf("want PUBACK 7, got %+v", p)
	}
}

func TestTelemetryRecorded(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-tel")
	rc := e.dial()
	user := e.host + "/" + d.DeviceID + "/?api-version=2021-04-12&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1"
	if code := rc.connect(d.DeviceID, user, e.token(d)); code != 0 {
		t.Fatalf("CONNACK %d", code)
	}
	props := wire.Properties{
		{Key: wire.PropMessageID, Value: "m-1"}, {Key: wire.PropCorrelationID, Value: "c-1"},
		{Key: wire.PropContentType, Value: "application/json"}, {Key: wire.PropContentEncoding, Value: "utf-8"},
		{Key: "zeta", Value: "last?"}, {Key: "alpha", Value: "a b&c"}, {Key: "nullprop", Null: true}, {Key: "empty", Value: ""},
	}
	rc.send(publishPkt(wire.Telemetry(d.DeviceID, props), []byte(`{"t":21.5}`), 1, 42, false))
	if p := rc.mustRead(); p.typ != 4 || binary.BigEndian.Uint16(p.body) != 42 {
		t.Fatalf("want PUBACK 42, got %+v", p)
	}
	rc.send(publishPkt(wire.Telemetry(d.DeviceID, nil), []byte("retained"), 0, 0, true))
	rc.send(publishPkt(wire.TwinGet("sync"), nil, 1, 43, false))
	if p := rc.mustRead(); p.typ != 4 { // the twin GET's PUBACK orders after the QoS 0 publish
		t.Fatalf("want PUBACK, got %+v", p)
	}

	r := e.do("GET", "/hubsim/devices/dev-tel/messages/events", nil, "")
	if r.status != 200 || r.header.Get("Content-Type") != "application/json; charset=utf-8" {
		t.Fatalf("%d %s", r.status, r.header.Get("Content-Type"))
	}
	if !bytes.Contains(r.body, []byte(`"properties":{"zeta":"last?","alpha":"a b\u0026c","nullprop":null,"empty":""}`)) {
		t.Errorf("properties not in wire order with null: %s", r.body)
	}
	var got struct {
		Messages []struct {
			Body             string
			Properties       map[string]*string
			SystemProperties map[string]string
		}
	}
	r.json(t, &got)
	if len(got.Messages) != 2 {
		t.Fatalf("%d messages: %s", len(got.Messages), r.body)
	}
	m := got.Messages[0]
	if b, _ := base64.StdEncoding.DecodeString(m.Body); string(b) != `{"t":21.5}` {
		t.Errorf("body %q", b)
	}
	want := map[string]string{
		"message-id": "m-1", "correlation-id": "c-1", "content-type": "application/json", "content-encoding": "utf-8",
		"iothub-connection-device-id":          d.DeviceID,
		"iothub-connection-auth-method":        `{"scope":"device","type":"sas","issuer":"iothub"}`,
		"iothub-connection-auth-generation-id": d.GenerationID,
		"dt-dataschema":                        "dtmi:com:example:Thermostat;1",
	}
	for k, v := range want {
		if m.SystemProperties[k] != v {
			t.Errorf("system property %s = %q, want %q", k, m.SystemProperties[k], v)
		}
	}
	if _, err := time.Parse(broker.EnqueuedTimeFormat, m.SystemProperties["iothub-enqueuedtime"]); err != nil {
		t.Errorf("iothub-enqueuedtime %q: %v", m.SystemProperties["iothub-enqueuedtime"], err)
	}
	if v := got.Messages[1].Properties["mqtt-retain"]; v == nil || *v != "true" {
		t.Errorf("retained message lacks mqtt-retain: %v", got.Messages[1].Properties)
	}
	if r := e.do("GET", "/hubsim/devices/nobody/messages/events", nil, ""); r.status != 404 || r.errorCode(t) != "DeviceNotFound" {
		t.Fatalf("unknown device: %d %s", r.status, r.body)
	}
}

func TestCloudToDevice(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-c2d")
	send := func(body string) response {
		return e.do("POST", "/hubsim/devices/dev-c2d/messages/devicebound", []byte(body), "")
	}
	// Queued while offline.
	for i := range 2 {
		r := send(fmt.Sprintf(`{"body":"offline-%d","messageId":"off-%d"}`, i, i))
		if r.status != 202 {
			t.Fatalf("send: %d %s", r.status, r.body)
		}
	}
	if got, _ := e.srv.Registry().Get(d.DeviceID); got.CloudToDeviceMessageCount != 2 {
		t.Fatalf("cloudToDeviceMessageCount %d", got.CloudToDeviceMessageCount)
	}
	rc := e.connectSAS(d)
	rc.subscribe(1, wire.C2DFilter(d.DeviceID))
	for i := range 2 {
		pub := parsePublish(t, rc.mustRead())
		if string(pub.payload) != fmt.Sprintf("offline-%d", i) || pub.qos != 1 {
			t.Fatalf("message %d: %+v", i, pub)
		}
		mark := e.ev.mark()
		rc.send(pubackPkt(pub.pid))
		e.ev.waitFrom(t, mark, "c2d completed", func(ev broker.Event) bool { return ev.Kind == broker.EventC2DCompleted })
	}
	if n := e.srv.Broker().PendingC2D(d.DeviceID); n != 0 {
		t.Fatalf("%d pending after PUBACKs", n)
	}
	// Delivered at once, with properties.
	r := send(`{"body":"hello","messageId":"mid 1","correlationId":"cid-1","contentType":"application/json","contentEncoding":"utf-8","properties":{"b":"2","a":"1","n":null}}`)
	if r.status != 202 {
		t.Fatalf("send: %d %s", r.status, r.body)
	}
	pub := parsePublish(t, rc.mustRead())
	wantTopic := "devices/dev-c2d/messages/devicebound/%24.mid=mid%201&%24.to=%2Fdevices%2Fdev-c2d%2Fmessages%2FdeviceBound&%24.cid=cid-1&%24.ct=application%2Fjson&%24.ce=utf-8&b=2&a=1&n"
	if pub.topic != wantTopic || string(pub.payload) != "hello" {
		t.Fatalf("got topic %q payload %q\nwant %q", pub.topic, pub.payload, wantTopic)
	}
	rc.send(pubackPkt(pub.pid))
	// Not acknowledged: redelivered on the next connection.
	r = send(`{"body":"unacked"}`)
	var sent struct{ MessageID string }
	r.json(t, &sent)
	if pub := parsePublish(t, rc.mustRead()); string(pub.payload) != "unacked" {
		t.Fatalf("got %q", pub.payload)
	}
	mark := e.ev.mark()
	_ = rc.c.Close()
	e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool { return ev.Kind == broker.EventDisconnected })
	rc = e.connectSAS(d) // clean session = false: the subscription persists
	pub = parsePublish(t, rc.mustRead())
	if string(pub.payload) != "unacked" || !strings.Contains(pub.topic, "%24.mid="+sent.MessageID) {
		t.Fatalf("redelivery: %+v", pub)
	}
	rc.send(pubackPkt(pub.pid))
	mark = e.ev.mark()
	_ = rc.c.Close()
	e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool { return ev.Kind == broker.EventDisconnected })

	// Queue depth: 50, then 403.
	for i := range 50 {
		if r := send(fmt.Sprintf(`{"body":"%d"}`, i)); r.status != 202 {
			t.Fatalf("message %d: %d %s", i, r.status, r.body)
		}
	}
	r = send(`{"body":"51st"}`)
	if r.status != 403 || r.errorCode(t) != "DeviceMaximumQueueDepthExceeded" {
		t.Fatalf("51st: %d %s", r.status, r.body)
	}
	if r := e.do("POST", "/hubsim/devices/nobody/messages/devicebound", []byte(`{"body":"x"}`), ""); r.status != 404 {
		t.Fatalf("unknown device: %d", r.status)
	}
	if r := send(`{"bodyBase64":"` + base64.StdEncoding.EncodeToString(make([]byte, 64*1024+1)) + `"}`); r.status != 413 {
		t.Fatalf("oversize: %d %s", r.status, r.body)
	}
	if r := send(`{"body":"x","properties":{"bad key":"v"}}`); r.status != 400 {
		t.Fatalf("bad property: %d %s", r.status, r.body)
	}
}

func TestSecondConnectionClosesFirst(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-twice")
	a := e.connectSAS(d)
	a.subscribe(1, wire.C2DFilter(d.DeviceID))
	mark := e.ev.mark()
	b := e.connectSAS(d)
	if p, err := a.read(); err == nil {
		t.Fatalf("the old connection got packet type %d instead of a close", p.typ)
	}
	a.expectClosed()
	ev := e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool { return ev.Kind == broker.EventDisconnected })
	if ev.Current || !strings.Contains(ev.Reason, "taken over") {
		t.Fatalf("old connection's end: %+v", ev)
	}
	if got, _ := e.srv.Registry().Get(d.DeviceID); got.ConnectionState != registry.Connected {
		t.Fatalf("state %s after the old connection ended", got.ConnectionState)
	}
	// The new connection inherited the subscription (clean session 0) and gets C2D.
	if r := e.do("POST", "/hubsim/devices/dev-twice/messages/devicebound", []byte(`{"body":"to-b"}`), ""); r.status != 202 {
		t.Fatal(r.status)
	}
	if pub := parsePublish(t, b.mustRead()); string(pub.payload) != "to-b" {
		t.Fatalf("got %q", pub.payload)
	}
	var conns struct{ Connections []broker.ConnectionInfo }
	e.do("GET", "/hubsim/connections", nil, "").json(t, &conns)
	if len(conns.Connections) != 1 || !slices.Equal(conns.Connections[0].Subscriptions, []string{wire.C2DFilter(d.DeviceID)}) ||
		conns.Connections[0].AuthType != "sas" || conns.Connections[0].ClientID != d.DeviceID {
		t.Fatalf("connections: %+v", conns)
	}
}

func TestTwinResponsesGoOnlyToTheirDevice(t *testing.T) {
	e := newEnv(t)
	const n = 25
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for _, id := range []string{"twin-a", "twin-b"} {
		d := e.createSAS(id)
		c, code, err := e.paho(id, e.token(d))
		if err != nil || code != 0 {
			t.Fatalf("connect %s: %d %v", id, code, err)
		}
		got := make(chan string, 2*n)
		if tok := c.Subscribe(wire.TwinResponseFilter, 0, func(_ paho.Client, m paho.Message) {
			tp, err := wire.Parse(m.Topic())
			if err != nil || tp.Status != 200 || string(m.Payload()) != `{"desired":{"$version":1},"reported":{"$version":1}}` {
				got <- "bad:" + m.Topic()
				return
			}
			got <- tp.RequestID
		}); !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
			t.Fatalf("subscribe: %v", tok.Error())
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range n {
				c.Publish(wire.TwinGet(fmt.Sprintf("%s-%d", id, i)), 0, false, "")
			}
			seen := map[string]bool{}
			timer := time.NewTimer(waitTimeout)
			defer timer.Stop()
			for len(seen) < n {
				select {
				case rid := <-got:
					if !strings.HasPrefix(rid, id+"-") || seen[rid] {
						errs <- fmt.Errorf("%s received %q", id, rid)
						return
					}
					seen[rid] = true
				case <-timer.C:
					errs <- fmt.Errorf("%s got %d of %d responses", id, len(seen), n)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// A reported PATCH is answered 204 with the new reported version, on the same connection.
	d := e.createSAS("twin-c")
	rc := e.connectSAS(d)
	rc.subscribe(1, wire.TwinResponseFilter)
	rc.send(publishPkt(wire.TwinPatchReported("p1"), []byte(`{"a":1}`), 0, 0, false))
	pub := parsePublish(t, rc.mustRead())
	if pub.topic != "$iothub/twin/res/204/?$rid=p1&$version=2" || len(pub.payload) != 0 {
		t.Fatalf("PATCH response %q %q", pub.topic, pub.payload)
	}
}

func TestDeletingOrDisablingDropsConnection(t *testing.T) {
	e := newEnv(t)
	closedFor := func(mark int, id, want string) {
		t.Helper()
		ev := e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool {
			return ev.Kind == broker.EventDisconnected && ev.DeviceID == id
		})
		if ev.Reason != want {
			t.Fatalf("%s closed for %q, want %q", id, ev.Reason, want)
		}
	}
	d := e.createSAS("dev-drop")
	rc := e.connectSAS(d)
	mark := e.ev.mark()
	d.Status = registry.StatusDisabled
	if _, err := e.srv.Registry().Update(d, "*"); err != nil {
		t.Fatal(err)
	}
	rc.expectClosed()
	closedFor(mark, "dev-drop", broker.ReasonDeviceDisabled)
	d2 := e.createSAS("dev-delete")
	rc = e.connectSAS(d2)
	mark = e.ev.mark()
	if r := e.do("DELETE", "/devices/dev-delete", nil, "", "If-Match", `"*"`); r.status != 204 {
		t.Fatalf("delete: %d", r.status)
	}
	rc.expectClosed()
	closedFor(mark, "dev-delete", broker.ReasonDeviceDeleted)
}

func TestIPv4DialWithHostName(t *testing.T) {
	// The server certificate covers localhost, 127.0.0.1 and ::1.
	e := newEnv(t)
	for _, name := range []string{"localhost", "127.0.0.1"} {
		cfg := e.srv.ClientTLSConfig()
		cfg.ServerName = name
		c, err := tls.Dial("tcp", e.srv.Endpoints().MQTTAddress, cfg)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		_ = c.Close()
	}
	if _, err := net.ResolveTCPAddr("tcp", e.srv.Endpoints().MQTTAddress); err != nil {
		t.Fatal(err)
	}
}
