package hubsim_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/connstr"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
)

type deviceJSON struct {
	DeviceID                  string  `json:"deviceId"`
	GenerationID              string  `json:"generationId"`
	ETag                      string  `json:"etag"`
	ConnectionState           string  `json:"connectionState"`
	Status                    string  `json:"status"`
	StatusReason              *string `json:"statusReason"`
	LastActivityTime          string  `json:"lastActivityTime"`
	CloudToDeviceMessageCount int     `json:"cloudToDeviceMessageCount"`
	Authentication            struct {
		Type         string `json:"type"`
		SymmetricKey struct {
			PrimaryKey   *string `json:"primaryKey"`
			SecondaryKey *string `json:"secondaryKey"`
		} `json:"symmetricKey"`
		X509Thumbprint struct {
			PrimaryThumbprint *string `json:"primaryThumbprint"`
		} `json:"x509Thumbprint"`
	} `json:"authentication"`
}

func TestRegistryCRUD(t *testing.T) {
	e := newEnv(t)
	// Create as Microsoft's Node SDK sends it: no If-Match, empty keys.
	create := []byte(`{"deviceId":"dev 1","status":"enabled","authentication":{"type":"sas","symmetricKey":{"primaryKey":"","secondaryKey":""}},"extra":{"ignored":true}}`)
	path := "/devices/dev%201?api-version=2021-04-12"
	r := e.do("PUT", path, create, "")
	if r.status != 400 {
		t.Fatalf("a space in the ID must be refused: %d %s", r.status, r.body)
	}
	create = bytes.ReplaceAll(create, []byte("dev 1"), []byte("dev:1(a)"))
	path = "/devices/dev%3A1%28a%29?api-version=2021-04-12"
	r = e.do("PUT", path, create, "")
	if r.status != 200 || r.header.Get("Content-Type") != "application/json; charset=utf-8" {
		t.Fatalf("create: %d %s", r.status, r.body)
	}
	var d deviceJSON
	r.json(t, &d)
	if d.DeviceID != "dev:1(a)" || d.ETag == "" || d.GenerationID == "" || d.ConnectionState != "Disconnected" || d.Status != "enabled" ||
		d.StatusReason != nil || d.Authentication.Type != "sas" || d.Authentication.SymmetricKey.PrimaryKey == nil ||
		len(*d.Authentication.SymmetricKey.PrimaryKey) != 44 || d.Authentication.X509Thumbprint.PrimaryThumbprint != nil ||
		d.LastActivityTime != "0001-01-01T00:00:00Z" {
		t.Fatalf("created device: %s", r.body)
	}
	if r := e.do("PUT", path, create, ""); r.status != 409 || r.errorCode(t) != "DeviceAlreadyExists" || r.header.Get("iothub-errorcode") != "DeviceAlreadyExists" {
		t.Fatalf("second create: %d %s", r.status, r.body)
	}
	if r := e.do("GET", path, nil, ""); r.status != 200 || !bytes.Contains(r.body, []byte(`"etag":"`+d.ETag+`"`)) {
		t.Fatalf("get: %d %s", r.status, r.body)
	}
	r = e.do("GET", "/devices/missing?api-version=2021-04-12", nil, "")
	var eb struct{ Message string }
	r.json(t, &eb)
	if r.status != 404 || !strings.HasPrefix(eb.Message, "ErrorCode:DeviceNotFound;") {
		t.Fatalf("missing: %d %s", r.status, r.body)
	}

	// Update rules.
	upd := func(ifMatch, body string) response {
		if ifMatch == "-" {
			return e.do("PUT", path, []byte(body), "")
		}
		return e.do("PUT", path, []byte(body), "", "If-Match", ifMatch)
	}
	disable := `{"deviceId":"dev:1(a)","status":"disabled","statusReason":"maintenance","authentication":{"type":"sas","symmetricKey":{"primaryKey":"","secondaryKey":""}}}`
	if r := upd(`"stale"`, disable); r.status != 412 || r.errorCode(t) != "PreconditionFailed" {
		t.Fatalf("stale etag: %d %s", r.status, r.body)
	}
	if r := upd(``, disable); r.status != 412 {
		t.Fatalf("empty If-Match: %d %s", r.status, r.body)
	}
	r = upd(`"*"`, disable)
	var d2 deviceJSON
	r.json(t, &d2)
	if r.status != 200 || d2.ETag == d.ETag || d2.Status != "disabled" || *d2.StatusReason != "maintenance" || d2.GenerationID != d.GenerationID ||
		*d2.Authentication.SymmetricKey.PrimaryKey != *d.Authentication.SymmetricKey.PrimaryKey {
		t.Fatalf("update: %d %s", r.status, r.body)
	}
	if r := upd(`"`+d.ETag+`"`, disable); r.status != 412 {
		t.Fatalf("old etag: %d", r.status)
	}
	if r := upd(d2.ETag, strings.Replace(disable, "disabled", "enabled", 1)); r.status != 200 {
		t.Fatalf("current etag, unquoted: %d %s", r.status, r.body)
	}
	if r := upd(`*`, `{"deviceId":"other","status":"enabled"}`); r.status != 400 {
		t.Fatalf("body ID differs: %d %s", r.status, r.body)
	}
	if r := e.do("PUT", "/devices/never?api-version=2021-04-12", []byte(`{"deviceId":"never"}`), "", "If-Match", "*"); r.status != 404 {
		t.Fatalf("update of a missing device: %d", r.status)
	}
	if r := upd(`*`, `{"deviceId":"dev:1(a)","authentication":{"type":"sas","symmetricKey":{"primaryKey":"short","secondaryKey":""}}}`); r.status != 400 {
		t.Fatalf("bad key: %d %s", r.status, r.body)
	}

	// X.509 thumbprint device; type inferred as the SDK does.
	if r := e.do("PUT", "/devices/x1", []byte(`{"deviceId":"x1","authentication":{"x509Thumbprint":{"primaryThumbprint":"`+strings.Repeat("ab", 20)+`"}}}`), ""); r.status != 200 ||
		!bytes.Contains(r.body, []byte(`"type":"selfSigned"`)) || !bytes.Contains(r.body, []byte(`"primaryKey":null`)) {
		t.Fatalf("selfSigned: %d %s", r.status, r.body)
	}

	// List, with and without the trailing slash, and top.
	var list []deviceJSON
	e.do("GET", "/devices/?api-version=2021-04-12", nil, "").json(t, &list)
	if len(list) != 2 || list[0].DeviceID != "dev:1(a)" || list[1].DeviceID != "x1" {
		t.Fatalf("list: %+v", list)
	}
	e.do("GET", "/devices?top=1", nil, "").json(t, &list)
	if len(list) != 1 {
		t.Fatalf("top=1: %d", len(list))
	}
	var stats registry.Stats
	e.do("GET", "/statistics/devices", nil, "").json(t, &stats)
	if stats != (registry.Stats{TotalDeviceCount: 2, EnabledDeviceCount: 2}) {
		t.Fatalf("stats %+v", stats)
	}

	// Delete rules.
	if r := e.do("DELETE", path, nil, "", "If-Match", `"nope"`); r.status != 412 {
		t.Fatalf("delete stale: %d", r.status)
	}
	if r := e.do("DELETE", path, nil, "", "If-Match", `"*"`); r.status != 204 || len(r.body) != 0 {
		t.Fatalf("delete: %d %s", r.status, r.body)
	}
	if r := e.do("DELETE", path, nil, "", "If-Match", `"*"`); r.status != 404 {
		t.Fatalf("delete again: %d", r.status)
	}
	if r := e.do("GET", "/nothing/here", nil, ""); r.status != 404 {
		t.Fatalf("unknown route: %d", r.status)
	}
	if r := e.do("POST", "/devices/x1", nil, ""); r.status != 405 {
		t.Fatalf("POST on a device: %d", r.status)
	}
}

