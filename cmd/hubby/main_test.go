package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/connstr"
	"github.com/iothubby/iothubby/pkg/hubsim"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func hubby(t *testing.T, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errOut bytes.Buffer
	err := run(ctx, args, &out, &errOut)
	return out.String(), err
}

func TestDeviceCommandsAgainstHubsim(t *testing.T) {
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	st := "--hubsim-state=" + srv.StateDir()

	out, err := hubby(t, st, "device", "create", "d1")
	if err != nil || !strings.Contains(out, "d1") || !strings.Contains(out, "enabled") {
		t.Fatalf("create: %q %v", out, err)
	}
	if _, err := hubby(t, st, "device", "create", "d1"); err == nil || !strings.Contains(err.Error(), "DeviceAlreadyExists") {
		t.Fatalf("second create: %v", err)
	}
	if _, err := hubby(t, st, "device", "create", "d1", "--if-missing"); err != nil {
		t.Fatalf("create --if-missing: %v", err)
	}
	if _, err := hubby(t, st, "device", "create", "d2", "--disabled", "--primary-thumbprint", strings.Repeat("ab", 20)); err != nil {
		t.Fatal(err)
	}
	out, err = hubby(t, st, "-o", "json", "device", "list")
	if err != nil {
		t.Fatal(err)
	}
	var list []map[string]any
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 2 {
		t.Fatalf("list json %q: %v", out, err)
	}
	out, err = hubby(t, st, "device", "connection-string", "d1")
	if err != nil {
		t.Fatal(err)
	}
	cs, err := connstr.Parse(strings.TrimSpace(out))
	if err != nil || cs.DeviceID != "d1" || cs.SharedAccessKey == "" || cs.GatewayHostName != srv.Endpoints().MQTTAddress {
		t.Fatalf("connection string %q: %+v %v", out, cs, err)
	}
	out, _ = hubby(t, st, "device", "connection-string", "d2")
	if !strings.Contains(out, "x509=true") {
		t.Fatalf("x509 device connection string %q", out)
	}
	if _, err := hubby(t, st, "device", "delete", "d1"); err != nil {
		t.Fatal(err)
	}
	if _, err := hubby(t, st, "device", "get", "d1"); err == nil || !strings.Contains(err.Error(), "DeviceNotFound") {
		t.Fatalf("get after delete: %v", err)
	}
}

func TestNoHubIsAClearError(t *testing.T) {
	t.Setenv("IOTHUB_CONNECTION_STRING", "")
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	_, err := hubby(t, "device", "list")
	if err == nil || !strings.Contains(err.Error(), "no hub given") {
		t.Fatalf("err = %v", err)
	}
	_, err = hubby(t, "-o", "yaml", "--connection-string", "HostName=h;SharedAccessKeyName=p;SharedAccessKey=AAAA", "device", "list")
	if err == nil || !strings.Contains(err.Error(), "--output") {
		t.Fatalf("err = %v", err)
	}
}

func TestTwinCommandsAgainstHubsim(t *testing.T) {
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	st := "--hubsim-state=" + srv.StateDir()
	if _, err := hubby(t, st, "device", "create", "t1"); err != nil {
		t.Fatal(err)
	}
	out, err := hubby(t, st, "-o", "json", "twin", "update", "t1", "--desired", "interval=5", "--desired", "net.mode=eco", "--tag", "site=\"lab\"")
	if err != nil {
		t.Fatalf("update: %v", err)
	}
	var tw struct {
		ETag       string
		Tags       map[string]any
		Properties struct{ Desired map[string]any }
	}
	if err := json.Unmarshal([]byte(out), &tw); err != nil {
		t.Fatalf("%q: %v", out, err)
	}
	if tw.Properties.Desired["interval"] != 5.0 || tw.Tags["site"] != "lab" ||
		tw.Properties.Desired["net"].(map[string]any)["mode"] != "eco" || tw.Properties.Desired["$version"] != 2.0 {
		t.Fatalf("after update: %+v", tw)
	}
	if _, err := hubby(t, st, "twin", "update", "t1", "--desired", "x=1", "--etag", "AAAAAAAAAAA="); err == nil || !strings.Contains(err.Error(), "PreconditionFailed") {
		t.Fatalf("stale etag: %v", err)
	}
	if _, err := hubby(t, st, "twin", "update", "t1", "--patch", `{"properties":{"desired":{"a.b":1}}}`); err == nil || !strings.Contains(err.Error(), "ArgumentInvalid") {
		t.Fatalf("bad key: %v", err)
	}
	if _, err := hubby(t, st, "twin", "update", "t1", "--patch", `{"a":1,"a":2}`); err == nil || !strings.Contains(err.Error(), "duplicate") {
		t.Fatalf("duplicate key: %v", err)
	}
	if _, err := hubby(t, st, "twin", "update", "t1"); err == nil || !strings.Contains(err.Error(), "nothing to change") {
		t.Fatalf("empty update: %v", err)
	}
	if _, err := hubby(t, st, "twin", "replace", "t1", "--etag", tw.ETag, "--patch", `{"properties":{"desired":{"only":true}}}`); err != nil {
		t.Fatalf("replace: %v", err)
	}
	out, err = hubby(t, st, "twin", "get", "t1")
	if err != nil || !strings.Contains(out, `desired:  {"only":true}`) || !strings.Contains(out, "tags:     {}") {
		t.Fatalf("get after replace: %q %v", out, err)
	}
}
