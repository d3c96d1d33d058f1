//go:build e2e

package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// tpmIdentity is what `agent tpm show` prints.
type tpmIdentity struct {
	RegistrationID string `json:"registrationId"`
	EndorsementKey string `json:"endorsementKey"`
	StorageRootKey string `json:"storageRootKey"`
}

// tpmAgentConfig is a DPS-over-HTTPS configuration with the given tpm section.
func tpmAgentConfig(t *testing.T, h *hub, state, tpmYAML, extra string) string {
	t.Helper()
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
  transport: https
  attestation: tpm
  hubAddress: %q
tpm:
%s
methods:
  ping:
    status: 200
    payload: {"pong": true}
twin:
  properties:
    interval:
      action: accept
%s`, h.ep.CAFile, state, h.ep.HTTPSAddress, h.ep.IDScope, h.ep.MQTTAddress, tpmYAML, extra)
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
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

// startSWTPM starts a real swtpm on a free loopback port with its state in a temporary
// directory and returns its address; it is killed when the test ends.
func startSWTPM(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		if os.Getenv("IOTHUBBY_REQUIRE_SWTPM") == "1" {
			t.Fatal("swtpm is not installed (apt-get install swtpm); IOTHUBBY_REQUIRE_SWTPM=1")
		}
		t.Skip("swtpm is not installed (apt-get install swtpm)")
	}
	var port int
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port = l.Addr().(*net.TCPAddr).Port
		l.Close()
		// swtpm needs a second port for its control channel.
		if c, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port+1)); err == nil {
			c.Close()
			break
		}
	}
	dir := t.TempDir()
	cmd := exec.Command(bin, "socket", "--tpm2",
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port+1),
		"--tpmstate", "dir="+dir, "--flags", "not-need-init,startup-clear")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	eventually(t, "swtpm listening on "+addr, func() error {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
	return addr
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
				tpmYAML = fmt.Sprintf("  backend: swtpm\n  path: tcp://%s\n", startSWTPM(t))
			}
			cfgPath := tpmAgentConfig(t, h, state, tpmYAML, "connection:\n  tokenTTL: 4s\n")
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
			a.await(0, "provisioned", and(msgIs("provisioned"), field("device", id.RegistrationID)))
			a.await(0, "connected", and(msgIs("connected"), field("device", id.RegistrationID)))
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
			renewal := and(msgIs("disconnected, retrying"), field("reason", "Expired_SAS_Token"))
			from := a.await(0, "a planned token renewal", renewal) + 1
			a.await(from, "the reconnect after renewal", msgIs("connected"))
			if n := a.count(field("reason", "Bad_Credential")); n != 0 {
				t.Errorf("agent saw %d Bad_Credential events", n)
			}

			v := desiredPatch(t, h, id.RegistrationID, map[string]any{"interval": 7})
			a.await(0, "desired version applied", and(msgIs("desired version applied"), field("version", v)))
			r := invokeOK(t, h, id.RegistrationID, "ping", "--payload", "{}")
			if r.Status != 200 || string(r.Payload) != `{"pong":true}` {
				t.Fatalf("ping answered %d %s", r.Status, r.Payload)
			}
			if err := a.stop(); err != nil {
				t.Fatal(err)
			}

			// A restart uses the cached assignment and the key persisted in the TPM.
			a = startProc(t, "agent", "run", "--config", cfgPath)
			a.await(0, "the cached result", msgIs("using cached provisioning result"))
			a.await(0, "connected again", and(msgIs("connected"), field("device", id.RegistrationID)))
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
	cfgPath := tpmAgentConfig(t, h, t.TempDir(), "  backend: simulator\n", "")
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgPath, []byte(strings.Replace(string(b), "transport: https", "transport: mqtt", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctxT(t), filepath.Join(binDir, "agent"), "run", "--config", cfgPath).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Fatalf("exit %v, want 2 (configuration error); output:\n%s", err, out)
	}
	if !strings.Contains(string(out), "TPM attestation needs the HTTPS transport") {
		t.Fatalf("the error does not say why:\n%s", out)
	}
}
