//go:build e2e

package e2e

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/firmware"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// imageServer is a local HTTPS server for firmware images with Range support. With hold set,
// the first request stops after half the image and waits until its client goes away.
type imageServer struct {
	*httptest.Server
	data     []byte
	hold     atomic.Bool
	halfSent chan struct{}
	ranges   chan string
	caFile   string
}

func newImageServer(t *testing.T, size int) *imageServer {
	s := &imageServer{data: make([]byte, size), halfSent: make(chan struct{}), ranges: make(chan string, 64)}
	for i := range s.data {
		s.data[i] = byte(i*31 + i/7)
	}
	s.Server = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case s.ranges <- r.Header.Get("Range"):
		default:
		}
		if s.hold.CompareAndSwap(true, false) {
			w.Header().Set("Content-Length", strconv.Itoa(len(s.data)))
			w.WriteHeader(200)
			_, _ = w.Write(s.data[:len(s.data)/2])
			w.(http.Flusher).Flush()
			close(s.halfSent)
			<-r.Context().Done()
			return
		}
		http.ServeContent(w, r, "image.bin", time.Unix(0, 0), bytes.NewReader(s.data))
	}))
	t.Cleanup(s.Close)
	s.caFile = filepath.Join(t.TempDir(), "images-ca.pem")
	if err := os.WriteFile(s.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *imageServer) manifest(version string, key ed25519.PrivateKey) firmware.Manifest {
	sum := sha256.Sum256(s.data)
	return firmware.Manifest{Version: version, URL: s.URL + "/fw-" + version + ".bin", Size: int64(len(s.data)), SHA256: hex.EncodeToString(sum[:])}.Sign(key)
}

func reportedFirmware(t *testing.T, h *hub, id string) (map[string]any, any) {
	r, _ := hubReported(t, h, id)
	fw, _ := r["firmware"].(map[string]any)
	return fw, r["firmwareVersion"]
}

func awaitFirmware(t *testing.T, h *hub, id, state, version string) map[string]any {
	t.Helper()
	var got map[string]any
	eventually(t, "firmware "+state+" at "+version, func() error {
		fw, fv := reportedFirmware(t, h, id)
		if fw["state"] != state || fw["version"] != version || fv != version {
			return fmt.Errorf("reported firmware %v, firmwareVersion %v", fw, fv)
		}
		got = fw
		return nil
	})
	return got
}

