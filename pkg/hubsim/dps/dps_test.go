package dps

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/mqttpkt"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const testGroupKey = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="

type testClock struct{ t time.Time }

func (c *testClock) now() time.Time { return c.t }

func newServer(t testing.TB, mod func(*Config)) (*Server, *registry.Registry, *testClock) {
	t.Helper()
	dir := t.TempDir()
	reg, err := registry.Open(filepath.Join(dir, "hub.db"), nil, registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Close() })
	clk := &testClock{t: time.Now()}
	cfg := Config{Path: filepath.Join(dir, "dps.db"), ServiceHostName: "localhost", Hubs: []string{"hub1", "hub2"},
		Registry: reg, Now: clk.now}
	if mod != nil {
		mod(&cfg)
	}
	s, err := Open(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s, reg, clk
}

func deviceToken(t testing.TB, scope, regID, keyB64 string, raw bool) string {
	t.Helper()
	k, err := sas.ParseKey(keyB64)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := sas.Build(context.Background(), k, sas.Params{Resource: sas.DPSResource(scope, regID), KeyName: "registration",
		Expiry: time.Now().Add(time.Hour), RawResource: raw})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func serviceToken(t *testing.T, s *Server) string {
	tok, err := sas.Build(context.Background(), s.policyKey, sas.Params{Resource: "localhost", KeyName: PolicyName,
		Expiry: time.Now().Add(time.Hour), RawResource: true})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func do(t *testing.T, s *Server, method, path, auth, body string, hdr ...string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, path, strings.NewReader(body))
	if auth != "" {
		r.Header.Set("Authorization", auth)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	return w
}

func TestServiceAPI(t *testing.T) {
	s, _, _ := newServer(t, nil)
	tok := serviceToken(t, s)
	if w := do(t, s, "GET", "/enrollments/x?api-version=2021-10-01", "", ""); w.Code != 401 || w.Header().Get("x-ms-error-code") != "401002" {
		t.Fatalf("no auth: %d %s", w.Code, w.Body)
	}
	bad := strings.Replace(tok, "skn="+PolicyName, "skn=other", 1)
	if w := do(t, s, "GET", "/enrollments/x", bad, ""); w.Code != 401 {
		t.Fatalf("other policy: %d", w.Code)
	}
	w := do(t, s, "PUT", "/enrollments/Dev1?api-version=2021-10-01", tok, `{"registrationId":"Dev1","attestation":{"type":"symmetricKey"},"initialTwin":{"tags":{"a":1}}}`)
	if w.Code != 200 || !strings.HasPrefix(w.Header().Get("Content-Type"), "application/json") {
		t.Fatalf("put: %d %s", w.Code, w.Body)
	}
	var e hubapi.Enrollment
	_ = json.Unmarshal(w.Body.Bytes(), &e)
	if e.ETag == "" || e.ProvisioningStatus != "enabled" || len(e.Attestation.SymmetricKey.PrimaryKey) != 88 {
		t.Fatalf("%+v", e)
	}
	// Case-insensitive ids; stale etag 412; raw etag accepted.
	if w := do(t, s, "GET", "/enrollments/dev1", tok, ""); w.Code != 200 {
		t.Fatalf("get: %d", w.Code)
	}
	if w := do(t, s, "PUT", "/enrollments/dev1", tok, `{"registrationId":"dev1","attestation":{"type":"symmetricKey"}}`, "If-Match", "nope"); w.Code != 412 {
		t.Fatalf("stale etag: %d", w.Code)
	}
	if w := do(t, s, "PUT", "/enrollments/dev1", tok, `{"registrationId":"dev1","attestation":{"type":"symmetricKey"}}`, "If-Match", e.ETag); w.Code != 200 {
		t.Fatalf("etag update: %d %s", w.Code, w.Body)
	}
	for _, b := range []string{`{`, `{"registrationId":"dev1"}`, `{"registrationId":"other","attestation":{"type":"symmetricKey"}}`,
		`{"attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"c2hvcnQ="}}}`, `{"attestation":{"type":"magic"}}`} {
		if w := do(t, s, "PUT", "/enrollments/dev1", tok, b); w.Code != 400 {
			t.Fatalf("%s: %d %s", b, w.Code, w.Body)
		}
	}
	// Bulk with the trailing slash, query with paging (no continuation on the last page).
	w = do(t, s, "POST", "/enrollments/?api-version=2021-10-01", tok, `{"mode":"create","enrollments":[{"registrationId":"b1","attestation":{"type":"symmetricKey"}},{"registrationId":"dev1","attestation":{"type":"symmetricKey"}}]}`)
	var br BulkResult
	if json.Unmarshal(w.Body.Bytes(), &br) != nil || br.IsSuccessful || len(br.Errors) != 1 || br.Errors[0].RegistrationID != "dev1" || br.Errors[0].ErrorCode != 409201 {
		t.Fatalf("bulk: %s", w.Body)
	}
	w = do(t, s, "POST", "/enrollments/query", tok, `{"query":"*"}`, "x-ms-max-item-count", "1")
	if c := w.Header().Get("x-ms-continuation"); c != "1" || !strings.Contains(w.Body.String(), `"b1"`) {
		t.Fatalf("page 1: %q %s", c, w.Body)
	}
	w = do(t, s, "POST", "/enrollments/query", tok, `{"query":"*"}`, "x-ms-max-item-count", "1", "x-ms-continuation", "1")
	if _, ok := w.Header()["X-Ms-Continuation"]; ok || !strings.Contains(strings.ToLower(w.Body.String()), `"dev1"`) {
		t.Fatalf("page 2: %v %s", w.Header(), w.Body)
	}
	// Groups: both path spellings.
	if w := do(t, s, "PUT", "/enrollmentGroups/g1", tok, `{"enrollmentGroupId":"g1","attestation":{"type":"symmetricKey"}}`); w.Code != 200 {
		t.Fatalf("group put: %d %s", w.Code, w.Body)
	}
	if w := do(t, s, "POST", "/enrollmentgroups/g1/attestationmechanism", tok, ""); w.Code != 200 || !strings.Contains(w.Body.String(), "primaryKey") {
		t.Fatalf("attestation mechanism: %d %s", w.Code, w.Body)
	}
	if w := do(t, s, "PUT", "/enrollmentGroups/g2", tok, `{"enrollmentGroupId":"g2","attestation":{"type":"tpm"}}`); w.Code != 400 {
		t.Fatalf("tpm group: %d", w.Code)
	}
	if w := do(t, s, "DELETE", "/enrollmentGroups/g1", tok, ""); w.Code != 204 {
		t.Fatalf("delete: %d", w.Code)
	}
	if w := do(t, s, "GET", "/registrations/nobody", tok, ""); w.Code != 404 {
		t.Fatalf("registration state: %d", w.Code)
	}
	// Nothing was lost by the failed requests.
	if n := len(s.ListEnrollments(false)); n != 2 {
		t.Fatalf("%d enrollments", n)
	}
}

func registerHTTP(t *testing.T, s *Server, regID, tok, body string) (int, wire.DPSOperationStatus, *httptest.ResponseRecorder) {
	t.Helper()
	w := do(t, s, "PUT", "/"+s.IDScope()+"/registrations/"+regID+"/register?api-version=2019-03-31", tok, body)
	var op wire.DPSOperationStatus
	_ = json.Unmarshal(w.Body.Bytes(), &op)
	if w.Code != 202 {
		return w.Code, op, w
	}
	w2 := do(t, s, "GET", "/"+s.IDScope()+"/registrations/"+regID+"/operations/"+op.OperationID, tok, "")
	_ = json.Unmarshal(w2.Body.Bytes(), &op)
	return w2.Code, op, w2
}

func TestReprovisionPolicies(t *testing.T) {
	for _, tc := range []struct {
		policy      string
		wantSub     string
		wantHub     string
		twinApplied bool
	}{
		{`{"updateHubAssignment":true,"migrateDeviceData":true}`, wire.SubstatusDeviceDataMigrated, "hub2", false},
		{`{"updateHubAssignment":true,"migrateDeviceData":false}`, wire.SubstatusDeviceDataReset, "hub2", true},
		{`{"updateHubAssignment":false}`, wire.SubstatusInitialAssignment, "hub1", false},
	} {
		s, reg, _ := newServer(t, nil)
		put := func(hub, twin string) {
			e := hubapi.Enrollment{EnrollmentGroupID: "g", AllocationPolicy: "static", IoTHubs: []string{hub}, InitialTwin: json.RawMessage(twin),
				Attestation:       &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: testGroupKey}},
				ReprovisionPolicy: &hubapi.ReprovisionPolicy{}}
			_ = json.Unmarshal([]byte(tc.policy), e.ReprovisionPolicy)
			if _, err := s.PutEnrollment(e, true, ""); err != nil {
				t.Fatal(err)
			}
		}
		put("hub1", `{"properties":{"desired":{"v":1}}}`)
		tok := deviceToken(t, s.IDScope(), "d1", deriveB64(testGroupKey, "d1"), true)
		code, op, _ := registerHTTP(t, s, "d1", tok, `{"registrationId":"d1"}`)
		if code != 200 || op.RegistrationState.AssignedHub != "hub1" || op.RegistrationState.Substatus != wire.SubstatusInitialAssignment {
			t.Fatalf("first: %d %+v", code, op.RegistrationState)
		}
		if _, err := reg.Get("d1"); err != nil {
			t.Fatal(err)
		}
		put("hub2", `{"properties":{"desired":{"v":2}}}`)
		code, op, _ = registerHTTP(t, s, "d1", tok, `{"registrationId":"d1"}`)
		rs := op.RegistrationState
		if code != 200 || rs.AssignedHub != tc.wantHub || rs.Substatus != tc.wantSub {
			t.Fatalf("%s: %d %+v", tc.policy, code, rs)
		}
		tw, _ := s.InitialTwin("d1")
		if got := strings.Contains(string(tw), `"v":2`); got != tc.twinApplied {
			t.Fatalf("%s: twin %s", tc.policy, tw)
		}
	}
}