func TestServiceAuth(t *testing.T) {
	e := newEnv(t)
	e.createSAS("dev-auth")
	hour := time.Now().Add(time.Hour)
	owner, _ := e.srv.Registry().Policy("iothubowner")
	wrongKey, _ := sas.ParseKey(registry.GenerateKey())
	badSig, _ := sas.Build(context.Background(), wrongKey, sas.Params{Resource: e.host, KeyName: "iothubowner", Expiry: hour, RawResource: true})
	ownerKey, _ := sas.ParseKey(owner.SecondaryKey)
	encoded, _ := sas.Build(context.Background(), ownerKey, sas.Params{Resource: e.host + ":8443", KeyName: "iothubowner", Expiry: hour})
	otherHost, _ := sas.Build(context.Background(), ownerKey, sas.Params{Resource: "otherhub", KeyName: "iothubowner", Expiry: hour, RawResource: true})
	deviceScoped, _ := sas.Build(context.Background(), ownerKey, sas.Params{Resource: sas.DeviceResource(e.host, "dev-auth"), KeyName: "iothubowner", Expiry: hour})

	for name, c := range map[string]struct {
		method, path, auth string
		want               int
	}{
		"owner, URL-encoded sr with port, secondary key": {"GET", "/devices/dev-auth", encoded, 200},
		"registryRead reads":                             {"GET", "/devices/dev-auth", e.serviceToken("registryRead", hour), 200},
		"registryReadWrite deletes":                      {"DELETE", "/devices/nobody", e.serviceToken("registryReadWrite", hour), 404},
		"bad signature":                                  {"GET", "/devices/dev-auth", badSig, 401},
		"expired":                                        {"GET", "/devices/dev-auth", e.serviceToken("iothubowner", time.Now().Add(-time.Minute)), 401},
		"malformed":                                      {"GET", "/devices/dev-auth", "SharedAccessSignature garbage", 401},
		"bearer":                                         {"GET", "/devices/dev-auth", "Bearer abc", 401},
		"other hub":                                      {"GET", "/devices/dev-auth", otherHost, 401},
		"device-scoped token":                            {"GET", "/devices/dev-auth", deviceScoped, 401},
		"registryRead cannot write":                      {"PUT", "/devices/new", e.serviceToken("registryRead", hour), 401},
		"device policy cannot read the registry":         {"GET", "/devices/dev-auth", e.serviceToken("device", hour), 401},
		"service policy cannot read the registry":        {"GET", "/devices/", e.serviceToken("service", hour), 401},
		"registryRead cannot use /hubsim/":               {"GET", "/hubsim/connections", e.serviceToken("registryRead", hour), 401},
		"service uses /hubsim/":                          {"GET", "/hubsim/connections", e.serviceToken("service", hour), 200},
		"unknown routes need auth too":                   {"GET", "/nothing", "SharedAccessSignature sr=x&sig=eA%3D%3D&se=1", 401},
	} {
		t.Run(name, func(t *testing.T) {
			var body []byte
			if c.method == "PUT" {
				body = []byte(`{"deviceId":"new"}`)
			}
			r := e.do(c.method, c.path, body, c.auth)
			if r.status != c.want {
				t.Fatalf("%d %s", r.status, r.body)
			}
			if c.want == 401 && r.errorCode(t) != "IotHubUnauthorizedAccess" {
				t.Fatalf("body %s", r.body)
			}
		})
	}
	if r := e.do("GET", "/devices/", nil, "-"); r.status != 401 {
		t.Fatalf("no scheme: %d", r.status)
	}
	if r := e.do("GET", "/devices/", nil, "none"); r.status != 401 {
		t.Fatalf("no header: %d", r.status)
	}
}