// Firmware updates on the real binaries, from an HTTPS server the agent trusts through
// firmware.caFile: a signed update by method reaches current; a hash mismatch by desired
// property fails and keeps the old version; a bad signature is refused; an agent killed halfway
// through a download resumes it (Range) after a restart and completes.
func TestFirmwareUpdateEndToEnd(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "fw1")
	srv := newImageServer(t, 256*1024)
	key := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{9}, ed25519.SeedSize))
	state := t.TempDir()
	cs := connString(h, "fw1", d.Authentication.SymmetricKey.PrimaryKey)
	cfg := fmt.Sprintf(`stateDir: %q
twin:
  firmwareVersion: "1.0.0"
reboot:
  mode: simulate
  bootDelay: 200ms
firmware:
  mode: simulate
  applyDuration: 100ms
  caFile: %q
  publicKey: %q
`, state, srv.caFile, base64.StdEncoding.EncodeToString(key.Public().(ed25519.PublicKey)))
	a := startAgent(t, h, cs, cfg)
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))

	m2, _ := json.Marshal(srv.manifest("2.0.0", key))
	if r := invokeOK(t, h, "fw1", "firmwareUpdate", "--payload", string(m2)); r.Status != 202 {
		t.Fatalf("firmwareUpdate: %d %s", r.Status, r.Payload)
	}
	awaitFirmware(t, h, "fw1", "current", "2.0.0")
	if r, _ := hubReported(t, h, "fw1"); r["bootCount"] != float64(1) {
		t.Fatalf("the update did not reboot the device: %v", r)
	}

	// a hash mismatch, through the desired property: failed, 2.0.0 kept
	bad := srv.manifest("3.0.0", key)
	bad.SHA256 = strings.Repeat("ab", 32)
	bad = bad.Sign(key)
	if _, err := h.svc.UpdateTwin(ctxT(t), "fw1", map[string]any{"properties": map[string]any{"desired": map[string]any{"firmware": bad}}}, "*"); err != nil {
		t.Fatal(err)
	}
	fw := awaitFirmware(t, h, "fw1", "failed", "2.0.0")
	if fw["targetVersion"] != "3.0.0" || !strings.Contains(fmt.Sprint(fw["error"]), "sha256") {
		t.Fatalf("failed status %v", fw)
	}

	// a bad signature is refused before anything is downloaded: by method (400) and by the
	// desired property; both end in failed with 2.0.0 kept
	forged := srv.manifest("3.0.1", ed25519.NewKeyFromSeed(bytes.Repeat([]byte{1}, ed25519.SeedSize)))
	mf, _ := json.Marshal(forged)
	if r := invokeOK(t, h, "fw1", "firmwareUpdate", "--payload", string(mf)); r.Status != 400 || !strings.Contains(string(r.Payload), "signature") {
		t.Fatalf("forged manifest: %d %s", r.Status, r.Payload)
	}
	if fw := awaitFirmware(t, h, "fw1", "failed", "2.0.0"); fw["targetVersion"] != "3.0.1" || !strings.Contains(fmt.Sprint(fw["error"]), "signature") {
		t.Fatalf("forged manifest by method: %v", fw)
	}
	forged = srv.manifest("3.0.2", ed25519.NewKeyFromSeed(bytes.Repeat([]byte{2}, ed25519.SeedSize)))
	if _, err := h.svc.UpdateTwin(ctxT(t), "fw1", map[string]any{"properties": map[string]any{"desired": map[string]any{"firmware": forged}}}, "*"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "forged desired manifest refused", func() error {
		fw, fv := reportedFirmware(t, h, "fw1")
		if fw["state"] != "failed" || fw["targetVersion"] != "3.0.2" || fv != "2.0.0" || !strings.Contains(fmt.Sprint(fw["error"]), "signature") {
			return fmt.Errorf("reported firmware %v, firmwareVersion %v", fw, fv)
		}
		return nil
	})

	// killed halfway through a download: the restarted agent resumes it and completes
	srv.hold.Store(true)
	m4, _ := json.Marshal(srv.manifest("4.0.0", key))
	if r := invokeOK(t, h, "fw1", "firmwareUpdate", "--payload", string(m4)); r.Status != 202 {
		t.Fatalf("firmwareUpdate 4.0.0: %d %s", r.Status, r.Payload)
	}
	select {
	case <-srv.halfSent:
	case <-time.After(waitTimeout):
		t.Fatal("the download did not start")
	}
	// the half that was sent is on the agent's disk before it is killed
	eventually(t, "half the image in the inactive slot", func() error {
		paths, _ := filepath.Glob(filepath.Join(state, "firmware-fw1", "slot-*", "image.bin"))
		for _, p := range paths {
			// the other slot holds the complete running image; the one being written is partial
			if fi, err := os.Stat(p); err == nil && fi.Size() >= int64(len(srv.data)/2) && fi.Size() < int64(len(srv.data)) {
				return nil
			}
		}
		return fmt.Errorf("partial image not written yet (%v)", paths)
	})
	// drain the ranges seen so far; the restart must ask for the rest
	for len(srv.ranges) > 0 {
		<-srv.ranges
	}
	a.kill()
	a = startAgent(t, h, cs, cfg)
	awaitFirmware(t, h, "fw1", "current", "4.0.0")
	resumed := false
	for len(srv.ranges) > 0 {
		if rg := <-srv.ranges; strings.HasPrefix(rg, "bytes=") && rg != "bytes=0-" {
			resumed = true
		}
	}
	if !resumed {
		t.Fatal("the restarted agent downloaded the image again from the start")
	}
	if n := a.count(msgIs(firmware.MsgUpdateFailed)); n != 0 {
		t.Fatalf("%d failures after the restart", n)
	}
}
