package dps

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/mqttpkt"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/tpm/activation"
	"github.com/iothubby/iothubby/pkg/tpm/activation/activationtest"
	"github.com/iothubby/iothubby/pkg/wire"
)

// softTPM is a TPM's endorsement key and storage root key made in software (see
// activationtest): with the private keys a test can undo an activation blob without a TPM.
type softTPM struct{ *activationtest.SoftTPM }

func newSoftTPM() *softTPM {
	d, err := activationtest.New()
	if err != nil {
		panic(err) // crypto/rand failing: nothing a test can do
	}
	return &softTPM{d}
}

// Two software TPMs shared by the tests of this file (RSA key generation is slow under -race).
var softTPMs = sync.OnceValue(func() [2]*softTPM { return [2]*softTPM{newSoftTPM(), newSoftTPM()} })

func (d *softTPM) ekB64() string  { return base64.StdEncoding.EncodeToString(d.EK) }
func (d *softTPM) srkB64() string { return base64.StdEncoding.EncodeToString(d.SRK) }

// body is the register body the Node SDK sends for a TPM device.
func (d *softTPM) body(regID string) string {
	return `{"registrationId":"` + regID + `","tpm":{"endorsementKey":"` + d.ekB64() + `","storageRootKey":"` + d.srkB64() + `"}}`
}

// unwrap recovers the HMAC key an activation blob (base64) delivers, checking every integrity
// value on the way.
func (d *softTPM) unwrap(t *testing.T, b64 string) []byte {
	t.Helper()
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		t.Fatalf("authenticationKey is not base64: %v", err)
	}
	b, err := activation.Parse(raw)
	if err != nil {
		t.Fatalf("authenticationKey: %v", err)
	}
	key, err := d.Unwrap(b)
	if err != nil {
		t.Fatalf("authenticationKey: %v", err)
	}
	return key
}

// tlsDPS serves s on a real TLS socket and returns a request helper.
type tlsDPS struct {
	t   *testing.T
	s   *Server
	srv *httptest.Server
}

func newTLSDPS(t *testing.T, s *Server) *tlsDPS {
	srv := httptest.NewTLSServer(s)
	t.Cleanup(srv.Close)
	return &tlsDPS{t: t, s: s, srv: srv}
}

// call sends one request and returns the status, the x-ms-error-code header and the body.
func (c *tlsDPS) call(method, path, auth, body string) (int, string, []byte) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, c.srv.URL+path, strings.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	rsp, err := c.srv.Client().Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer rsp.Body.Close()
	b, err := io.ReadAll(rsp.Body)
	if err != nil {
		c.t.Fatal(err)
	}
	return rsp.StatusCode, rsp.Header.Get("x-ms-error-code"), b
}

func (c *tlsDPS) registerPath(regID string) string {
	return "/" + c.s.IDScope() + "/registrations/" + regID + "/register?api-version=2019-03-31"
}

func (c *tlsDPS) opPath(regID, op string) string {
	return "/" + c.s.IDScope() + "/registrations/" + regID + "/operations/" + op + "?api-version=2019-03-31"
}

// challenge sends the first PUT (no Authorization), checks the 401's shape, and returns K1 as
// the device's TPM would recover it.
func (c *tlsDPS) challenge(d *softTPM, regID string) []byte {
	c.t.Helper()
	code, ec, b := c.call("PUT", c.registerPath(regID), "", d.body(regID))
	if code != 401 || ec != "401002" {
		c.t.Fatalf("first PUT: %d %s %s", code, ec, b)
	}
	var fields map[string]any
	if err := json.Unmarshal(b, &fields); err != nil {
		c.t.Fatal(err)
	}
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if want := []string{"authenticationKey", "errorCode", "keyName", "message"}; !slices.Equal(keys, want) {
		c.t.Fatalf("401 fields %v, want %v: %s", keys, want, b)
	}
	var ch wire.DPSTPMChallenge
	_ = json.Unmarshal(b, &ch)
	if ch.KeyName != "registration" || ch.ErrorCode != 401002 || !strings.Contains(ch.Message, "TPM") {
		c.t.Fatalf("401 body %s", b)
	}
	k1 := d.unwrap(c.t, ch.AuthenticationKey)
	if len(k1) != 32 {
		c.t.Fatalf("K1 is %d bytes", len(k1))
	}
	return k1
}