func TestBadRequestBodies(t *testing.T) {
	e := newEnv(t)
	for name, body := range map[string][]byte{
		"malformed JSON": []byte(`{"deviceId":"bad",`),
		"wrong type":     []byte(`{"deviceId":"bad","status":5}`),
		"empty":          nil,
		"invalid UTF-8":  []byte("{\"deviceId\":\"bad\",\"statusReason\":\"\xff\xfe\"}"),
		"oversize":       append(append([]byte(`{"deviceId":"bad","statusReason":"`), bytes.Repeat([]byte("a"), 1<<20)...), `"}`...),
		"bad status":     []byte(`{"deviceId":"bad","status":"maybe"}`),
		"bad auth type":  []byte(`{"deviceId":"bad","authentication":{"type":"psk"}}`),
	} {
		t.Run(name, func(t *testing.T) {
			r := e.do("PUT", "/devices/bad", body, "")
			if r.status != 400 {
				t.Fatalf("%d %s", r.status, r.body)
			}
			var eb struct{ Message string }
			r.json(t, &eb)
			if !strings.HasPrefix(eb.Message, "ErrorCode:") {
				t.Fatalf("body %s", r.body)
			}
		})
	}
	if r := e.do("GET", "/devices/bad", nil, ""); r.status != 404 {
		t.Fatalf("a bad request changed the registry: %d", r.status)
	}
	if r := e.do("POST", "/hubsim/devices/bad/messages/devicebound", []byte(`{"body":`), ""); r.status != 400 {
		t.Fatalf("C2D malformed: %d", r.status)
	}
}

