package tpm

import (
	"context"
	"os"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/internal/swtpm"
)

// shortTempDir is a temporary directory with a short path: a Unix socket path must fit in
// 108 bytes.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "swtpm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// startSwtpm starts swtpm on stateDir, serving over TCP (network "tcp") or a Unix socket in
// sockDir ("unix"), with --flags flags; it is stopped when the test ends.
func startSwtpm(t *testing.T, network, stateDir, sockDir, flags string) *swtpm.Process {
	t.Helper()
	return swtpm.StartT(t, swtpm.Options{Network: network, StateDir: stateDir, SockDir: sockDir, Flags: flags})
}

func swtpmOpener(addr *string) opener {
	return func(t *testing.T, ctx context.Context, log *zap.Logger) (*Device, error) {
		return Open(ctx, Config{Backend: BackendSwtpm, Path: *addr, CommandTimeout: 30 * time.Second}, log)
	}
}

const swtpmFlags = swtpm.Flags

func TestSwtpmTCP(t *testing.T) {
	state := t.TempDir()
	s := startSwtpm(t, "tcp", state, "", swtpmFlags)
	ek, key := runDeviceSuite(t, swtpmOpener(&s.Addr))
	if t.Failed() {
		return
	}
	// The persistent handles live in swtpm's NV state: a new swtpm process on the same state
	// directory has the same EK and the same identity key.
	s.Stop()
	s = startSwtpm(t, "tcp", state, "", swtpmFlags)
	d := mustOpen(t, swtpmOpener(&s.Addr))
	defer d.Close()
	if string(d.EndorsementKey()) != string(ek) {
		t.Error("EK changed across an swtpm restart")
	}
	signEquals(t, d, key, []byte("after a restart"))
}

func TestSwtpmUnix(t *testing.T) {
	s := startSwtpm(t, "unix", t.TempDir(), shortTempDir(t), swtpmFlags)
	runDeviceSuite(t, swtpmOpener(&s.Addr))
}

// A Device keeps its connection; when swtpm goes away and comes back on the same socket, the
// next command reconnects.
func TestSwtpmReconnect(t *testing.T) {
	state, sock := t.TempDir(), shortTempDir(t)
	s := startSwtpm(t, "unix", state, sock, swtpmFlags)
	d := mustOpen(t, swtpmOpener(&s.Addr))
	defer d.Close()
	key := testKey("reconnect")
	if err := d.ImportActivation(testContext(t), blobFor(t, d.EndorsementKey(), d.StorageRootKey(), key)); err != nil {
		t.Fatal(err)
	}
	signEquals(t, d, key, []byte("before"))

	s.Stop()
	if _, err := d.Sign(testContext(t), []byte("while down")); err == nil {
		t.Fatal("Sign succeeded with swtpm stopped")
	}
	startSwtpm(t, "unix", state, sock, swtpmFlags)
	signEquals(t, d, key, []byte("after"))
}

// swtpm started without startup-clear answers TPM_RC_INITIALIZE: Open sends TPM2_Startup.
func TestSwtpmWithoutStartup(t *testing.T) {
	s := startSwtpm(t, "tcp", t.TempDir(), "", "not-need-init")
	d := mustOpen(t, swtpmOpener(&s.Addr))
	defer d.Close()
	if len(d.EndorsementKey()) != 316 {
		t.Errorf("EK of %d bytes", len(d.EndorsementKey()))
	}
}