func TestAllocationHashedSpreads(t *testing.T) {
	s, _, _ := newServer(t, nil)
	e := &hubapi.Enrollment{AllocationPolicy: hubapi.AllocationHashed}
	seen := map[string]bool{}
	for i := range 50 {
		h, err := s.allocate(e, "dev-"+string(rune('a'+i%26))+string(rune('a'+i/26)))
		if err != nil {
			t.Fatal(err)
		}
		seen[h] = true
		again, _ := s.allocate(e, "dev-"+string(rune('a'+i%26))+string(rune('a'+i/26)))
		if again != h {
			t.Fatal("hashed allocation is not deterministic")
		}
	}
	if !seen["hub1"] || !seen["hub2"] {
		t.Fatalf("hashed allocation used %v", seen)
	}
	if _, err := s.allocate(&hubapi.Enrollment{IoTHubs: []string{"unlinked"}}, "x"); err == nil || err.code != 400208 {
		t.Fatalf("unlinked hub: %v", err)
	}
}

func TestDeviceEndpointErrorsAndThrottle(t *testing.T) {
	s, _, clk := newServer(t, func(c *Config) { c.RegistrationRate = 1; c.RetryAfter = 2 })
	if _, err := s.PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "g",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: testGroupKey}}}, true, ""); err != nil {
		t.Fatal(err)
	}
	tok := deviceToken(t, s.IDScope(), "d1", deriveB64(testGroupKey, "d1"), false)
	w := do(t, s, "PUT", "/"+s.IDScope()+"/registrations/d1/register", tok, `{"registrationId":"d1","payload":{"a":1}}`)
	if w.Code != 202 || w.Header().Get("Retry-After") != "2" {
		t.Fatalf("register: %d %v", w.Code, w.Header())
	}
	var op wire.DPSOperationStatus
	_ = json.Unmarshal(w.Body.Bytes(), &op)
	w = do(t, s, "GET", "/"+s.IDScope()+"/registrations/d1/operations/"+op.OperationID, tok, "")
	if w.Code != 200 || s.Stats().EarlyPolls != 1 {
		t.Fatalf("early poll not counted: %d %+v", w.Code, s.Stats())
	}
	clk.t = clk.t.Add(3 * time.Second)
	w = do(t, s, "GET", "/"+s.IDScope()+"/registrations/d1/operations/"+op.OperationID, tok, "")
	if w.Code != 200 || s.Stats().EarlyPolls != 1 || !strings.Contains(w.Body.String(), `"payload":{"a":1}`) {
		t.Fatalf("poll: %d %s %+v", w.Code, w.Body, s.Stats())
	}
	// Second and third registration within the same second: throttled.
	do(t, s, "PUT", "/"+s.IDScope()+"/registrations/d1/register", tok, `{"registrationId":"d1"}`)
	w = do(t, s, "PUT", "/"+s.IDScope()+"/registrations/d1/register", tok, `{"registrationId":"d1"}`)
	if w.Code != 429 || w.Header().Get("Retry-After") == "" || w.Header().Get("x-ms-error-code") != "429001" {
		t.Fatalf("throttle: %d %v", w.Code, w.Header())
	}
	for _, tc := range []struct {
		path, tok, body string
		code            int
	}{
		{"/wrongscope/registrations/d1/register", tok, `{}`, 401},
		{"/" + s.IDScope() + "/registrations/d2/register", tok, `{}`, 401},
		{"/" + s.IDScope() + "/registrations/d1/register", "", `{}`, 401},
		{"/" + s.IDScope() + "/registrations/d1/register", "SharedAccessSignature garbage", `{}`, 401},
		{"/" + s.IDScope() + "/registrations/d1/operations/nope", tok, ``, 404},
	} {
		method := "PUT"
		if strings.Contains(tc.path, "operations") {
			method = "GET"
		}
		w := do(t, s, method, tc.path, tc.tok, tc.body)
		if w.Code != tc.code {
			t.Errorf("%s: %d %s", tc.path, w.Code, w.Body)
		}
		var de wire.DPSError
		if json.Unmarshal(w.Body.Bytes(), &de) != nil || de.ErrorCode/1000 != tc.code {
			t.Errorf("%s: error body %s", tc.path, w.Body)
		}
	}
	clk.t = clk.t.Add(5 * time.Second)
	for _, body := range []string{`{"registrationId":"other"}`, `{"registrationId":"d1","payload":[1]}`, `{`} {
		if w := do(t, s, "PUT", "/"+s.IDScope()+"/registrations/d1/register", tok, body); w.Code != 400 {
			t.Errorf("%s: %d", body, w.Code)
		}
	}
}

