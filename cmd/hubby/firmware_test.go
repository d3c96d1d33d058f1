package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/firmware"
)

// fixedKey writes a signing key made from a fixed seed (so signatures are the same every run).
func fixedKey(t *testing.T, path string, seed byte) ed25519.PrivateKey {
	t.Helper()
	k := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{seed}, ed25519.SeedSize))
	if err := os.WriteFile(path, firmware.MarshalPrivateKey(k), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(strings.TrimSuffix(path, ".key")+".pub", firmware.MarshalPublicKey(k.Public().(ed25519.PublicKey)), 0o644); err != nil {
		t.Fatal(err)
	}
	return k
}

func TestGoldenFirmwareKeysAndManifests(t *testing.T) {
	s := newShell(t)
	dir := t.TempDir()
	s.extra = []string{dir, "<tmp>"}
	p := func(name string) string { return filepath.Join(dir, name) }

	s.golden("firmware-keygen", 0, "firmware", "keygen", "--key", p("new.key"))
	if fi, err := os.Stat(p("new.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("private key file: %v %v", fi, err)
	}
	pub, err := os.ReadFile(p("new.pub"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := firmware.ParsePublicKey(pub); err != nil {
		t.Fatalf("keygen's public key file: %v", err)
	}
	s.golden("firmware-keygen-exists", 1, "firmware", "keygen", "--key", p("new.key"))

	fixedKey(t, p("fw.key"), 7)
	fixedKey(t, p("other.key"), 8)
	image := bytes.Repeat([]byte("iothubby firmware image\n"), 4096)
	if err := os.WriteFile(p("fw.bin"), image, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p("tampered.bin"), append([]byte("X"), image[1:]...), 0o644); err != nil {
		t.Fatal(err)
	}
	s.golden("firmware-sign", 0, "firmware", "sign", p("fw.bin"), "--version", "2.0.0", "--url", "https://updates.example.com/fw-2.0.0.bin", "--key", p("fw.key"), "--out", p("m.json"))
	s.golden("firmware-sign-no-url", 0, "firmware", "sign", p("fw.bin"), "--version", "2.0.0", "--key", p("fw.key"))
	s.golden("firmware-sign-unsigned", 0, "firmware", "sign", p("fw.bin"), "--version", "2.0.0", "--url", "https://updates.example.com/fw.bin")
	s.golden("firmware-sign-no-version", 2, "firmware", "sign", p("fw.bin"), "--key", p("fw.key"))
	s.golden("firmware-sign-bad-version", 1, "firmware", "sign", p("fw.bin"), "--version", "2 0", "--key", p("fw.key"))
	if err := os.Chmod(p("other.key"), 0o640); err != nil {
		t.Fatal(err)
	}
	s.golden("firmware-sign-loose-key", 1, "firmware", "sign", p("fw.bin"), "--version", "2.0.0", "--key", p("other.key"))
	if err := os.Chmod(p("other.key"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.exec("firmware", "sign", p("fw.bin"), "--version", "2.0.0", "--url", "https://updates.example.com/fw.bin", "--key", p("other.key"), "--out", p("other.json"))
	s.exec("firmware", "sign", p("fw.bin"), "--version", "2.0.0", "--url", "http://updates.example.com/fw.bin", "--key", p("fw.key"), "--out", p("http.json"))

	s.golden("firmware-verify", 0, "firmware", "verify", p("m.json"), "--public-key", p("fw.pub"), "--image", p("fw.bin"), "--running", "1.0.0")
	s.golden("firmware-verify-json", 0, "firmware", "verify", p("m.json"), "--public-key", string(firmware.EncodePublicKey(ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, 32)).Public().(ed25519.PublicKey))), "-o", "json")
	s.golden("firmware-verify-wrong-key", 1, "firmware", "verify", p("other.json"), "--public-key", p("fw.pub"))
	s.golden("firmware-verify-tampered", 1, "firmware", "verify", p("m.json"), "--public-key", p("fw.pub"), "--image", p("tampered.bin"))
	s.golden("firmware-verify-downgrade", 1, "firmware", "verify", p("m.json"), "--public-key", p("fw.pub"), "--running", "10.1")
	s.golden("firmware-verify-http", 1, "firmware", "verify", p("http.json"), "--public-key", p("fw.pub"))
	s.golden("firmware-verify-no-key-configured", 1, "firmware", "verify", p("m.json"), "--public-key", "")
	s.golden("firmware-verify-needs-key-flag", 2, "firmware", "verify", p("m.json"))
	if err := os.WriteFile(p("notes.txt"), []byte("version 2.0.0, see fw.bin\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	s.golden("firmware-verify-not-json", 1, "firmware", "verify", p("notes.txt"), "--public-key", p("fw.pub"))
	s.golden("firmware-verify-too-large", 1, "firmware", "verify", p("fw.bin"), "--public-key", p("fw.pub"))

	s.extra = append(s.extra, s.srv.Images().Token("fw-2.0.0.bin"), "<sig>")
	s.golden("firmware-publish", 0, "firmware", "publish", p("fw.bin"), "--name", "fw-2.0.0.bin", "--version", "2.0.0", "--key", p("fw.key"), "--cut-at", "49152")
	s.golden("firmware-publish-own-url", 0, "firmware", "publish", p("fw.bin"), "--version", "2.0.0", "--key", p("fw.key"), "--url", "https://updates.example.com/fw.bin")
	s.golden("firmware-publish-http-url", 1, "firmware", "publish", p("fw.bin"), "--version", "2.0.0", "--key", p("fw.key"), "--url", "http://updates.example.com/fw.bin")
	s.golden("firmware-publish-bad-name", 1, "firmware", "publish", p("fw.bin"), "--version", "2.0.0", "--name", "../x")
}

// runAgent runs an agent in-process for device id with firmware in simulate mode, trusting
// hubsim's CA for images, until the test ends.
func runAgent(t *testing.T, s *shell, id string, pub ed25519.PublicKey) {
	t.Helper()
	s.exec("devices", "create", id)
	_, cs, code := s.exec("devices", "connection-string", id)
	if code != 0 {
		t.Fatalf("connection string: %s", cs)
	}
	ca := s.srv.Endpoints().CAFile
	cfg, err := agent.ParseConfig([]byte(fmt.Sprintf(`connectionString: %q
tls:
  caFile: %q
stateDir: %q
twin:
  firmwareVersion: "1.0.0"
reboot:
  mode: simulate
  bootDelay: 50ms
firmware:
  mode: simulate
  caFile: %q
  publicKey: %q
`, strings.TrimSpace(cs), ca, t.TempDir(), ca, firmware.EncodePublicKey(pub))))
	if err != nil {
		t.Fatal(err)
	}
	d, err := agent.New(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		tr, _, _ := s.exec("twin", "show", id, "-o", "json")
		if strings.Contains(tr, `"firmwareVersion": "1.0.0"`) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not report its firmware version: %s", tr)
		}
		time.Sleep(50 * time.Millisecond) // the twin has no change notification for the service side
	}
}

func TestGoldenFirmwareUpdate(t *testing.T) {
	s := newShell(t)
	dir := t.TempDir()
	s.extra = []string{dir, "<tmp>"}
	p := func(name string) string { return filepath.Join(dir, name) }
	key := fixedKey(t, p("fw.key"), 7)
	fixedKey(t, p("other.key"), 8)
	if err := os.WriteFile(p("fw.bin"), bytes.Repeat([]byte("image"), 10000), 0o644); err != nil {
		t.Fatal(err)
	}
	s.extra = append(s.extra, s.srv.Images().Token("fw.bin"), "<sig>")
	publish := func(version, keyFile, out string, more ...string) {
		t.Helper()
		args := append([]string{"firmware", "publish", p("fw.bin"), "--version", version, "--key", keyFile, "--out", p(out)}, more...)
		if tr, _, code := s.exec(args...); code != 0 {
			t.Fatalf("publish: %s", tr)
		}
	}
	publish("2.0.0", p("fw.key"), "m2.json")
	publish("3.0.0", p("other.key"), "wrong-key.json")
	publish("0.9.0", p("fw.key"), "downgrade.json")

	s.golden("firmware-update-unknown-device", 1, "firmware", "update", "fw1", p("m2.json"))
	s.exec("devices", "create", "fw0")
	s.golden("firmware-update-offline", 1, "firmware", "update", "fw0", p("m2.json"))
	runAgent(t, s, "fw1", key.Public().(ed25519.PublicKey))
	s.golden("firmware-update-wrong-key", 1, "firmware", "update", "fw1", p("wrong-key.json"))
	s.golden("firmware-update-downgrade-twin", 1, "firmware", "update", "fw1", p("downgrade.json"), "--via", "twin", "--poll-interval", "20ms")
	s.golden("firmware-update-bad-via", 2, "firmware", "update", "fw1", p("m2.json"), "--via", "carrier-pigeon")
	s.golden("firmware-update-no-manifest", 2, "firmware", "update", "fw1")

	// the update itself: its progress lines depend on when the twin is read, so the transcript
	// is checked for order, and the outcome by golden
	tr, out, code := s.exec("firmware", "update", "fw1", p("m2.json"), "--poll-interval", "10ms")
	if code != 0 || out != "fw1: running 2.0.0\n" {
		t.Fatalf("update: exit %d\n%s", code, tr)
	}
	last := -1
	for _, st := range []string{"downloading", "verifying", "applying", "rebooting", "current"} {
		i := strings.Index(tr, "fw1: "+st)
		if i < last {
			t.Fatalf("%s out of order:\n%s", st, tr)
		}
		last = max(last, i)
	}
	if !strings.Contains(tr, "fw1: current, running 2.0.0") {
		t.Fatalf("no final state:\n%s", tr)
	}
	s.golden("firmware-update-already-running", 0, "firmware", "update", "fw1", p("m2.json"))
	// the agent's reported status after it: current, no leftovers of earlier refusals
	_, twinJSON, _ := s.exec("twin", "show", "fw1", "-o", "json")
	var tw struct {
		Properties struct{ Reported map[string]any }
	}
	if err := json.Unmarshal([]byte(twinJSON), &tw); err != nil {
		t.Fatal(err)
	}
	fw, _ := tw.Properties.Reported["firmware"].(map[string]any)
	if fw["state"] != "current" || fw["version"] != "2.0.0" || fw["error"] != "" {
		t.Fatalf("reported firmware after the update: %v", fw)
	}
	// an image replaced on the server after signing: the device fails it on the hash, and the
	// same manifest again is answered from that failure (the updater does not retry it)
	publish("2.5.0", p("fw.key"), "m25.json", "--name", "fw-2.5.0.bin")
	if err := os.WriteFile(p("evil.bin"), bytes.Repeat([]byte("EVIL!"), 10000), 0o644); err != nil {
		t.Fatal(err)
	}
	if tr, _, code := s.exec("firmware", "publish", p("evil.bin"), "--name", "fw-2.5.0.bin", "--version", "2.5.0", "--out", p("evil.json")); code != 0 {
		t.Fatalf("replace the image: %s", tr)
	}
	s.extra = append(s.extra, s.srv.Images().Token("fw-2.5.0.bin"), "<sig>")
	progressFree(s, "firmware-update-tampered", 1, "firmware", "update", "fw1", p("m25.json"), "--poll-interval", "10ms")
	progressFree(s, "firmware-update-tampered-again", 1, "firmware", "update", "fw1", p("m25.json"), "--poll-interval", "10ms")
}

func TestGoldenFirmwareUpdateQuery(t *testing.T) {
	s := newShell(t)
	dir := t.TempDir()
	s.extra = []string{dir, "<tmp>"}
	p := func(name string) string { return filepath.Join(dir, name) }
	key := fixedKey(t, p("fw.key"), 7)
	if err := os.WriteFile(p("fw.bin"), bytes.Repeat([]byte("image"), 10000), 0o644); err != nil {
		t.Fatal(err)
	}
	if tr, _, code := s.exec("firmware", "publish", p("fw.bin"), "--version", "2.0.0", "--key", p("fw.key"), "--out", p("m.json")); code != 0 {
		t.Fatalf("publish: %s", tr)
	}
	runAgent(t, s, "q1", key.Public().(ed25519.PublicKey))
	runAgent(t, s, "q2", key.Public().(ed25519.PublicKey))
	s.exec("devices", "create", "q3") // never connects
	s.exec("devices", "create", "q4") // not in the ring
	for _, id := range []string{"q1", "q2", "q3"} {
		if tr, _, code := s.exec("twin", "update", id, "--tag", `ring="canary"`); code != 0 {
			t.Fatalf("tag %s: %s", id, tr)
		}
	}
	s.golden("firmware-update-query-partial", 3, "firmware", "update", "--query", "tags.ring = 'canary'", p("m.json"), "--poll-interval", "10ms")
	s.golden("firmware-update-query-none", 1, "firmware", "update", "--query", "tags.ring = 'nobody'", p("m.json"))
	s.golden("firmware-update-query-and-device", 2, "firmware", "update", "q1", "--query", "tags.ring = 'canary'", p("m.json"))
	s.golden("firmware-update-query-json", 3, "-o", "json", "firmware", "update", "--query", "tags.ring = 'canary'", p("m.json"), "--poll-interval", "10ms")
}

// progressLine is a line of update's progress, which depends on when the twin was read.
var progressLine = regexp.MustCompile(`(?m)^[^ ]+: (downloading|verifying|applying|rebooting)\b.*\n`)

// progressFree runs a command like shell.golden, with the progress lines left out.
func progressFree(s *shell, name string, wantCode int, args ...string) {
	s.t.Helper()
	tr, _, code := s.exec(args...)
	if code != wantCode {
		s.t.Errorf("%s: exit %d, want %d\n%s", name, code, wantCode, tr)
	}
	golden(s.t, name, progressLine.ReplaceAllString(tr, ""), append([]string{s.srv.StateDir(), "<state>"}, s.extra...)...)
}
