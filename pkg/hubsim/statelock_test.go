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