// tpmToken is the SAS token the device builds with the key in its TPM: sr URL-encoded (as
// Node's encodeURIComponent), skn=registration.
func tpmToken(t *testing.T, scope, regID string, key []byte) string {
	t.Helper()
	return deviceToken(t, scope, regID, base64.StdEncoding.EncodeToString(key), false)
}

func putTPMEnrollment(t *testing.T, s *Server, e hubapi.Enrollment) {
	t.Helper()
	if _, err := s.PutEnrollment(e, false, ""); err != nil {
		t.Fatal(err)
	}
}

func TestTPMEnrollmentServiceAPI(t *testing.T) {
	s, _, _ := newServer(t, nil)
	d := softTPMs()[0]
	tok := serviceToken(t, s)
	w := do(t, s, "PUT", "/enrollments/tpm1?api-version=2021-10-01", tok,
		`{"registrationId":"tpm1","attestation":{"type":"tpm","tpm":{"endorsementKey":"`+d.ekB64()+`"}}}`)
	if w.Code != 200 {
		t.Fatalf("put: %d %s", w.Code, w.Body)
	}
	w = do(t, s, "GET", "/enrollments/tpm1", tok, "")
	var got struct {
		Attestation map[string]json.RawMessage `json:"attestation"`
	}
	if w.Code != 200 || json.Unmarshal(w.Body.Bytes(), &got) != nil {
		t.Fatalf("get: %d %s", w.Code, w.Body)
	}
	if string(got.Attestation["type"]) != `"tpm"` || string(got.Attestation["tpm"]) != `{"endorsementKey":"`+d.ekB64()+`"}` || len(got.Attestation) != 2 {
		t.Fatalf("attestation %s", w.Body)
	}
	if w := do(t, s, "POST", "/enrollments/tpm1/attestationmechanism", tok, ""); w.Code != 200 || !strings.Contains(w.Body.String(), d.ekB64()) {
		t.Fatalf("attestation mechanism: %d %s", w.Code, w.Body)
	}
	// With a storage root key: kept. Leading and trailing spaces are trimmed.
	w = do(t, s, "PUT", "/enrollments/tpm2", tok,
		`{"attestation":{"type":"tpm","tpm":{"endorsementKey":" `+d.ekB64()+`\n","storageRootKey":"`+d.srkB64()+`"}}}`)
	if w.Code != 200 || !strings.Contains(w.Body.String(), `"endorsementKey":"`+d.ekB64()+`","storageRootKey":"`+d.srkB64()+`"`) {
		t.Fatalf("put with SRK: %d %s", w.Code, w.Body)
	}

	signing := tpm2.RSASRKTemplate
	signing.ObjectAttributes.Restricted, signing.ObjectAttributes.Decrypt, signing.ObjectAttributes.SignEncrypt = false, false, true
	signingKey := base64.StdEncoding.EncodeToString(activationtest.RSAPublic(signing, &d.EKPrivate.PublicKey))
	trailing := base64.StdEncoding.EncodeToString(append(bytes.Clone(d.EK), 0))
	for _, tc := range []struct{ name, tpm, want string }{
		{"no tpm object", ``, "endorsementKey is required"},
		{"empty EK", `,"tpm":{"endorsementKey":""}`, "endorsementKey is required"},
		{"EK not base64", `,"tpm":{"endorsementKey":"not base64!"}`, "not base64"},
		{"EK not a TPM2B_PUBLIC", `,"tpm":{"endorsementKey":"` + base64.StdEncoding.EncodeToString([]byte("hello, world")) + `"}`, "TPM2B_PUBLIC"},
		{"EK with bytes after it", `,"tpm":{"endorsementKey":"` + trailing + `"}`, "TPM2B_PUBLIC"},
		{"EK is a signing key", `,"tpm":{"endorsementKey":"` + signingKey + `"}`, "storage key"},
		{"EK too long", `,"tpm":{"endorsementKey":"` + base64.StdEncoding.EncodeToString(make([]byte, 4096)) + `"}`, "longer than"},
		{"SRK garbage", `,"tpm":{"endorsementKey":"` + d.ekB64() + `","storageRootKey":"AAAA"}`, "storageRootKey"},
	} {
		w := do(t, s, "PUT", "/enrollments/bad", tok, `{"attestation":{"type":"tpm"`+tc.tpm+`}}`)
		var de wire.DPSError
		if w.Code != 400 || json.Unmarshal(w.Body.Bytes(), &de) != nil || de.ErrorCode != 400004 || !strings.Contains(de.Message, tc.want) {
			t.Errorf("%s: %d %s", tc.name, w.Code, w.Body)
		}
	}
	// Bulk: a bad EK fails its item only.
	w = do(t, s, "POST", "/enrollments/", tok, `{"mode":"create","enrollments":[{"registrationId":"b1","attestation":{"type":"tpm","tpm":{"endorsementKey":"AAAA"}}},`+
		`{"registrationId":"b2","attestation":{"type":"tpm","tpm":{"endorsementKey":"`+d.ekB64()+`"}}}]}`)
	var br BulkResult
	if json.Unmarshal(w.Body.Bytes(), &br) != nil || br.IsSuccessful || len(br.Errors) != 1 || br.Errors[0].RegistrationID != "b1" || br.Errors[0].ErrorCode != 400004 {
		t.Fatalf("bulk: %s", w.Body)
	}
	var ids []string
	for _, e := range s.ListEnrollments(false) {
		ids = append(ids, e.RegistrationID)
	}
	if !slices.Equal(ids, []string{"b2", "tpm1", "tpm2"}) {
		t.Fatalf("enrollments after the refused requests: %v", ids)
	}
}

