//go:build e2e

package e2e

import (
	"crypto/ecdsa"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/dps"
	hubsess "github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

const e2eGroupKey = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="

func dpsClient(t *testing.T, h *hub) *service.Client {
	t.Helper()
	c, err := service.New(service.Config{ConnectionString: h.ep.DPSConnectionString, Address: h.ep.HTTPSAddress, CAFile: h.ep.CAFile})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func dpsStats(t *testing.T, c *service.Client) map[string]int64 {
	t.Helper()
	st, err := c.DPSStats(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// writeDPSConfig writes an agent configuration that provisions through h's DPS over transport
// with state directory state; yaml continues the dps block (indented keys) and may add
// top-level sections after it.
func writeDPSConfig(t *testing.T, h *hub, state, transport, yaml string) string {
	t.Helper()
	endpoint := h.ep.MQTTAddress
	if transport == "https" {
		endpoint = h.ep.HTTPSAddress
	}
	cfg := fmt.Sprintf(`log:
  format: json
  level: debug
tls:
  caFile: %q
  serverName: localhost
telemetry:
  interval: 500ms
stateDir: %q
dps:
  globalEndpoint: %q
  idScope: %q
  transport: %s
  hubAddress: %q
%s`, h.ep.CAFile, state, endpoint, h.ep.IDScope, transport, h.ep.MQTTAddress, yaml)
	cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfgPath
}

// startDPSAgent runs the agent with a DPS configuration (dps block and auth given in yaml) and
// the state directory state.
func startDPSAgent(t *testing.T, h *hub, state, transport, yaml string, args ...string) *proc {
	t.Helper()
	return startProc(t, "agent", append([]string{"run", "--config", writeDPSConfig(t, h, state, transport, yaml)}, args...)...)
}

func groupEnrollment(t *testing.T, c *service.Client, id string, extra map[string]any) {
	t.Helper()
	e := map[string]any{"enrollmentGroupId": id,
		"attestation": map[string]any{"type": "symmetricKey", "symmetricKey": map[string]any{"primaryKey": e2eGroupKey, "secondaryKey": e2eGroupKey}},
		"initialTwin": map[string]any{"tags": map[string]any{"site": "lab"}, "properties": map[string]any{"desired": map[string]any{"interval": 42}}}}
	for k, v := range extra {
		e[k] = v
	}
	if _, err := c.PutEnrollmentGroup(ctxT(t), id, e, ""); err != nil {
		t.Fatal(err)
	}
}

// A group symmetric-key enrollment provisions the agent over MQTT and over HTTPS; it connects to
// the assigned hub and sees the initial twin. A restart reuses the cached result (no new
// registration); deleting the device from the hub makes it provision again.
func TestDPSGroupSymmetricKey(t *testing.T) {
	h := newHub(t)
	c := dpsClient(t, h)
	groupEnrollment(t, c, "e2e-group", nil)
	for _, tr := range []string{"mqtt", "https"} {
		t.Run(tr, func(t *testing.T) {
			regID := "grp-dev-" + tr
			state := t.TempDir()
			yaml := fmt.Sprintf("  registrationId: %s\n  groupKeyFile: %q\n  payload:\n    modelId: \"dtmi:iothubby:e2e;1\"\n",
				regID, writeSecret(t, "group.key", e2eGroupKey))
			before := dpsStats(t, c)["registrations"]
			a := startDPSAgent(t, h, state, tr, yaml)
			a.await(0, "provisioned", and(msgIs(dps.MsgProvisioned), field("device", regID), field("substatus", "initialAssignment")))
			a.await(0, "connected", and(msgIs(hubsess.MsgConnected), field("device", regID)))
			awaitInitialTwin(t, h, a, regID)
			if n := dpsStats(t, c)["registrations"]; n != before+1 {
				t.Fatalf("registrations %d, want %d", n, before+1)
			}
			var rs map[string]any
			raw, err := c.RegistrationState(ctxT(t), regID)
			if err != nil || json.Unmarshal(raw, &rs) != nil || rs["status"] != "assigned" || rs["deviceId"] != regID {
				t.Fatalf("registration state %s %v", raw, err)
			}
			if err := a.stop(); err != nil {
				t.Fatal(err)
			}
			// Restart: the cached result is used, DPS sees nothing.
			a = startDPSAgent(t, h, state, tr, yaml)
			a.await(0, "the cached result", msgIs(agent.MsgUsingCachedProvisioning))
			a.await(0, "connected again", and(msgIs(hubsess.MsgConnected), field("device", regID)))
			if n := dpsStats(t, c)["registrations"]; n != before+1 {
				t.Fatalf("restart registered again: %d", n)
			}
			// Deleting the device from the hub: CONNACK 5 on reconnect, then a new registration.
			mark := a.numLines()
			if err := h.svc.DeleteDevice(ctxT(t), regID, ""); err != nil {
				t.Fatal(err)
			}
			a.await(mark, "reprovisioning", msgIs(agent.MsgReprovisioning))
			a.await(mark, "provisioned again", and(msgIs(dps.MsgProvisioned), field("device", regID)))
			a.await(mark, "connected after reprovisioning", and(msgIs(hubsess.MsgConnected), field("device", regID)))
			if n := dpsStats(t, c)["registrations"]; n != before+2 {
				t.Fatalf("registrations %d, want %d", n, before+2)
			}
			if err := a.stop(); err != nil {
				t.Fatal(err)
			}
		})
	}
	if st := dpsStats(t, c); st["earlyPolls"] != 0 {
		t.Fatalf("early polls: %v", st)
	}
}

// A disabled enrollment fails clearly: one registration attempt, an error naming the cause, a
// non-zero exit, no loop.
func TestDPSDisabledEnrollmentFailsClearly(t *testing.T) {
	h := newHub(t)
	c := dpsClient(t, h)
	groupEnrollment(t, c, "off", map[string]any{"provisioningStatus": "disabled"})
	a := startDPSAgent(t, h, t.TempDir(), "mqtt", fmt.Sprintf("  registrationId: off-dev\n  groupKey: %q\n", e2eGroupKey))
	select {
	case <-a.done:
	case <-time.After(waitTimeout):
		t.Fatal("agent did not exit")
	}
	if code := exitCode(a.err); code == 0 {
		t.Fatal("agent exited 0")
	}
	i := a.await(0, "the failure", msgIs(agent.MsgProvisioningFailed))
	if e := fmt.Sprint(a.lines[i]["error"]); !strings.Contains(e, "disabled") {
		t.Fatalf("error does not name the cause: %s", e)
	}
	if st := dpsStats(t, c); st["registerRequests"] != 1 {
		t.Fatalf("register requests %v, want 1", st)
	}
}

// 429 with retry-after is honoured: with a limit of one registration per 2 s, three agents
// started together all provision, hubsim throttles some, and no poll comes early.
func TestDPSThrottleHonoured(t *testing.T) {
	h := startHub(t, t.TempDir(), "127.0.0.1:0", "127.0.0.1:0", "--dps-rate", "0.5", "--dps-retry-after", "1")
	c := dpsClient(t, h)
	groupEnrollment(t, c, "busy", nil)
	var agents []*proc
	for i, tr := range []string{"mqtt", "https", "mqtt"} {
		agents = append(agents, startDPSAgent(t, h, t.TempDir(), tr, fmt.Sprintf("  registrationId: busy-%d\n  groupKey: %q\n", i, e2eGroupKey)))
	}
	for i, a := range agents {
		a.await(0, "provisioned", and(msgIs(dps.MsgProvisioned), field("device", fmt.Sprintf("busy-%d", i))))
	}
	st := dpsStats(t, c)
	if st["throttled"] == 0 || st["earlyPolls"] != 0 || st["registrations"] != 3 {
		t.Fatalf("stats %v", st)
	}
}

func writeChain(t *testing.T, dir, name string, c tls.Certificate) (string, string) {
	t.Helper()
	var certPEM []byte
	for _, der := range c.Certificate {
		certPEM = append(certPEM, "-----BEGIN CERTIFICATE-----\n"...)
		certPEM = append(certPEM, pemBody(der)...)
		certPEM = append(certPEM, "-----END CERTIFICATE-----\n"...)
	}
	keyPEM, err := pki.EncodeKey(c.PrivateKey.(*ecdsa.PrivateKey))
	if err != nil {
		t.Fatal(err)
	}
	cf, kf := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	if err := os.WriteFile(cf, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(kf, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return cf, kf
}

// X.509: an individual enrollment and a group on a root CA whose devices present leaf and
// intermediate both provision (MQTT and HTTPS) and connect with their certificates.
func TestDPSX509IndividualAndGroup(t *testing.T) {
	h := newHub(t)
	c := dpsClient(t, h)
	root, err := pki.NewCA("e2e root", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	inter, err := root.NewIntermediate("e2e intermediate", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.PutEnrollmentGroup(ctxT(t), "x509-root", map[string]any{"enrollmentGroupId": "x509-root",
		"attestation": map[string]any{"type": "x509", "x509": map[string]any{"signingCertificates": map[string]any{
			"primary": map[string]any{"certificate": string(root.CertPEM())}}}}}, ""); err != nil {
		t.Fatal(err)
	}
	self, err := pki.SelfSigned(pki.LeafOptions{CommonName: "x509-single", Client: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.PutEnrollment(ctxT(t), "x509-single", map[string]any{"registrationId": "x509-single",
		"attestation": map[string]any{"type": "x509", "x509": map[string]any{"clientCertificates": map[string]any{
			"primary": map[string]any{"certificate": string(pki.EncodeCert(self.Leaf))}}}}}, ""); err != nil {
		t.Fatal(err)
	}
	leaf, err := inter.Issue(pki.LeafOptions{CommonName: "x509-member", Client: true})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, tc := range []struct {
		id, transport string
		cert          tls.Certificate
	}{{"x509-member", "mqtt", leaf}, {"x509-single", "https", self}} {
		cf, kf := writeChain(t, dir, tc.id, tc.cert)
		a := startDPSAgent(t, h, t.TempDir(), tc.transport, fmt.Sprintf("auth:\n  certFile: %q\n  keyFile: %q\n", cf, kf))
		a.await(0, "provisioned", and(msgIs(dps.MsgProvisioned), field("device", tc.id)))
		a.await(0, "connected", and(msgIs(hubsess.MsgConnected), field("device", tc.id)))
		d, err := h.svc.GetDevice(ctxT(t), tc.id)
		if err != nil || d.Authentication.Type != "selfSigned" {
			t.Fatalf("hub device %+v %v", d, err)
		}
		if err := a.stop(); err != nil {
			t.Fatal(err)
		}
	}
}

// An enrollment moved to another linked hub with reprovision-and-migrate moves the device on the
// next registration (substatus deviceDataMigrated) and keeps its twin.
func TestDPSMigrateToAnotherHub(t *testing.T) {
	h := startHub(t, t.TempDir(), "127.0.0.1:0", "127.0.0.1:0", "--hub-hostnames", "hub2.localhost")
	c := dpsClient(t, h)
	groupEnrollment(t, c, "mover", map[string]any{"allocationPolicy": "static", "iotHubs": []string{"localhost"},
		"reprovisionPolicy": map[string]any{"updateHubAssignment": true, "migrateDeviceData": true}})
	state := t.TempDir()
	yaml := fmt.Sprintf("  registrationId: mover-1\n  groupKey: %q\n", e2eGroupKey)
	a := startDPSAgent(t, h, state, "mqtt", yaml)
	a.await(0, "provisioned", and(msgIs(dps.MsgProvisioned), field("device", "mover-1"), field("substatus", "initialAssignment")))
	a.await(0, "connected", and(msgIs(hubsess.MsgConnected), field("device", "mover-1")))
	// The first run applies the initial twin before it stops: stopping at "connected" raced
	// with that (applied ~4 ms later, or not at all before SIGTERM), and the second run found
	// either a twin to apply or none, since the migrated twin's desired state is the one its
	// state directory already holds.
	awaitInitialTwin(t, h, a, "mover-1")
	if err := a.stop(); err != nil {
		t.Fatal(err)
	}
	groupEnrollment(t, c, "mover", map[string]any{"allocationPolicy": "static", "iotHubs": []string{"hub2.localhost"},
		"reprovisionPolicy": map[string]any{"updateHubAssignment": true, "migrateDeviceData": true}})
	a = startDPSAgent(t, h, state, "mqtt", yaml, "--reprovision")
	i := a.await(0, "provisioned to hub2", and(msgIs(dps.MsgProvisioned), field("device", "mover-1"), field("substatus", "deviceDataMigrated")))
	if hubName := fmt.Sprint(a.lines[i]["hub"]); !strings.HasPrefix(hubName, "hub2.localhost") {
		t.Fatalf("assigned %s", hubName)
	}
	a.await(0, "connected to hub2", and(msgIs(hubsess.MsgConnected), field("device", "mover-1")))
	// On hub2 the agent syncs the migrated twin: desired and the acknowledgement came with the
	// device's data, so the twin holds both whether or not the agent applies anything again.
	a.await(0, "twin synced on hub2", and(msgIs(twinsync.MsgTwinSynced), field("device", "mover-1")))
	twinHoldsInitial(t, h, "mover-1")
}

// awaitInitialTwin waits until the agent has applied desired property "interval" from the
// enrollment's initial twin, and checks the hub's twin holds it (42) with the agent's
// acknowledgement of that value in reported.
func awaitInitialTwin(t *testing.T, h *hub, a *proc, deviceID string) {
	t.Helper()
	a.await(0, "the initial twin's desired interval applied", func(l map[string]any) bool {
		return (l["msg"] == twinsync.MsgDesiredPropertyApplied || l["msg"] == twinsync.MsgDesiredPropertyRecorded) && l["path"] == "interval"
	})
	twinHoldsInitial(t, h, deviceID)
}

// twinHoldsInitial waits until the hub's twin of deviceID holds the initial twin's desired
// interval (42) and the agent's acknowledgement of it in reported.
func twinHoldsInitial(t *testing.T, h *hub, deviceID string) {
	t.Helper()
	eventually(t, "the hub's twin with the initial twin and its acknowledgement", func() error {
		tw, err := h.svc.GetTwin(ctxT(t), deviceID)
		if err != nil {
			return err
		}
		if fmt.Sprint(tw.Properties.Desired["interval"]) != "42" {
			return fmt.Errorf("desired %v", tw.Properties.Desired)
		}
		ack, _ := tw.Properties.Reported["interval"].(map[string]any)
		if fmt.Sprint(ack["value"]) != "42" {
			return fmt.Errorf("reported %v", tw.Properties.Reported)
		}
		return nil
	})
}

func pemBody(der []byte) string {
	s := base64.StdEncoding.EncodeToString(der)
	var b strings.Builder
	for len(s) > 64 {
		b.WriteString(s[:64] + "\n")
		s = s[64:]
	}
	b.WriteString(s + "\n")
	return b.String()
}
