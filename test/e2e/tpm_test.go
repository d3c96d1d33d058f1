//go:build e2e

package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/iothubby/iothubby/internal/swtpm"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/dps"
	hubsess "github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// tpmIdentity is what `agent tpm show` prints.
type tpmIdentity struct {
	RegistrationID string `json:"registrationId"`
	EndorsementKey string `json:"endorsementKey"`
	StorageRootKey string `json:"storageRootKey"`
}

// tpmAgentConfig is a DPS configuration over transport with the given tpm section, a scripted
// ping method and an accepted desired interval.
func tpmAgentConfig(t *testing.T, h *hub, state, transport, tpmYAML, extra string) string {
	t.Helper()
	return writeDPSConfig(t, h, state, transport, `  attestation: tpm
tpm:
`+tpmYAML+`methods:
  ping:
    status: 200
    payload: {"pong": true}
twin:
  properties:
    interval:
      action: accept
`+extra)
}

// showTPM runs `agent tpm show` on a configuration.
func showTPM(t *testing.T, cfgPath string) tpmIdentity {
	t.Helper()
	out, err := exec.CommandContext(ctxT(t), filepath.Join(binDir, "agent"), "tpm", "show", "--config", cfgPath).Output()
	if err != nil {
		t.Fatalf("agent tpm show: %v", err)
	}
	var id tpmIdentity
	if err := json.Unmarshal(out, &id); err != nil || id.EndorsementKey == "" || len(id.RegistrationID) != 52 {
		t.Fatalf("agent tpm show printed %q (%v)", out, err)
	}
	return id
}

// The agent attests with a TPM, over HTTPS, through hubsim's DPS: the EK is enrolled through
// the DPS service API, the agent answers the 401 challenge by importing the activation blob,
// registers with TPM-signed tokens, imports the final key, connects to the hub with
// TPM-signed tokens, renews them, applies a desired property and answers a direct method.
// Run with the in-process simulator and with a real swtpm.
func TestTPMProvisionAndRun(t *testing.T) {
	for _, backend := range []string{"simulator", "swtpm"} {
		t.Run(backend, func(t *testing.T) {
			h := newHub(t)
			c := dpsClient(t, h)
			state := t.TempDir()
			tpmYAML := "  backend: simulator\n"
			if backend == "swtpm" {
				sw := swtpm.StartT(t, swtpm.Options{Network: "tcp", StateDir: t.TempDir()})
				tpmYAML = fmt.Sprintf("  backend: swtpm\n  path: %s\n", sw.Addr)
			}
			cfgPath := tpmAgentConfig(t, h, state, "https", tpmYAML, "connection:\n  tokenTTL: 4s\n")
			id := showTPM(t, cfgPath)
			if again := showTPM(t, cfgPath); again != id {
				t.Fatalf("the TPM's identity changed between two reads: %+v vs %+v", id, again)
			}
			if _, err := c.PutEnrollment(ctxT(t), id.RegistrationID, map[string]any{
				"registrationId": id.RegistrationID,
				"attestation":    map[string]any{"type": "tpm", "tpm": map[string]any{"endorsementKey": id.EndorsementKey}},
				"initialTwin":    map[string]any{"properties": map[string]any{"desired": map[string]any{"interval": 42}}},
			}, ""); err != nil {
				t.Fatal(err)
			}
			a := startProc(t, "agent", "run", "--config", cfgPath)
			a.await(0, "provisioned", and(msgIs(dps.MsgProvisioned), field("device", id.RegistrationID)))
			a.await(0, "connected", and(msgIs(hubsess.MsgConnected), field("device", id.RegistrationID)))
			awaitInitialTwin(t, h, a, id.RegistrationID)

			// The hub device hubsim registered authenticates with the key DPS delivered in the
			// final blob: the agent holds it only inside the TPM.
			dev, err := h.svc.GetDevice(ctxT(t), id.RegistrationID)
			if err != nil || dev.Authentication.SymmetricKey.PrimaryKey == "" {
				t.Fatalf("hub device %+v: %v", dev, err)
			}
			hasKey := func(l map[string]any) bool {
				return strings.Contains(fmt.Sprint(l), dev.Authentication.SymmetricKey.PrimaryKey)
			}
			if a.count(hasKey) != 0 || h.count(hasKey) != 0 {
				t.Fatal("the device key reached a log")
			}

			// Renewal with TPM-signed tokens: planned reconnects, no refusals.
			renewal := and(msgIs(hubsess.MsgDisconnectedRetrying), field("reason", "Expired_SAS_Token"))
			from := a.await(0, "a planned token renewal", renewal) + 1
			a.await(from, "the reconnect after renewal", msgIs(hubsess.MsgConnected))
			if n := a.count(field("reason", "Bad_Credential")); n != 0 {
				t.Errorf("agent saw %d Bad_Credential events", n)
			}

			v := desiredPatch(t, h, id.RegistrationID, map[string]any{"interval": 7})
			a.await(0, "desired version applied", and(msgIs(twinsync.MsgDesiredVersionApplied), field("version", v)))
			r := invokeOK(t, h, id.RegistrationID, "ping", "--payload", "{}")
			if r.Status != 200 || string(r.Payload) != `{"pong":true}` {
				t.Fatalf("ping answered %d %s", r.Status, r.Payload)
			}
			if err := a.stop(); err != nil {
				t.Fatal(err)
			}

			// A restart uses the cached assignment and the key persisted in the TPM.
			a = startProc(t, "agent", "run", "--config", cfgPath)
			a.await(0, "the cached result", msgIs(agent.MsgUsingCachedProvisioning))
			a.await(0, "connected again", and(msgIs(hubsess.MsgConnected), field("device", id.RegistrationID)))
			if err := a.stop(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TPM with the MQTT transport is refused at start, before anything is sent: DPS has no TPM
// attestation over MQTT.
func TestTPMOverMQTTRefusedAtStart(t *testing.T) {
	h := newHub(t)
	cfgPath := tpmAgentConfig(t, h, t.TempDir(), "mqtt", "  backend: simulator\n", "")
	out, err := exec.CommandContext(ctxT(t), filepath.Join(binDir, "agent"), "run", "--config", cfgPath).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Fatalf("exit %v, want 2 (configuration error); output:\n%s", err, out)
	}
	if !strings.Contains(string(out), "TPM attestation needs the HTTPS transport") {
		t.Fatalf("the error does not say why:\n%s", out)
	}
}