// connectPacket builds a DPS CONNECT as the Node SDK sends it.
func connectPacket(t testing.TB, clientID, username, password string, keepAlive uint16) []byte {
	t.Helper()
	b, err := mqttpkt.Encode(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
		Clean: true, Keepalive: keepAlive, ClientIdentifier: clientID,
		UsernameFlag: true, Username: []byte(username), PasswordFlag: true, Password: []byte(password)}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// readPackets decodes what a DPS session wrote.
func readPackets(t testing.TB, out []byte) []packets.Packet {
	t.Helper()
	var pks []packets.Packet
	r := bytes.NewReader(out)
	for r.Len() > 0 {
		pk, err := mqttpkt.Read(r, maxPacket)
		if err != nil {
			t.Fatalf("the session wrote a packet the codec refuses: %v (output %q)", err, out)
		}
		pks = append(pks, pk)
	}
	return pks
}

// runMQTT serves one DPS MQTT session over a pipe, writes in, and returns what the server wrote
// until it closed the connection.
func runMQTT(t testing.TB, s *Server, regID, password string, in []byte) []byte {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	username := s.IDScope() + "/registrations/" + regID + "/api-version=2019-03-31&ClientVersion=azure-iot-provisioning-device%2F1.9.1"
	pkt := connectPacket(t, regID, username, password, 60)
	ci, err := mqttpkt.ParseConnect(pkt)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv, err := ln.Accept()
		if err != nil {
			return
		}
		s.ServeDPSMQTT(srv, tls.ConnectionState{}, pkt, ci)
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	cli := c.(*net.TCPConn)
	defer cli.Close()
	_ = cli.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = cli.Write(in)
	_ = cli.CloseWrite() // the session sees EOF after the input
	res, _ := io.ReadAll(cli)
	<-done
	return res
}

func TestMQTTSession(t *testing.T) {
	s, _, _ := newServer(t, func(c *Config) { c.RetryAfter = -1 })
	if _, err := s.PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "g",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: testGroupKey}}}, true, ""); err != nil {
		t.Fatal(err)
	}
	tok := deviceToken(t, s.IDScope(), "m1", deriveB64(testGroupKey, "m1"), true)
	// What a provisioning client sends: the table's SUBSCRIBE and register PUBLISH (packet ID 7,
	// $rid r1, registration ID m1).
	sub, reg := mqttpkt.Cases.Get("SUBSCRIBE to DPS responses"), mqttpkt.Cases.Get("register PUBLISH, QoS 1")
	out := readPackets(t, runMQTT(t, s, "m1", tok, slices.Concat(sub.Raw, reg.Raw)))
	if len(out) != 4 {
		t.Fatalf("session wrote %d packets, want CONNACK, SUBACK, PUBACK and the reply: %+v", len(out), out)
	}
	for i, want := range []packets.Packet{mqttpkt.Cases.Get("CONNACK accepted").Want, mqttpkt.Cases.Get("SUBACK granted QoS 1").Want} {
		if !reflect.DeepEqual(out[i], want) {
			t.Fatalf("packet %d: %+v, want %+v", i, out[i], want)
		}
	}
	if ack := out[2]; ack.FixedHeader.Type != packets.Puback || ack.PacketID != reg.Want.PacketID {
		t.Fatalf("want PUBACK %d of the register PUBLISH, got %+v", reg.Want.PacketID, ack)
	}
	rep := out[3]
	if rep.FixedHeader.Type != packets.Publish || rep.FixedHeader.Qos != 1 || rep.PacketID != 1 ||
		rep.TopicName != "$dps/registrations/res/202/?$rid=r1&retry-after=0" || !strings.Contains(string(rep.Payload), `"status":"assigning"`) {
		t.Fatalf("reply %+v (%s)", rep, rep.Payload)
	}
	// A wrong key: CONNACK 5.
	bad := deviceToken(t, s.IDScope(), "m1", testGroupKey, true)
	if out := runMQTT(t, s, "m1", bad, nil); !bytes.Equal(out, mqttpkt.Cases.Get("CONNACK not authorized").Raw) {
		t.Fatalf("wrong key: %q", out)
	}
}

