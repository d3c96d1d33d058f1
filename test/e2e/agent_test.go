//go:build e2e

package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/connstr"
	hubsess "github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/service"
)

// newHub starts hubsim on free ports with a fresh state directory.
func newHub(t *testing.T) *hub {
	return startHub(t, t.TempDir(), "127.0.0.1:0", "127.0.0.1:0")
}

func createDevice(t *testing.T, h *hub, id string) service.Device {
	t.Helper()
	d, err := h.svc.CreateDevice(ctxT(t), service.Device{DeviceID: id, Status: "enabled"})
	if err != nil {
		t.Fatalf("create %s: %v", id, err)
	}
	if d.Authentication.SymmetricKey.PrimaryKey == "" {
		t.Fatalf("device %s has no generated key: %+v", id, d.Authentication)
	}
	return d
}

// connString is the device connection string the agent reads from a 0600 file.
func connString(h *hub, id, key string) string {
	return connstr.ConnectionString{HostName: h.ep.HubHostName, DeviceID: id, SharedAccessKey: key, GatewayHostName: h.ep.MQTTAddress}.String()
}

func writeSecret(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// startAgent runs `agent run` with JSON logs at debug level, telemetry every 200 ms, and extra
// YAML appended to the configuration.
func startAgent(t *testing.T, h *hub, cs, extraYAML string) *proc {
	t.Helper()
	cfg := fmt.Sprintf(`log:
  format: json
  level: debug
tls:
  caFile: %q
telemetry:
  interval: 200ms
  properties:
    source: e2e
    unit: celsius
%s`, h.ep.CAFile, extraYAML)
	cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return startProc(t, "agent", "run", "--config", cfgPath, "--connection-string-file", writeSecret(t, "cs", cs))
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err == nil {
		return 0
	}
	return -1
}

// The main path: a device created over REST, the agent's telemetry recorded by hubsim with its
// properties and IoT Hub's stamps, a cloud-to-device message delivered with its properties, and
// a clean SIGTERM shutdown with nothing lost.
func TestAgentTelemetryAndCloudToDevice(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-dev1")
	a := startAgent(t, h, connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey), "")
	a.await(0, "connected", and(msgIs(hubsess.MsgConnected), field("device", "e2e-dev1"), field("reason", "Connection_Ok")))

	var msgs []service.RecordedMessage
	eventually(t, "two telemetry messages recorded", func() error {
		var err error
		msgs, err = h.svc.Telemetry(ctxT(t), d.DeviceID)
		if err == nil && len(msgs) < 2 {
			err = fmt.Errorf("%d messages so far", len(msgs))
		}
		return err
	})
	m := msgs[0]
	var body map[string]any
	if err := json.Unmarshal(m.Body, &body); err != nil || body["deviceId"] != "e2e-dev1" {
		t.Fatalf("telemetry body %q: %v", m.Body, err)
	}
	if v := m.Properties["source"]; v == nil || *v != "e2e" {
		t.Errorf("app property source = %v", v)
	}
	if v := m.Properties["unit"]; v == nil || *v != "celsius" {
		t.Errorf("app property unit = %v", v)
	}
	sp := m.SystemProperties
	if sp["content-type"] != "application/json" || sp["content-encoding"] != "utf-8" {
		t.Errorf("content type/encoding: %v", sp)
	}
	if !strings.HasPrefix(sp["message-id"], "e2e-dev1-") {
		t.Errorf("message-id %q", sp["message-id"])
	}
	if sp["iothub-connection-device-id"] != "e2e-dev1" || !strings.Contains(sp["iothub-connection-auth-method"], `"sas"`) ||
		sp["iothub-enqueuedtime"] == "" {
		t.Errorf("IoT Hub stamps missing: %v", sp)
	}

	mark := a.numLines()
	id, err := h.svc.SendC2D(ctxT(t), d.DeviceID, service.C2DMessage{Body: `{"cmd":"blink"}`, MessageID: "c2d-e2e-1",
		CorrelationID: "corr-7", ContentType: "application/json", Properties: map[string]string{"k1": "v1", "k2": "v2"}})
	if err != nil || id != "c2d-e2e-1" {
		t.Fatalf("send c2d: %q %v", id, err)
	}
	a.await(mark, "the cloud-to-device message", func(l map[string]any) bool {
		if l["msg"] != agent.MsgC2D || l["message_id"] != "c2d-e2e-1" || l["correlation_id"] != "corr-7" {
			return false
		}
		p, _ := l["properties"].(map[string]any)
		return p["k1"] == "v1" && p["k2"] == "v2" && l["body"] == `{"cmd":"blink"}`
	})

	if err := a.stop(); err != nil {
		t.Fatalf("agent exit after SIGTERM: %v", err)
	}
	i := a.await(0, "the stop summary", msgIs(agent.MsgStopped))
	if f := a.lines[i]["failed"]; fmt.Sprint(f) != "0" {
		t.Fatalf("messages failed at shutdown: %v", f)
	}
	// Everything the agent says it delivered is in hubsim's record.
	delivered := fmt.Sprint(a.lines[i]["delivered"])
	msgs, err = h.svc.Telemetry(ctxT(t), d.DeviceID)
	if err != nil || fmt.Sprint(len(msgs)) != delivered {
		t.Fatalf("agent delivered %s, hubsim recorded %d (%v)", delivered, len(msgs), err)
	}
}