func TestTPMRegistrationHTTPS(t *testing.T) {
	s, reg, clk := newServer(t, func(c *Config) { c.RetryAfter = 0 })
	d := softTPMs()[0]
	const regID = "tpm-device-1"
	putTPMEnrollment(t, s, hubapi.Enrollment{RegistrationID: regID, DeviceID: "tpm-dev", AllocationPolicy: hubapi.AllocationStatic, IoTHubs: []string{"hub2"},
		InitialTwin: json.RawMessage(`{"tags":{"k":"v"},"properties":{"desired":{"interval":9}}}`),
		Attestation: &hubapi.AttestationMechanism{Type: hubapi.AttestationTPM, TPM: &hubapi.TPMAttestation{EndorsementKey: d.ekB64()}}})
	c := newTLSDPS(t, s)
	scope := s.IDScope()

	k1 := c.challenge(d, regID)
	// A token signed with another key: 401, as for symmetric keys.
	wrong := make([]byte, 32)
	_, _ = rand.Read(wrong)
	if code, ec, b := c.call("PUT", c.registerPath(regID), tpmToken(t, scope, regID, wrong), d.body(regID)); code != 401 || ec != "401002" {
		t.Fatalf("wrong key: %d %s %s", code, ec, b)
	}
	// A token for another registration, signed with K1: 401.
	if code, _, b := c.call("PUT", c.registerPath(regID), tpmToken(t, scope, "other", k1), d.body(regID)); code != 401 {
		t.Fatalf("token for another sr: %d %s", code, b)
	}
	// K1 signs: 202 assigning; the poll (same Authorization) has the result.
	auth := tpmToken(t, scope, regID, k1)
	code, _, b := c.call("PUT", c.registerPath(regID), auth, d.body(regID))
	var op wire.DPSOperationStatus
	if code != 202 || json.Unmarshal(b, &op) != nil || op.Status != wire.DPSStatusAssigning || op.OperationID == "" {
		t.Fatalf("second PUT: %d %s", code, b)
	}
	if code, _, b := c.call("GET", c.opPath(regID, op.OperationID), tpmToken(t, scope, regID, wrong), ""); code != 401 {
		t.Fatalf("poll with a wrong key: %d %s", code, b)
	}
	code, _, b = c.call("GET", c.opPath(regID, op.OperationID), auth, "")
	if code != 200 || json.Unmarshal(b, &op) != nil {
		t.Fatalf("poll: %d %s", code, b)
	}
	rs := op.RegistrationState
	if op.Status != wire.DPSStatusAssigned || rs == nil || rs.DeviceID != "tpm-dev" || rs.AssignedHub != "hub2" ||
		rs.Substatus != wire.SubstatusInitialAssignment || rs.TPM == nil {
		t.Fatalf("result: %s", b)
	}
	k2 := d.unwrap(t, rs.TPM.AuthenticationKey)
	if len(k2) != 32 || bytes.Equal(k1, k2) {
		t.Fatalf("K2 is %d bytes (equal to K1: %v)", len(k2), bytes.Equal(k1, k2))
	}
	dev, err := reg.Get("tpm-dev")
	if err != nil {
		t.Fatal(err)
	}
	sk := dev.Authentication.SymmetricKey
	if dev.Authentication.Type != registry.AuthSAS || sk.PrimaryKey != base64.StdEncoding.EncodeToString(k2) {
		t.Fatalf("hub device authentication %+v: primary key is not K2", dev.Authentication.Type)
	}
	if sec, err := base64.StdEncoding.DecodeString(sk.SecondaryKey); err != nil || len(sec) != 32 || sk.SecondaryKey == sk.PrimaryKey {
		t.Fatal("hub device secondary key is not a distinct 32-byte key")
	}
	// A hub token the TPM signs with K2 verifies with the registry's key.
	hubTok, err := sas.Build(context.Background(), sas.Key(k2), sas.Params{Resource: sas.DeviceResource("hub2", "tpm-dev"), Expiry: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	pt, _ := sas.Parse(hubTok)
	if pk, _ := sas.ParseKey(sk.PrimaryKey); pt.Verify(pk, time.Now()) != nil {
		t.Fatal("a hub token signed with K2 does not verify with the device's primary key")
	}
	if tw, ok := s.InitialTwin("tpm-dev"); !ok || !strings.Contains(string(tw), `"interval":9`) {
		t.Fatalf("initial twin %s", tw)
	}
	// The service API's registration state has no tpm part (only the device gets the blob).
	w := do(t, s, "GET", "/registrations/"+regID, serviceToken(t, s), "")
	var stored map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &stored); err != nil {
		t.Fatal(err)
	}
	if _, hasTPM := stored["tpm"]; w.Code != 200 || hasTPM || strings.Contains(w.Body.String(), "authenticationKey") || stored["status"] != "assigned" {
		t.Fatalf("registration state: %d %s", w.Code, w.Body)
	}

	// Registering again: a new challenge replaces K1; K1 no longer authenticates; the hub device
	// gets the new K2 (same device, updated).
	k1b := c.challenge(d, regID)
	if code, _, b := c.call("PUT", c.registerPath(regID), auth, d.body(regID)); code != 401 {
		t.Fatalf("replaced K1 still accepted: %d %s", code, b)
	}
	auth = tpmToken(t, scope, regID, k1b)
	if code, _, b = c.call("PUT", c.registerPath(regID), auth, d.body(regID)); code != 202 || json.Unmarshal(b, &op) != nil {
		t.Fatalf("re-registration: %d %s", code, b)
	}
	if code, _, b = c.call("GET", c.opPath(regID, op.OperationID), auth, ""); code != 200 || json.Unmarshal(b, &op) != nil || op.RegistrationState.TPM == nil {
		t.Fatalf("re-registration poll: %d %s", code, b)
	}
	k2b := d.unwrap(t, op.RegistrationState.TPM.AuthenticationKey)
	dev2, err := reg.Get("tpm-dev")
	if err != nil || dev2.Authentication.SymmetricKey.PrimaryKey != base64.StdEncoding.EncodeToString(k2b) || bytes.Equal(k2, k2b) {
		t.Fatalf("after re-registration the hub device's key is not the new K2 (%v)", err)
	}
	if dev2.GenerationID != dev.GenerationID {
		t.Fatal("re-registration replaced the hub device instead of updating it")
	}

	// The challenge expires.
	clk.t = clk.t.Add(tpmChallengeTTL + time.Second)
	if code, ec, b := c.call("PUT", c.registerPath(regID), auth, d.body(regID)); code != 401 || ec != "401002" || !strings.Contains(string(b), "no TPM challenge") {
		t.Fatalf("expired challenge: %d %s %s", code, ec, b)
	}
	// Two challenges and two registrations; refused tokens never reach the register count.
	if st := s.Stats(); st.Registrations != 2 || st.RegisterRequests != 4 {
		t.Fatalf("stats %+v", st)
	}
}

func TestTPMRegistrationRefused(t *testing.T) {
	s, reg, _ := newServer(t, nil)
	d, other := softTPMs()[0], softTPMs()[1]
	putTPMEnrollment(t, s, hubapi.Enrollment{RegistrationID: "t1", Attestation: &hubapi.AttestationMechanism{Type: hubapi.AttestationTPM, TPM: &hubapi.TPMAttestation{EndorsementKey: d.ekB64()}}})
	putTPMEnrollment(t, s, hubapi.Enrollment{RegistrationID: "sym1", Attestation: &hubapi.AttestationMechanism{Type: hubapi.AttestationSymmetricKey}})
	c := newTLSDPS(t, s)
	challenges := func() int {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.tpmChallenges)
	}

	// 401 without a challenge: another EK, no enrollment, an enrollment of another type.
	for _, tc := range []struct{ name, regID, body, want string }{
		{"EK mismatch", "t1", other.body("t1"), "not the one enrolled"},
		{"no enrollment", "nobody", d.body("nobody"), "no individual enrollment"},
		{"symmetric-key enrollment", "sym1", d.body("sym1"), "does not use TPM"},
		{"wrong scope", "t1", d.body("t1"), "unknown ID scope"},
	} {
		path := c.registerPath(tc.regID)
		if tc.name == "wrong scope" {
			path = "/0ne99999999/registrations/t1/register"
		}
		code, ec, b := c.call("PUT", path, "", tc.body)
		var de wire.DPSError
		if code != 401 || ec != "401002" || json.Unmarshal(b, &de) != nil || de.ErrorCode != 401002 || !strings.Contains(de.Message, tc.want) ||
			strings.Contains(string(b), "authenticationKey") {
			t.Errorf("%s: %d %s %s", tc.name, code, ec, b)
		}
	}
	// 400, nothing stored: bad bodies.
	ek, srk := d.ekB64(), d.srkB64()
	tpmBody := func(ek, srk string) string {
		return `{"registrationId":"t1","tpm":{"endorsementKey":"` + ek + `","storageRootKey":"` + srk + `"}}`
	}
	for _, tc := range []struct{ name, body, want string }{
		{"EK not base64", tpmBody("%%%", srk), "tpm.endorsementKey is not base64"},
		{"EK not a TPM2B_PUBLIC", tpmBody(base64.StdEncoding.EncodeToString([]byte{0, 3, 1, 2, 3}), srk), "tpm.endorsementKey is not the TPM2B_PUBLIC"},
		{"SRK missing", `{"registrationId":"t1","tpm":{"endorsementKey":"` + ek + `"}}`, "tpm.storageRootKey is required"},
		{"SRK not a TPM2B_PUBLIC", tpmBody(ek, base64.StdEncoding.EncodeToString([]byte("srk"))), "tpm.storageRootKey is not the TPM2B_PUBLIC"},
		{"EK oversize", tpmBody(base64.StdEncoding.EncodeToString(make([]byte, 3000)), srk), "longer than 2048 bytes"},
		{"no tpm object", `{"registrationId":"t1"}`, "needs tpm.endorsementKey"},
		{"empty body", ``, "needs a body"},
		{"not JSON", `{"tpm":`, "request body"},
		{"tpm not an object", `{"tpm":"x"}`, "request body"},
		{"other registrationId", d.body("t2"), `"t2" is not "t1"`},
	} {
		code, ec, b := c.call("PUT", c.registerPath("t1"), "", tc.body)
		var de wire.DPSError
		if code != 400 || ec != "400004" || json.Unmarshal(b, &de) != nil || !strings.Contains(de.Message, tc.want) {
			t.Errorf("%s: %d %s %s", tc.name, code, ec, b)
		}
	}
	if n := challenges(); n != 0 {
		t.Fatalf("%d challenges stored after refused requests", n)
	}
	// A token before any challenge: 401.
	var k [32]byte
	if code, _, b := c.call("PUT", c.registerPath("t1"), tpmToken(t, s.IDScope(), "t1", k[:]), d.body("t1")); code != 401 || !strings.Contains(string(b), "no TPM challenge") {
		t.Fatalf("token without a challenge: %d %s", code, b)
	}
	// A good token with a bad second body (no SRK): 400, no device.
	k1 := c.challenge(d, "t1")
	auth := tpmToken(t, s.IDScope(), "t1", k1)
	if code, _, b := c.call("PUT", c.registerPath("t1"), auth, `{"registrationId":"t1","tpm":{"endorsementKey":"`+ek+`"}}`); code != 400 {
		t.Fatalf("second PUT without SRK: %d %s", code, b)
	}
	if code, _, b := c.call("PUT", c.registerPath("t1"), auth, other.body("t1")); code != 401 {
		t.Fatalf("second PUT with another EK: %d %s", code, b)
	}
	if _, err := reg.Get("t1"); err == nil {
		t.Fatal("a refused registration created the hub device")
	}
	// The enrollment's EK changes after the challenge: K1 no longer authenticates.
	putTPMEnrollment(t, s, hubapi.Enrollment{RegistrationID: "t1", Attestation: &hubapi.AttestationMechanism{Type: hubapi.AttestationTPM, TPM: &hubapi.TPMAttestation{EndorsementKey: other.ekB64()}}})
	if code, _, b := c.call("PUT", c.registerPath("t1"), auth, other.body("t1")); code != 401 || !strings.Contains(string(b), "changed since") {
		t.Fatalf("K1 after the EK changed: %d %s", code, b)
	}

	// Disabled: challenged (the EK matches), then the registration ends "disabled" as for other
	// attestation types, and no hub device is made.
	putTPMEnrollment(t, s, hubapi.Enrollment{RegistrationID: "t1", ProvisioningStatus: "disabled",
		Attestation: &hubapi.AttestationMechanism{Type: hubapi.AttestationTPM, TPM: &hubapi.TPMAttestation{EndorsementKey: d.ekB64()}}})
	auth = tpmToken(t, s.IDScope(), "t1", c.challenge(d, "t1"))
	code, _, b := c.call("PUT", c.registerPath("t1"), auth, d.body("t1"))
	var op wire.DPSOperationStatus
	if code != 202 || json.Unmarshal(b, &op) != nil {
		t.Fatalf("disabled: %d %s", code, b)
	}
	code, _, b = c.call("GET", c.opPath("t1", op.OperationID), auth, "")
	if code != 200 || json.Unmarshal(b, &op) != nil || op.Status != wire.DPSStatusDisabled || op.RegistrationState.ErrorCode != 401003 ||
		op.RegistrationState.TPM != nil {
		t.Fatalf("disabled poll: %d %s", code, b)
	}
	if _, err := reg.Get("t1"); err == nil {
		t.Fatal("a disabled enrollment's registration created the hub device")
	}
}