// Every packet the codec's table refuses ends a DPS session, and the log says why in the codec's
// words; what came before it was answered. A packet over the DPS endpoint's 64 KiB limit is
// refused on its header.
func TestMQTTSessionRefusesMalformedPackets(t *testing.T) {
	s, _, _ := newServer(t, func(c *Config) { c.RetryAfter = -1 })
	core, logs := observer.New(zap.InfoLevel)
	s.log = zap.New(core)
	if _, err := s.PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "g",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: testGroupKey}}}, true, ""); err != nil {
		t.Fatal(err)
	}
	tok := deviceToken(t, s.IDScope(), "m1", deriveB64(testGroupKey, "m1"), true)
	good := slices.Concat(mqttpkt.Cases.Get("SUBSCRIBE to DPS responses").Raw, mqttpkt.Cases.Get("register PUBLISH, QoS 1").Raw)
	refused := mqttpkt.Table{{Name: "PUBLISH over 64 KiB", Err: "65537 bytes, limit 65536", Raw: []byte{0x30, 0x81, 0x80, 0x04}}}
	for _, c := range mqttpkt.Cases {
		if c.Err != "" {
			refused = append(refused, c)
		}
	}
	for _, c := range refused {
		t.Run(c.Name, func(t *testing.T) {
			logs.TakeAll()
			out := readPackets(t, runMQTT(t, s, "m1", tok, slices.Concat(good, c.Raw)))
			var types []byte
			for _, pk := range out {
				types = append(types, pk.FixedHeader.Type)
			}
			if want := []byte{packets.Connack, packets.Suback, packets.Puback, packets.Publish}; !bytes.Equal(types, want) {
				t.Fatalf("session wrote packet types %v, want %v (CONNACK, SUBACK, PUBACK, the reply)", types, want)
			}
			closed := logs.FilterMessage(MsgMalformedPacket).All()
			if len(closed) != 1 || !strings.Contains(closed[0].ContextMap()["error"].(string), c.Err) {
				t.Fatalf("logged %+v, want one %q naming %q", logs.All(), MsgMalformedPacket, c.Err)
			}
		})
	}
}

