//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/iothubby/iothubby/pkg/firmware"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// fwCLI is a firmware workspace for hubby: a key, images and manifests in a folder.
type fwCLI struct {
	t   *testing.T
	h   *hub
	dir string
}

func (w fwCLI) path(name string) string { return filepath.Join(w.dir, name) }

// hubby runs hubby and fails the test unless it exits 0.
func (w fwCLI) hubby(args ...string) string {
	w.t.Helper()
	out, err := hubbyRun(w.t, w.h, args...)
	if err != nil {
		w.t.Fatalf("hubby %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// image writes an image of size bytes whose content depends on tag.
func (w fwCLI) image(name string, size int, tag byte) string {
	w.t.Helper()
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(i*131+i/1021) ^ tag
	}
	if err := os.WriteFile(w.path(name), b, 0o644); err != nil {
		w.t.Fatal(err)
	}
	return w.path(name)
}

// publish uploads an image to hubsim's store and returns the manifest file hubby wrote.
func (w fwCLI) publish(image, version, key string, more ...string) string {
	w.t.Helper()
	out := w.path(version + "-" + filepath.Base(key) + ".json")
	w.hubby(append([]string{"firmware", "publish", image, "--version", version, "--key", key, "--out", out}, more...)...)
	return out
}

func (w fwCLI) manifest(path string) firmware.Manifest {
	w.t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		w.t.Fatal(err)
	}
	var m firmware.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		w.t.Fatal(err)
	}
	return m
}

// refused runs an update that must fail, and returns hubby's output (with the reason).
func (w fwCLI) refused(args ...string) string {
	w.t.Helper()
	out, err := hubbyRun(w.t, w.h, args...)
	if exitCode(err) != 1 {
		w.t.Fatalf("hubby %s: exit %d, want 1\n%s", strings.Join(args, " "), exitCode(err), out)
	}
	return out
}

// stagesInOrder checks that an update's transcript shows every stage, in order, and returns
// the stages hubby saw itself (not inferred as passed between two reads).
func stagesInOrder(t *testing.T, id, out string) map[string]bool {
	t.Helper()
	seen := map[string]bool{}
	last := -1
	for _, st := range []string{"downloading", "verifying", "applying", "rebooting", "current"} {
		i := strings.Index(out, id+": "+st)
		if i < 0 || i < last {
			t.Fatalf("stage %s missing or out of order:\n%s", st, out)
		}
		last = i
		line, _, _ := strings.Cut(out[i:], "\n")
		seen[st] = !strings.Contains(line, "passed between")
	}
	return seen
}