func TestTPMOverMQTTRefused(t *testing.T) {
	s, reg, _ := newServer(t, func(c *Config) { c.RetryAfter = -1 })
	d := softTPMs()[0]
	putTPMEnrollment(t, s, hubapi.Enrollment{RegistrationID: "t1", Attestation: &hubapi.AttestationMechanism{Type: hubapi.AttestationTPM, TPM: &hubapi.TPMAttestation{EndorsementKey: d.ekB64()}}})
	if _, err := s.PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "g",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: testGroupKey}}}, true, ""); err != nil {
		t.Fatal(err)
	}
	// subscribe and publish are what a DPS client sends.
	encode := func(pk packets.Packet) []byte {
		b, err := mqttpkt.Encode(pk)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	subscribe := encode(mqttpkt.Subscribe(1, 1, wire.DPSResponseFilter))
	publish := func(topic, body string) []byte {
		return encode(mqttpkt.Publish(topic, 1, 7, []byte(body)))
	}
	session := func(regID, body string) []byte {
		in := slices.Concat(subscribe, publish(wire.DPSRegisterTopic("r1"), body), publish(wire.DPSPollTopic("r2", "op"), ""))
		// Whatever password it sends (it has no key it could sign with).
		return runMQTT(t, s, regID, "SharedAccessSignature sr=x&sig=eA%3D%3D&se=1", in)
	}
	const msg = "TPM attestation is not supported over MQTT; use HTTPS"
	// A TPM enrollment: the session opens (it has no credentials to present), and both the
	// register and the poll are refused with 400.
	out := string(session("t1", d.body("t1")))
	if !strings.HasPrefix(out, string(mqttpkt.Cases.Get("CONNACK accepted").Raw)) || !strings.Contains(out, "$dps/registrations/res/400/?$rid=r1") ||
		!strings.Contains(out, "$dps/registrations/res/400/?$rid=r2") || strings.Count(out, msg) != 2 || !strings.Contains(out, `"errorCode":400004`) {
		t.Fatalf("TPM enrollment over MQTT: %q", out)
	}
	// A symmetric-key device that sends a tpm body: refused the same way.
	tok := deviceToken(t, s.IDScope(), "m1", deriveB64(testGroupKey, "m1"), true)
	out = string(runMQTT(t, s, "m1", tok, slices.Concat(subscribe, publish(wire.DPSRegisterTopic("r3"), d.body("m1")))))
	if !strings.HasPrefix(out, string(mqttpkt.Cases.Get("CONNACK accepted").Raw)) || !strings.Contains(out, "$dps/registrations/res/400/?$rid=r3") || !strings.Contains(out, msg) {
		t.Fatalf("tpm body over MQTT: %q", out)
	}
	for _, id := range []string{"t1", "m1"} {
		if _, err := reg.Get(id); err == nil {
			t.Fatalf("device %s created by a refused MQTT registration", id)
		}
	}
}