// FuzzDPSMQTTSession: whatever a device sends after a good CONNECT, the DPS MQTT session never
// panics and ends (it is hubsim's DPS request parser: packets, topics, register bodies).
func FuzzDPSMQTTSession(f *testing.F) {
	f.Add([]byte("\x82\x1c\x00\x01\x00\x17$dps/registrations/res/#\x01"))
	f.Add([]byte("\x32\x40\x00\x2b$dps/registrations/PUT/iotdps-register/?$rid=1\x00\x01{\"registrationId\":\"m1\",\"payload\":{}}"))
	f.Add([]byte("\x30\x3e\x00\x3a$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=x \xc0\x00"))
	f.Add([]byte("\xa2\x05\x00\x01\x00\x01#"))
	for _, c := range mqttpkt.Cases {
		f.Add(c.Raw)
	}
	s, _, _ := newServer(f, func(c *Config) { c.RetryAfter = -1 })
	if _, err := s.PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "g",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: testGroupKey}}}, true, ""); err != nil {
		f.Fatal(err)
	}
	tok := deviceToken(f, s.IDScope(), "m1", deriveB64(testGroupKey, "m1"), true)
	f.Fuzz(func(t *testing.T, in []byte) {
		out := runMQTT(t, s, "m1", tok, in)
		if !bytes.HasPrefix(out, mqttpkt.Cases.Get("CONNACK accepted").Raw) {
			t.Fatalf("no CONNACK 0: %q", out)
		}
	})
}

