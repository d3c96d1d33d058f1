package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/twinsync"
	"github.com/iothubby/iothubby/pkg/wire"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const keyB64 = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=" // hubtest's key: 32 bytes of 7

func writeFile(t *testing.T, name, content string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestParseConfigExample(t *testing.T) {
	b, err := os.ReadFile("../../configs/agent.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c, err := agent.ParseConfig(b)
	if err != nil {
		t.Fatalf("configs/agent.yaml: %v", err)
	}
	if c.Connection.TokenTTL != time.Hour || c.Connection.KeepAlive != 120*time.Second || c.Telemetry.Interval != 10*time.Second ||
		c.ShutdownTimeout != 5*time.Second || c.Queue.Capacity != 1000 || c.Telemetry.Properties["source"] != "iothubby" ||
		c.Log.Format != "console" || c.Transport != "mqtt" {
		t.Errorf("parsed %+v", c)
	}
	if _, err := agent.ParseTemplate(c.Telemetry.Template); err != nil {
		t.Error(err)
	}
	if c.StateDir == "" || c.Twin.Properties["firmware.channel"].Delay != 5*time.Second ||
		c.Twin.Properties["serialNumber"].Status != 400 || len(c.Twin.Properties["led"].Command) != 3 {
		t.Errorf("twin section parsed as %+v (stateDir %q)", c.Twin, c.StateDir)
	}
	if m := c.Methods; len(m) != 4 || !m["echo"].Echo || m["flaky"].Delay != 500*time.Millisecond || m["flaky"].FailureStatus != 503 ||
		len(m["diagnostics"].Command) != 3 || c.MethodTimeout != 30*time.Second || c.MaxConcurrentMethods != 8 {
		t.Errorf("methods parsed as %+v", m)
	}
	for name, sc := range c.Methods {
		if _, err := sc.Handler(nil); err != nil {
			t.Errorf("methods.%s: %v", name, err)
		}
	}
}

func TestParseConfigErrors(t *testing.T) {
	for name, y := range map[string]string{
		"unknown field": "deviceID: x\n", // wrong case: deviceId
		"bad duration":  "shutdownTimeout: soon\n",
		"wrong type":    "queue:\n  capacity: many\n",
		"not a mapping": "- a\n- b\n",
	} {
		if _, err := agent.ParseConfig([]byte(y)); !errors.Is(err, agent.ErrConfig) {
			t.Errorf("%s: err = %v, want ErrConfig", name, err)
		}
	}
	c, err := agent.ParseConfig(nil)
	if err != nil || c.Telemetry.Template != agent.DefaultTemplate || c.ShutdownTimeout != agent.DefaultShutdownTimeout {
		t.Errorf("empty config: %+v, %v", c, err)
	}
}

func TestIdentityErrors(t *testing.T) {
	secretKey := keyB64
	cases := map[string]func(c *agent.Config){
		"nothing": func(c *agent.Config) {},
		"service string": func(c *agent.Config) {
			c.ConnectionString = "HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey=" + secretKey
		},
		"missing host": func(c *agent.Config) { c.ConnectionString = "DeviceId=d;SharedAccessKey=" + secretKey },
		"unknown key": func(c *agent.Config) {
			c.ConnectionString = "HostName=h;DeviceId=d;SharedAccessKey=" + secretKey + ";Colour=red"
		},
		"bad key":         func(c *agent.Config) { c.ConnectionString = "HostName=h;DeviceId=d;SharedAccessKey=***" },
		"string and file": func(c *agent.Config) { c.ConnectionString = "x"; c.ConnectionStringFile = "y" },
		"string and host": func(c *agent.Config) {
			c.ConnectionString = "HostName=h;DeviceId=d;SharedAccessKey=" + secretKey
			c.Host = "h"
		},
		"x509 without cert": func(c *agent.Config) { c.ConnectionString = "HostName=h;DeviceId=d;x509=true" },
		"host without key":  func(c *agent.Config) { c.Host = "h"; c.DeviceID = "d" },
		"key and key file": func(c *agent.Config) {
			c.Host, c.DeviceID, c.Auth.SymmetricKey, c.Auth.SymmetricKeyFile = "h", "d", secretKey, "f"
		},
		"bad template": func(c *agent.Config) {
			c.Host, c.DeviceID, c.Auth.SymmetricKey, c.Telemetry.Template = "h", "d", secretKey, "{{.Nope}}"
		},
		"renewAt too late": func(c *agent.Config) {
			c.Host, c.DeviceID, c.Auth.SymmetricKey, c.Connection.RenewAt = "h", "d", secretKey, 0.95
		},
		"missing string file": func(c *agent.Config) { c.ConnectionStringFile = "/nonexistent/cs" },
		"invalid device id":   func(c *agent.Config) { c.Host, c.DeviceID, c.Auth.SymmetricKey = "h", "bad/id", secretKey },
		"unknown transport": func(c *agent.Config) {
			c.Host, c.DeviceID, c.Auth.SymmetricKey, c.Transport = "h", "d", secretKey, "amqp-ws"
		},
	}
	for name, mutate := range cases {
		c := agent.Default()
		mutate(&c)
		_, err := agent.New(c, nil)
		if !errors.Is(err, agent.ErrConfig) {
			t.Errorf("%s: err = %v, want ErrConfig", name, err)
			continue
		}
		if strings.Contains(err.Error(), secretKey) {
			t.Errorf("%s: error shows the key: %v", name, err)
		}
	}
}

func TestConnectionStringFilePermissions(t *testing.T) {
	cs := "HostName=hub.test;DeviceId=dev1;SharedAccessKey=" + keyB64
	open := writeFile(t, "cs", cs, 0o644)
	c := agent.Default()
	c.ConnectionStringFile = open
	_, err := agent.New(c, nil)
	if !errors.Is(err, agent.ErrConfig) || !strings.Contains(err.Error(), "group or others") {
		t.Fatalf("err = %v", err)
	}
	c.Auth.AllowInsecureKeyFile = true
	if _, err := agent.New(c, nil); err != nil {
		t.Fatal(err)
	}
	c = agent.Default()
	c.ConnectionStringFile = writeFile(t, "cs", cs+"\n", 0o600)
	d, err := agent.New(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d.DeviceID() != "dev1" {
		t.Errorf("device %q", d.DeviceID())
	}
}

// deviceConfig returns a config for device dev1 against b.
func deviceConfig(t *testing.T, b *hubtest.Broker) agent.Config {
	c := agent.Default()
	c.ConnectionString = "HostName=" + hubtest.Host + ";DeviceId=dev1;SharedAccessKey=" + keyB64
	c.Address = b.Addr
	c.TLS.CAFile = writeFile(t, "ca.pem", string(b.CAPEM), 0o644)
	c.Telemetry.Interval = 20 * time.Millisecond
	c.Telemetry.Template = `{"deviceId":"{{.DeviceID}}","seq":{{.Seq}},"t":{{randFloat 1 2}},"n":{{randInt 1 3}}}`
	c.Telemetry.Properties = map[string]string{"source": "test"}
	return c
}

func TestDeviceRunSendsTelemetryAndStopsCleanly(t *testing.T) {
	b := hubtest.NewBroker(t)
	core, logs := observer.New(zap.DebugLevel)
	d, err := agent.New(deviceConfig(t, b), zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()

	waitfor.True(t, "three telemetry messages", func() bool { return len(b.TelemetryMIDs()) >= 3 })
	b.Publish("devices/dev1/messages/devicebound/%24.mid=c2d-1&k=v", []byte("hi"), 1)
	waitLog(t, logs, agent.MsgC2D)
	waitLog(t, logs, twinsync.MsgTwinSynced)
	waitLog(t, logs, twinsync.MsgReportedConfirmed) // the agent facts
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}

	var first wire.Topic
	b.With(func(h *hubtest.Hook) { first = h.Telemetry[0] })
	if v, _ := first.Properties.Get("source"); v != "test" {
		t.Errorf("properties %v", first.Properties)
	}
	if ct, _ := first.Properties.Get(wire.PropContentType); ct != "application/json" {
		t.Errorf("content type %q", ct)
	}
	mids := b.TelemetryMIDs()
	if !strings.HasPrefix(mids[0], "dev1-") || !strings.HasSuffix(mids[0], "-1") {
		t.Errorf("message id %q", mids[0])
	}

	conn := logs.FilterMessage(hub.MsgConnected).All()
	if len(conn) == 0 {
		t.Fatal("no \"connected\" log line")
	}
	f := conn[0].ContextMap()
	if f["device"] != "dev1" || f["status"] != "Connected" || f["reason"] != "Connection_Ok" {
		t.Errorf("connected fields %v", f)
	}
	c2d := logs.FilterMessage(agent.MsgC2D).All()[0].ContextMap()
	if c2d["message_id"] != "c2d-1" || c2d["body"] != "hi" {
		t.Errorf("c2d fields %v", c2d)
	}
	for _, e := range logs.All() {
		line, _ := json.Marshal(e.ContextMap())
		if strings.Contains(string(line), keyB64) || strings.Contains(string(line), "sig=") {
			t.Errorf("secret in log %q: %s", e.Message, line)
		}
	}
}

func TestDeviceRunNotAuthorized(t *testing.T) {
	b := hubtest.NewBroker(t)
	b.With(func(h *hubtest.Hook) { h.RefuseAll = 5 })
	d, err := agent.New(deviceConfig(t, b), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	err = d.Run(ctx)
	if !errors.Is(err, hub.ErrNotAuthorized) {
		t.Fatalf("Run: %v, want ErrNotAuthorized", err)
	}
	if n := len(b.ConnectRecords()); n != 1 {
		t.Errorf("connect attempts %d", n)
	}
}

func TestDeviceClose(t *testing.T) {
	b := hubtest.NewBroker(t)
	d, err := agent.New(deviceConfig(t, b), nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Run(context.Background()) }()
	b.WaitEvent(t, "subscribed")
	d.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// Close needs no Run: it returns at once, and a Run after it refuses to start (the done channel
// Close waits on is closed by whichever of Run and Close comes first).
func TestDeviceCloseWithoutRun(t *testing.T) {
	b := hubtest.NewBroker(t)
	d, err := agent.New(deviceConfig(t, b), nil)
	if err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	go func() { d.Close(); d.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close without Run did not return")
	}
	if err := d.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("Run after Close: %v", err)
	}
	if n := len(b.ConnectRecords()); n != 0 {
		t.Fatalf("%d connects after Close", n)
	}
}

func waitLog(t *testing.T, logs *observer.ObservedLogs, msg string) {
	t.Helper()
	waitfor.True(t, fmt.Sprintf("a %q log line", msg), func() bool { return logs.FilterMessage(msg).Len() > 0 })
}

func TestTwinConfigValidation(t *testing.T) {
	base := "connectionString: \"HostName=hub.test;DeviceId=dev1;SharedAccessKey=" + keyB64 + "\"\n"
	good := base + `twin:
  firmwareVersion: "2.0"
  reported: {site: lab, rack: {row: 3}}
  default: {action: reject, status: 403}
  properties:
    a: {action: accept}
    b.c: {action: delay, delay: 2s}
    d: {action: command, command: [/bin/true], timeout: 1s}
    e: {action: ignore}
`
	c, err := agent.ParseConfig([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := agent.New(c, nil); err != nil {
		t.Fatalf("valid twin config refused: %v", err)
	}
	for name, bad := range map[string]string{
		"unknown action":   "twin:\n  properties:\n    a: {action: dance}\n",
		"delay without":    "twin:\n  properties:\n    a: {action: delay}\n",
		"reject 200":       "twin:\n  default: {action: reject, status: 200}\n",
		"command without":  "twin:\n  properties:\n    a: {action: command}\n",
		"bad path":         "twin:\n  properties:\n    \"a b\": {action: accept}\n",
		"bad reported key": "twin:\n  reported: {\"x$\": 1}\n",
		"unknown field":    "twin:\n  properties:\n    a: {action: accept, dealy: 1s}\n",
	} {
		c, err := agent.ParseConfig([]byte(base + bad))
		if err == nil {
			_, err = agent.New(c, nil)
		}
		if !errors.Is(err, agent.ErrConfig) {
			t.Errorf("%s: err = %v, want ErrConfig", name, err)
		}
	}
}