// FuzzTPMRegisterBody: the TPM register body parser never panics; what it accepts has two keys
// a blob can be made to, within the size bound; what it refuses is a 400 400004.
func FuzzTPMRegisterBody(f *testing.F) {
	d := softTPMs()[0]
	f.Add([]byte(d.body("t1")))
	f.Add([]byte(`{"registrationId":"t1","tpm":{"endorsementKey":"` + d.ekB64() + `"}}`))
	f.Add([]byte(`{"tpm":{"endorsementKey":"AAA=","storageRootKey":"AAA="}}`))
	f.Add([]byte(`{"tpm":null,"payload":{"a":1}}`))
	f.Add([]byte(`{"tpm":{"endorsementKey":"` + base64.StdEncoding.EncodeToString(d.SRK) + `","storageRootKey":"` + d.ekB64() + `"}}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		_, ek, srk, aerr := parseTPMRequest(body)
		if aerr != nil {
			if aerr.status != 400 || aerr.code != 400004 || aerr.msg == "" {
				t.Fatalf("refusal %v", aerr)
			}
			return
		}
		for _, k := range [][]byte{ek, srk} {
			if len(k) > maxTPMKeyBytes {
				t.Fatalf("accepted a %d-byte key", len(k))
			}
			if _, err := activation.ParsePublic(k); err != nil {
				t.Fatalf("accepted a key ParsePublic refuses: %v", err)
			}
		}
		if _, err := activation.Build(rand.Reader, ek, srk, make([]byte, 32)); err != nil {
			t.Fatalf("accepted keys Build refuses: %v", err)
		}
	})
}