// FuzzDeviceHTTP: hubsim's DPS HTTPS request handling never panics and answers every request
// with a status and a JSON body.
func FuzzDeviceHTTP(f *testing.F) {
	f.Add("PUT", "/0ne00000001/registrations/d1/register", `{"registrationId":"d1","payload":{"a":1}}`)
	f.Add("GET", "/0ne00000001/registrations/d1/operations/abc", ``)
	f.Add("POST", "/enrollments/", `{"mode":"create","enrollments":[{"registrationId":"x","attestation":{"type":"symmetricKey"}}]}`)
	f.Add("PUT", "/enrollmentGroups/g%2F1", `{"attestation":{"type":"x509","x509":{"signingCertificates":{"primary":{"certificate":"AAAA"}}}}}`)
	d := softTPMs()[0]
	f.Add("PUT", "/0ne00000001/registrations/t1/register", d.body("t1"))
	f.Add("PUT", "/enrollments/t2", `{"attestation":{"type":"tpm","tpm":{"endorsementKey":"`+d.ekB64()+`"}}}`)
	s, _, _ := newServer(f, nil)
	if _, err := s.PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "g",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: testGroupKey}}}, true, ""); err != nil {
		f.Fatal(err)
	}
	if _, err := s.PutEnrollment(hubapi.Enrollment{RegistrationID: "t1",
		Attestation: &hubapi.AttestationMechanism{Type: hubapi.AttestationTPM, TPM: &hubapi.TPMAttestation{EndorsementKey: d.ekB64()}}}, false, ""); err != nil {
		f.Fatal(err)
	}
	devTok := deviceToken(f, s.IDScope(), "d1", deriveB64(testGroupKey, "d1"), true)
	svcTok, _ := sas.Build(context.Background(), s.policyKey, sas.Params{Resource: "localhost", KeyName: PolicyName, Expiry: time.Now().Add(time.Hour), RawResource: true})
	f.Fuzz(func(t *testing.T, method, path, body string) {
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, " \t\r\n#") || method == "" || strings.ContainsAny(method, " /\r\n") {
			return
		}
		r, err := http.NewRequest(method, "https://localhost"+path, strings.NewReader(body))
		if err != nil {
			return
		}
		switch {
		case strings.Contains(path, "/registrations/d1/"):
			r.Header.Set("Authorization", devTok)
		case strings.Contains(path, "/registrations/t1/"):
			// A TPM device's first request: no Authorization.
		default:
			r.Header.Set("Authorization", svcTok)
		}
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		if w.Code < 200 || w.Code > 599 {
			t.Fatalf("status %d", w.Code)
		}
		if w.Code != 204 && !json.Valid(w.Body.Bytes()) {
			t.Fatalf("%s %s: body %q is not JSON", method, path, w.Body)
		}
	})
}

func TestOwnsLeavesHubPathsAlone(t *testing.T) {
	for path, want := range map[string]bool{
		"/0ne00000001/registrations/d1/register":      true,
		"/0ne00000001/registrations/d1/operations/o1": true,
		"/0ne00000001/registrations/d1":               true,
		"/enrollments/x":                              true,
		"/enrollmentgroups/x/attestationmechanism":    true,
		"/registrations/x":                            true,
		"/hubsim/dps/stats":                           true,
		"/twins/registrations/methods":                false,
		"/devices/registrations":                      false,
		"/hubsim/devices/x/messages/events":           false,
		"/devices/x":                                  false,
	} {
		r := httptest.NewRequest("GET", path, nil)
		seg, ok := Segments(r)
		if !ok || Owns(seg) != want {
			t.Errorf("%s: Owns = %v, want %v", path, !want, want)
		}
	}
}
