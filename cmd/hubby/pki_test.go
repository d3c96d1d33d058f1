package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/dps"
	"github.com/iothubby/iothubby/pkg/hubsim"
)

// The test PKI helper's certificates provision through hubsim's DPS with the group it enrolls.
func TestPKIEnrollAndProvision(t *testing.T) {
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", DPSRetryAfter: -1}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	dir := filepath.Join(t.TempDir(), "pki")
	out, err := hubby(t, "--hubsim-state="+srv.StateDir(), "pki", "--dir", dir, "--devices", "pki-dev-1,pki-dev-2", "--enroll")
	if err != nil || !strings.Contains(out, "enrollment group iothubby-test-pki") {
		t.Fatalf("%q %v", out, err)
	}
	fi, err := os.Stat(filepath.Join(dir, "pki-dev-2.key"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi, err)
	}
	cred, err := attest.FromX509Files(filepath.Join(dir, "pki-dev-2.pem"), filepath.Join(dir, "pki-dev-2.key"), attest.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ep := srv.Endpoints()
	res, err := dps.Register(ctx, dps.Config{Endpoint: ep.HTTPSAddress, ServerName: "localhost", RootCAs: srv.CA().Pool(),
		IDScope: ep.IDScope, RegistrationID: "pki-dev-2", Transport: dps.HTTPS, Credential: cred})
	if err != nil || res.DeviceID != "pki-dev-2" {
		t.Fatalf("%+v %v", res, err)
	}
	if _, err := hubby(t, "pki", "--dir", dir, "--devices", "bad/id"); err == nil {
		t.Fatal("bad device ID accepted")
	}
	if _, err := hubby(t, "pki", "--dir", dir, "--enroll"); err == nil || !strings.Contains(err.Error(), "--hubsim-state") {
		t.Fatalf("enroll without a DPS: %v", err)
	}
}
