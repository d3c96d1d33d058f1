package dps_test

import (
	"crypto/x509"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/dps"
)

// fakeDPS answers register and poll requests from a script of (status, retry-after, body).
func fakeDPS(t *testing.T, script []string) (*httptest.Server, *atomic.Int64) {
	var n atomic.Int64
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := int(n.Add(1) - 1)
		if i >= len(script) {
			i = len(script) - 1
		}
		status, body, _ := strings.Cut(script[i], " ")
		w.Header().Set("Content-Type", "application/json")
		if status == "503" || status == "429" || status == "202" {
			w.Header().Set("Retry-After", "0")
		}
		code := map[string]int{"200": 200, "202": 202, "400": 400, "429": 429, "503": 503}[status]
		w.WriteHeader(code)
		_, _ = w.Write([]byte(body))
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

func fakeCfg(t *testing.T, srv *httptest.Server) dps.Config {
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	cred, err := attest.FromBase64Key(groupKey)
	if err != nil {
		t.Fatal(err)
	}
	return dps.Config{Endpoint: strings.TrimPrefix(srv.URL, "https://"), ServerName: "example.com", RootCAs: pool,
		IDScope: "s", RegistrationID: "r", Transport: dps.HTTPS, Credential: cred,
		BackoffMin: 10 * time.Millisecond, BackoffMax: 20 * time.Millisecond, Timeout: 20 * time.Second}
}

const assigned = `200 {"operationId":"o","status":"assigned","registrationState":{"registrationId":"r","assignedHub":"h","deviceId":"d","status":"assigned"}}`

func TestRetries5xxAnd429ThenSucceeds(t *testing.T) {
	srv, n := fakeDPS(t, []string{`503 {"errorCode":503000,"message":"busy"}`, `429 {"errorCode":429001,"message":"slow down"}`,
		`202 {"operationId":"o","status":"assigning"}`, `202 {"operationId":"o","status":"assigning"}`, assigned})
	res, err := dps.Register(ctxT(t), fakeCfg(t, srv))
	if err != nil || res.AssignedHub != "h" || res.DeviceID != "d" {
		t.Fatalf("%+v %v", res, err)
	}
	if n.Load() != 5 {
		t.Fatalf("%d requests", n.Load())
	}
}

func TestOther4xxFailsAtOnce(t *testing.T) {
	srv, n := fakeDPS(t, []string{`400 {"errorCode":400004,"message":"bad request body"}`})
	_, err := dps.Register(ctxT(t), fakeCfg(t, srv))
	if !errors.Is(err, dps.ErrRefused) || !strings.Contains(err.Error(), "400004") {
		t.Fatalf("%v", err)
	}
	if n.Load() != 1 {
		t.Fatalf("%d requests: a 400 must not be retried", n.Load())
	}
}

func TestFailedStatusAndBadReply(t *testing.T) {
	srv, _ := fakeDPS(t, []string{`202 {"operationId":"o","status":"assigning"}`,
		`200 {"operationId":"o","status":"failed","registrationState":{"registrationId":"r","status":"failed","errorCode":400207,"errorMessage":"allocation failed"}}`})
	if _, err := dps.Register(ctxT(t), fakeCfg(t, srv)); !errors.Is(err, dps.ErrRefused) || !strings.Contains(err.Error(), "allocation failed") {
		t.Fatalf("%v", err)
	}
	srv, _ = fakeDPS(t, []string{`200 {"operationId":"o","status":"assigned"}`})
	if _, err := dps.Register(ctxT(t), fakeCfg(t, srv)); !errors.Is(err, dps.ErrRefused) {
		t.Fatalf("assigned without a hub: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	cred, _ := attest.FromBase64Key(groupKey)
	for name, c := range map[string]dps.Config{
		"no scope":    {RegistrationID: "r", Credential: cred},
		"bad id":      {IDScope: "s", RegistrationID: "a b", Credential: cred},
		"no cred":     {IDScope: "s", RegistrationID: "r"},
		"transport":   {IDScope: "s", RegistrationID: "r", Credential: cred, Transport: "amqp"},
		"bad payload": {IDScope: "s", RegistrationID: "r", Credential: cred, Payload: []byte(`[1]`)},
	} {
		if _, err := dps.Register(ctxT(t), c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