// A token lifetime of a few seconds gives planned renewals and no unauthorised disconnects.
func TestTokenRenewal(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-renew")
	a := startAgent(t, h, connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey), "connection:\n  tokenTTL: 3s\n")
	renewal := and(msgIs(hubsess.MsgDisconnectedRetrying), field("reason", "Expired_SAS_Token"))
	from := 0
	for range 3 {
		from = a.await(from, "a planned token renewal", renewal) + 1
		from = a.await(from, "the reconnect after renewal", msgIs(hubsess.MsgConnected)) + 1
	}
	if n := a.count(field("reason", "Bad_Credential")); n != 0 {
		t.Errorf("agent saw %d Bad_Credential events", n)
	}
	if n := h.count(func(l map[string]any) bool { return strings.Contains(fmt.Sprint(l["msg"]), "CONNACK 5") }); n != 0 {
		t.Errorf("hubsim refused %d connections", n)
	}
	if n := h.count(field("reason", "SAS token expired")); n != 0 {
		t.Errorf("hubsim closed %d connections for an expired token", n)
	}
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
	i := a.await(0, "the stop summary", msgIs(agent.MsgStopped))
	if f := fmt.Sprint(a.lines[i]["failed"]); f != "0" {
		t.Fatalf("%s messages failed across renewals", f)
	}
}

// hubsim restarted on the same state directory: the device is still registered and the agent
// reconnects by itself.
func TestHubsimRestartKeepsDevice(t *testing.T) {
	state := t.TempDir()
	mqttAddr, httpsAddr := freeAddr(t), freeAddr(t)
	h := startHub(t, state, mqttAddr, httpsAddr)
	d := createDevice(t, h, "e2e-restart")
	a := startAgent(t, h, connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey), "")
	a.await(0, "connected", msgIs(hubsess.MsgConnected))

	if err := h.stop(); err != nil {
		t.Fatalf("hubsim exit after SIGTERM: %v", err)
	}
	if _, err := os.Stat(filepath.Join(state, "endpoints.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("endpoints.json left behind after a clean stop: %v", err)
	}
	lost := a.await(0, "the agent noticing the hub went away", msgIs(hubsess.MsgDisconnectedRetrying))

	h2 := startHub(t, state, mqttAddr, httpsAddr)
	a.await(lost, "the reconnect to the restarted hubsim", msgIs(hubsess.MsgConnected))
	got, err := h2.svc.GetDevice(ctxT(t), d.DeviceID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Authentication.SymmetricKey.PrimaryKey != d.Authentication.SymmetricKey.PrimaryKey || got.ETag != d.ETag {
		t.Fatalf("device changed across restart: %+v", got)
	}
	eventually(t, "telemetry after the restart", func() error {
		msgs, err := h2.svc.Telemetry(ctxT(t), d.DeviceID)
		if err == nil && len(msgs) == 0 {
			err = errors.New("none yet")
		}
		return err
	})
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}

// A wrong key gives CONNACK 5, one clear agent error and exit status 3: no retry loop.
func TestWrongKeyFailsOnce(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-wrongkey")
	wrong := d.Authentication.SymmetricKey.SecondaryKey[:10] + "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	a := startAgent(t, h, connString(h, d.DeviceID, wrong), "")
	err := a.waitExit()
	if code := exitCode(err); code != 3 {
		t.Fatalf("agent exit code %d (%v), want 3 (not authorized)", code, err)
	}
	a.await(0, "a Bad_Credential status", and(msgIs(hubsess.MsgDisconnected), field("reason", "Bad_Credential")))
	refused := func(l map[string]any) bool { return strings.Contains(fmt.Sprint(l["msg"]), "CONNACK 5") }
	h.await(0, "hubsim's refusal", refused)
	if n := h.count(refused); n != 1 {
		t.Fatalf("hubsim refused %d connection attempts, want exactly 1", n)
	}
	if n := a.count(msgIs(hubsess.MsgConnected)); n != 0 {
		t.Fatalf("agent reported connected %d times", n)
	}
	raw := strings.Join(a.raw, "\n")
	if strings.Contains(raw, wrong) || strings.Contains(raw, "sig=") {
		t.Fatal("the key or a signature reached the agent's log")
	}
}
