package hubsim_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
)

// A second hubsim on a state directory in use is refused before it touches any file there: with
// another host name it would otherwise have re-issued the running hubsim's server certificate.
func TestSecondHubsimRefusedBeforeTouchingStateDir(t *testing.T) {
	dir := t.TempDir()
	e := newEnvIn(t, dir)
	files := []string{pki.CACertFile, pki.ServerCertFile, pki.ServerKeyFile, hubsim.EndpointsFile, hubsim.LockFile}
	before := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		before[f] = b
	}
	_, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: dir, HostName: "other.example",
		MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, zap.NewNop())
	if !errors.Is(err, hubsim.ErrStateDirInUse) {
		t.Fatalf("second Start: %v, want ErrStateDirInUse", err)
	}
	if want := "(pid " + strconv.Itoa(os.Getpid()) + ")"; !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not name the holder %s", err, want)
	}
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil || !bytes.Equal(b, before[f]) {
			t.Errorf("%s changed by the refused hubsim (err %v)", f, err)
		}
	}
	// The running one still serves.
	if r := e.do("GET", "/devices?api-version=2021-04-12", nil, ""); r.status != 200 {
		t.Fatalf("first hubsim after the refused start: %d", r.status)
	}
}

// Two hubsim started at once on one fresh directory: one runs, the other is refused, and the
// server certificate on disk is signed by the CA on disk.
func TestConcurrentStartsOnFreshStateDir(t *testing.T) {
	for i := range 5 {
		dir := filepath.Join(t.TempDir(), "state")
		var wg sync.WaitGroup
		srvs := make([]*hubsim.Server, 2)
		errs := make([]error, 2)
		for j := range 2 {
			wg.Go(func() {
				srvs[j], errs[j] = hubsim.Start(context.Background(), hubsim.Config{StateDir: dir,
					MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, zap.NewNop())
			})
		}
		wg.Wait()
		ok := 0
		for j := range 2 {
			if errs[j] == nil {
				ok++
				defer srvs[j].Close()
			} else if !errors.Is(errs[j], hubsim.ErrStateDirInUse) {
				t.Fatalf("run %d: Start %d: %v, want nil or ErrStateDirInUse", i, j, errs[j])
			}
		}
		if ok != 1 {
			t.Fatalf("run %d: %d of 2 concurrent starts succeeded, want exactly 1", i, ok)
		}
		verifyServerCert(t, dir)
	}
}

func verifyServerCert(t *testing.T, dir string) {
	t.Helper()
	caPEM, err := os.ReadFile(filepath.Join(dir, pki.CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("ca.pem holds no certificate")
	}
	srvPEM, err := os.ReadFile(filepath.Join(dir, pki.ServerCertFile))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(srvPEM)
	if blk == nil {
		t.Fatal("server.pem holds no certificate")
	}
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: "localhost"}); err != nil {
		t.Fatalf("server.pem is not signed by ca.pem: %v", err)
	}
}

// Private state files found with group or other permissions are made 0600 at start, each with a
// warning; public ones (the certificates) are left as they are.
func TestLooseStateFileModesTightened(t *testing.T) {
	dir := t.TempDir()
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: dir, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	private := []string{pki.CAKeyFile, pki.ServerKeyFile, hubsim.DatabaseFile, hubsim.DPSDatabaseFile}
	for _, f := range append(private, pki.CACertFile) {
		if err := os.Chmod(filepath.Join(dir, f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	core, logs := observer.New(zap.WarnLevel)
	srv, err = hubsim.Start(context.Background(), hubsim.Config{StateDir: dir, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	warned := map[string]bool{}
	for _, e := range logs.FilterMessage(hubsim.LogModeTightened).All() {
		if e.ContextMap()["was"] != "0644" {
			t.Errorf("warning for %v names the old mode %v, want 0644", e.ContextMap()["file"], e.ContextMap()["was"])
		}
		warned[filepath.Base(e.ContextMap()["file"].(string))] = true
	}
	for _, f := range private {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 || !warned[f] {
			t.Errorf("%s: mode %#o, warned %v; want 0600 and a warning", f, fi.Mode().Perm(), warned[f])
		}
	}
	if fi, _ := os.Stat(filepath.Join(dir, pki.CACertFile)); fi.Mode().Perm() != 0o644 || warned[pki.CACertFile] {
		t.Errorf("ca.pem is public: mode %#o (want 0644 kept), warned %v", fi.Mode().Perm(), warned[pki.CACertFile])
	}
}
