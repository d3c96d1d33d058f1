//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type checkOut struct {
	Checks []struct {
		Name, Verdict, Detail, Hint string
	}
}

// runCheck runs `agent check -o json` on a config and returns its verdicts by check name and
// its exit status.
func runCheck(t *testing.T, cfg string, args ...string) (map[string]string, checkOut, int) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "agent"), append([]string{"check", "-o", "json", "--config", p, "--timeout", "3s"}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var out checkOut
	if jerr := json.Unmarshal(stdout.Bytes(), &out); jerr != nil {
		t.Fatalf("agent check output is not JSON (%v): %s\nstderr: %s", jerr, stdout.String(), stderr.String())
	}
	verdicts := map[string]string{}
	for _, c := range out.Checks {
		verdicts[c.Name] = c.Verdict
	}
	return verdicts, out, exitCode(err)
}

func (o checkOut) find(name string) (detail, hint string) {
	for _, c := range o.Checks {
		if c.Name == name {
			return c.Detail, c.Hint
		}
	}
	return "", ""
}

func hubCheckConfig(caFile, stateDir, csFile string) string {
	return fmt.Sprintf("connectionStringFile: %q\ntls: {caFile: %q}\nstateDir: %q\n", csFile, caFile, stateDir)
}

// otherCA writes a self-signed CA that did not issue hubsim's certificate.
func otherCA(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "not hubsim's CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "other-ca.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// agent check against a real hubsim: healthy, a wrong CA, a key file readable by others, a
// clock skewed by --clock-offset, and hubsim stopped; each verdict and the exit status right.
func TestAgentCheck(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "check-dev")
	key := d.Authentication.SymmetricKey.PrimaryKey
	cs := writeSecret(t, "cs", connString(h, d.DeviceID, key))
	state := t.TempDir()
	timeURL := "https://" + h.ep.HTTPSAddress + "/"
	healthy := hubCheckConfig(h.ep.CAFile, state, cs)

	t.Run("healthy", func(t *testing.T) {
		v, out, code := runCheck(t, healthy, "--time-url", timeURL)
		for _, name := range []string{"credentials", "config", "state-dir", "hub-dns", "hub-tcp", "hub-tls", "clock"} {
			if v[name] != "ok" {
				detail, hint := out.find(name)
				t.Errorf("%s = %q (%s; %s), want ok", name, v[name], detail, hint)
			}
		}
		if code != 0 {
			t.Errorf("exit %d, want 0", code)
		}
	})

	t.Run("wrong CA", func(t *testing.T) {
		v, out, code := runCheck(t, hubCheckConfig(otherCA(t), state, cs), "--time-url", timeURL)
		detail, hint := out.find("hub-tls")
		if v["hub-tls"] != "error" || !strings.Contains(detail, "unknown authority") || !strings.Contains(hint, "tls.caFile") {
			t.Errorf("hub-tls = %q (%s; hint %q), want error for an unknown authority naming tls.caFile", v["hub-tls"], detail, hint)
		}
		if v["hub-tcp"] != "ok" || code != 1 {
			t.Errorf("hub-tcp = %q, exit %d; want ok and 1", v["hub-tcp"], code)
		}
	})

	t.Run("key file mode 0644", func(t *testing.T) {
		kf := filepath.Join(t.TempDir(), "device.key")
		if err := os.WriteFile(kf, []byte(key), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(kf, 0o644); err != nil { // past the umask
			t.Fatal(err)
		}
		cfg := fmt.Sprintf("host: %s\naddress: %s\ndeviceId: %s\nauth: {symmetricKeyFile: %q}\ntls: {caFile: %q}\nstateDir: %q\n",
			h.ep.HubHostName, h.ep.MQTTAddress, d.DeviceID, kf, h.ep.CAFile, state)
		v, out, code := runCheck(t, cfg, "--time-url", timeURL)
		detail, hint := out.find("credentials")
		if v["credentials"] != "error" || !strings.Contains(detail, "0644") || !strings.Contains(hint, "chmod 600") {
			t.Errorf("credentials = %q (%s; hint %q), want an error naming mode 0644 and chmod 600", v["credentials"], detail, hint)
		}
		// The rest of the configuration is still checked.
		if v["config"] != "ok" || v["hub-tls"] != "ok" || code != 1 {
			t.Errorf("config %q, hub-tls %q, exit %d; want ok, ok, 1", v["config"], v["hub-tls"], code)
		}
	})

	t.Run("clock skew", func(t *testing.T) {
		v, out, code := runCheck(t, healthy, "--time-url", timeURL, "--clock-offset", "10m")
		detail, _ := out.find("clock")
		// The server's Date header has whole seconds, so the measured skew is 10m give or take one.
		named := strings.Contains(detail, "9m59s") || strings.Contains(detail, "10m0s") || strings.Contains(detail, "10m1s")
		if v["clock"] != "error" || !named || code != 1 {
			t.Errorf("clock = %q (%s), exit %d; want error naming 10m0s (±1s), exit 1", v["clock"], detail, code)
		}
		v, out, _ = runCheck(t, healthy, "--time-url", timeURL, "--clock-offset", "-2m")
		if detail, _ := out.find("clock"); v["clock"] != "warning" {
			t.Errorf("clock with -2m = %q (%s), want warning", v["clock"], detail)
		}
	})

	t.Run("hubsim stopped", func(t *testing.T) {
		if err := h.stop(); err != nil {
			t.Fatalf("hubsim exit: %v", err)
		}
		v, out, code := runCheck(t, healthy, "--time-url", timeURL)
		detail, hint := out.find("hub-tcp")
		if v["hub-tcp"] != "error" || !strings.Contains(detail, "refused") || !strings.Contains(hint, h.ep.MQTTAddress) {
			t.Errorf("hub-tcp = %q (%s; hint %q), want connection refused naming %s", v["hub-tcp"], detail, hint, h.ep.MQTTAddress)
		}
		if _, ok := v["hub-tls"]; ok {
			t.Errorf("hub-tls ran after TCP failed: %v", v)
		}
		if v["config"] != "ok" || code != 1 {
			t.Errorf("config %q, exit %d; want ok and 1", v["config"], code)
		}
	})
}