// Firmware updates driven by hubby on the real binaries: keygen, publish to hubsim's image
// store (HTTPS, hubsim's CA), update by method and by twin with the reported stages followed in
// order; a download cut at 50% resumes from the offset (hubsim's log shows the Range request);
// a wrong key, a tampered image, a downgrade and URLs the agent cannot trust are refused with
// their reasons, hubby exits 1, and nothing is left half-applied.
func TestFirmwareCLIEndToEnd(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "fwcli")
	w := fwCLI{t: t, h: h, dir: t.TempDir()}
	key, other := w.path("fw.key"), w.path("other.key")
	w.hubby("firmware", "keygen", "--key", key)
	w.hubby("firmware", "keygen", "--key", other)
	if fi, err := os.Stat(key); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode: %v %v", fi, err)
	}
	state := t.TempDir()
	cfg := fmt.Sprintf(`stateDir: %q
twin:
  firmwareVersion: "1.0.0"
reboot:
  mode: simulate
  bootDelay: 1s
firmware:
  mode: simulate
  applyDuration: 1s
  caFile: %q
  publicKeyFile: %q
`, state, h.ep.CAFile, w.path("fw.pub"))
	a := startAgent(t, h, connString(h, "fwcli", d.Authentication.SymmetricKey.PrimaryKey), cfg)
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))

	// by method: a paced download (256 KiB at 128 KiB/s), so its progress shows
	const size = 256 << 10
	img2 := w.image("fw-2.bin", size, 2)
	m2 := w.publish(img2, "2.0.0", key, "--rate", fmt.Sprint(size/2))
	out := w.hubby("firmware", "update", "fwcli", m2, "--poll-interval", "100ms")
	seen := stagesInOrder(t, "fwcli", out)
	for _, st := range []string{"downloading", "applying", "rebooting", "current"} {
		if !seen[st] {
			t.Fatalf("hubby did not see %s itself:\n%s", st, out)
		}
	}
	if !strings.Contains(out, "fwcli: running 2.0.0") {
		t.Fatalf("no result line:\n%s", out)
	}
	awaitFirmware(t, h, "fwcli", "current", "2.0.0")

	// by twin, with the download cut at 50%: the agent resumes it from the offset
	img21 := w.image("fw-2.1.bin", size, 21)
	from := h.numLines()
	m21 := w.publish(img21, "2.1.0", key, "--cut-at", fmt.Sprint(size/2))
	out = w.hubby("firmware", "update", "fwcli", m21, "--via", "twin", "--poll-interval", "100ms")
	stagesInOrder(t, "fwcli", out)
	cut := h.await(from, "the cut download", and(msgIs("image download"), field("image", "fw-2.1.bin"), field("cut", true), field("sent", size/2)))
	h.await(cut, "the resumed download", and(msgIs("image download"), field("image", "fw-2.1.bin"),
		field("range", fmt.Sprintf("bytes=%d-", size/2)), field("status", 206), field("sent", size/2)))
	if n := h.count(and(msgIs("image download"), field("image", "fw-2.1.bin"), field("range", ""))); n != 1 {
		t.Fatalf("%d downloads of fw-2.1.bin from the start, want 1 (then a resume)", n)
	}
	awaitFirmware(t, h, "fwcli", "current", "2.1.0")

	// refusals: each names its reason, exits 1, and leaves 2.1.0 running with no image staged
	img3 := w.image("fw-3.bin", size, 3)
	wrongKey := w.publish(img3, "3.0.0", other)
	if out := w.refused("firmware", "update", "fwcli", wrongKey); !strings.Contains(out, "bad signature") {
		t.Fatalf("wrong key:\n%s", out)
	}
	// tampered: the signed manifest of fw-3.bin, but the server holds other bytes at its URL
	signed := w.manifest(w.publish(img3, "3.0.0", key, "--name", "fw-3.0.0.bin"))
	w.image("fw-3.bin", size, 99)
	w.hubby("firmware", "publish", w.path("fw-3.bin"), "--name", "fw-3.0.0.bin", "--version", "3.0.0", "--out", w.path("ignored.json"))
	b, _ := json.Marshal(signed)
	tampered := w.path("tampered.json")
	if err := os.WriteFile(tampered, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if out := w.refused("firmware", "update", "fwcli", tampered, "--poll-interval", "100ms"); !strings.Contains(out, "image does not match the manifest: sha256") {
		t.Fatalf("tampered image:\n%s", out)
	}
	downgrade := w.publish(img3, "1.5.0", key)
	if out := w.refused("firmware", "update", "fwcli", downgrade, "--via", "twin", "--poll-interval", "100ms"); !strings.Contains(out, "downgrade refused: 1.5.0 is older than the running 2.1.0") {
		t.Fatalf("downgrade:\n%s", out)
	}
	// URLs the agent cannot trust: plain http, and https with a certificate from another CA
	plain := w.manifest(w.publish(img3, "3.1.0", key))
	plain.URL = strings.Replace(plain.URL, "https://", "http://", 1)
	srv := newImageServer(t, 1024) // its own CA, which the agent does not trust
	untrusted := w.manifest(w.publish(img3, "3.2.0", key))
	untrusted.URL = srv.URL + "/fw.bin"
	for _, c := range []struct {
		m    firmware.Manifest
		want string
	}{
		{plain, `url scheme "http" not allowed (https only)`},
		{untrusted, "certificate signed by unknown authority"},
	} {
		// the URL is not signed, so the manifest needs no new signature
		b, _ := json.Marshal(c.m)
		p := w.path("url-" + c.m.Version + ".json")
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if out := w.refused("firmware", "update", "fwcli", p, "--poll-interval", "100ms"); !strings.Contains(out, c.want) {
			t.Fatalf("%s: want %q in\n%s", c.m.URL, c.want, out)
		}
	}
	fw := awaitFirmware(t, h, "fwcli", "failed", "2.1.0")
	if fw["targetVersion"] != "3.2.0" {
		t.Fatalf("last refusal: %v", fw)
	}
	// nothing half-applied: 2.1.0 runs, and no image is left staged in either slot (a refused or
	// failed download is removed; an installed one too, once confirmed)
	if staged, _ := filepath.Glob(filepath.Join(state, "firmware-fwcli", "slot-*", "image.bin")); len(staged) != 0 {
		t.Fatalf("images left staged after the refusals: %v", staged)
	}
}