func TestRestartKeepsState(t *testing.T) {
	dir := t.TempDir()
	e := newEnvIn(t, dir)
	d := e.createSAS("dev-persist")
	ca, _ := pki.NewCA("persisted CA", time.Hour)
	if _, err := e.srv.Registry().AddCACertificate("persisted", ca.CertPEM()); err != nil {
		t.Fatal(err)
	}
	_ = e.connectSAS(d) // leaves connection state to persist
	policies := e.srv.Registry().Policies()
	caPEM, _ := os.ReadFile(filepath.Join(dir, "ca.pem"))
	ep := e.srv.Endpoints()
	if _, err := os.Stat(filepath.Join(dir, hubsim.EndpointsFile)); err != nil {
		t.Fatalf("endpoints.json: %v", err)
	}
	var onDisk hubsim.Endpoints
	b, _ := os.ReadFile(filepath.Join(dir, hubsim.EndpointsFile))
	if err := json.Unmarshal(b, &onDisk); err != nil || onDisk != ep {
		t.Fatalf("endpoints.json %s vs %+v", b, ep)
	}
	cs, err := connstr.Parse(ep.ServiceConnectionString)
	if err != nil || cs.HostName != "localhost" || cs.SharedAccessKeyName != "iothubowner" {
		t.Fatalf("connection string: %+v %v", cs, err)
	}
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, hubsim.EndpointsFile)); !os.IsNotExist(err) {
		t.Fatalf("endpoints.json left after Close: %v", err)
	}

	e2 := newEnvIn(t, dir)
	got, err := e2.srv.Registry().Get(d.DeviceID)
	if err != nil || got.Authentication.SymmetricKey != d.Authentication.SymmetricKey || got.ETag != d.ETag ||
		got.GenerationID != d.GenerationID || got.ConnectionState != registry.Disconnected || got.LastActivityTime.IsZero() {
		t.Fatalf("after restart: %+v %v", got, err)
	}
	p := e2.srv.Registry().Policies()
	if len(p) != len(policies) {
		t.Fatalf("policies changed")
	}
	for i := range p {
		if p[i].KeyName != policies[i].KeyName || p[i].Rights != policies[i].Rights ||
			p[i].PrimaryKey != policies[i].PrimaryKey || p[i].SecondaryKey != policies[i].SecondaryKey {
			t.Fatalf("policy %s changed", p[i].KeyName)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "ca.pem")); !bytes.Equal(b, caPEM) {
		t.Fatalf("CA changed")
	}
	if cas := e2.srv.Registry().CACertificates(); len(cas) != 1 || cas[0].Name != "persisted" {
		t.Fatalf("CAs: %+v", cas)
	}
	_ = e2.connectSAS(d) // old keys and the old CA still work
}

func TestZeroConfigStarts(t *testing.T) {
	// The zero Config works (ports 8883/8443 may be taken on a shared machine, so only the
	// addresses are overridden) and an ephemeral state directory is removed on Close.
	srv, err := hubsim.Start(context.Background(), hubsim.Config{MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := srv.StateDir()
	if srv.Endpoints().HubHostName != "localhost" {
		t.Fatalf("host %q", srv.Endpoints().HubHostName)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("ephemeral state directory left: %v", err)
	}
	if _, err := hubsim.Start(context.Background(), hubsim.Config{HostName: "localhost:8883"}, nil); err == nil {
		t.Fatal("a host name with a port was accepted")
	}
}
