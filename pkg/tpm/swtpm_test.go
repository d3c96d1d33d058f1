package tpm

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
)

// swtpm is a real swtpm process serving a TPM whose state lives in dir.
type swtpm struct {
	addr string // Config.Path: tcp://127.0.0.1:port or unix:///path
	cmd  *exec.Cmd
	done chan error
	log  string
	// stopped is set by stop, which runs on the test goroutine only.
	stopped bool
}

// swtpmBinary finds swtpm, or skips the test (fails with IOTHUBBY_REQUIRE_SWTPM=1).
func swtpmBinary(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("swtpm")
	if err != nil {
		if os.Getenv("IOTHUBBY_REQUIRE_SWTPM") == "1" {
			t.Fatalf("swtpm is required (IOTHUBBY_REQUIRE_SWTPM=1) but not in PATH: %v", err)
		}
		t.Skip("swtpm not in PATH (set IOTHUBBY_REQUIRE_SWTPM=1 to make this a failure)")
	}
	return path
}

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

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startSwtpm starts swtpm on stateDir, serving over TCP (network "tcp") or a Unix socket
// in sockDir ("unix"), and waits until its data channel accepts connections. flags is the
// --flags value. The process is stopped when the test ends.
func startSwtpm(t *testing.T, network, stateDir, sockDir, flags string) *swtpm {
	t.Helper()
	bin := swtpmBinary(t)
	for attempt := 1; ; attempt++ {
		s := &swtpm{done: make(chan error, 1), log: filepath.Join(stateDir, fmt.Sprintf("swtpm-%d.log", attempt))}
		var server, ctrl, dial string
		switch network {
		case "tcp":
			// Two ports that were free a moment ago; if one is taken by now, swtpm exits and
			// we try again with others.
			p1, p2 := freePort(t), freePort(t)
			server = fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", p1)
			ctrl = fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", p2)
			dial = fmt.Sprintf("127.0.0.1:%d", p1)
			s.addr = "tcp://" + dial
		case "unix":
			dial = filepath.Join(sockDir, "swtpm.sock")
			server = "type=unixio,path=" + dial
			ctrl = "type=unixio,path=" + filepath.Join(sockDir, "swtpm-ctrl.sock")
			s.addr = "unix://" + dial
		}
		logf, err := os.Create(s.log)
		if err != nil {
			t.Fatal(err)
		}
		s.cmd = exec.Command(bin, "socket", "--tpm2", "--server", server, "--ctrl", ctrl,
			"--tpmstate", "dir="+stateDir, "--flags", flags)
		s.cmd.Stdout, s.cmd.Stderr = logf, logf // files: no copying goroutines
		err = s.cmd.Start()
		logf.Close()
		if err != nil {
			t.Fatalf("starting swtpm: %v", err)
		}
		go func() { s.done <- s.cmd.Wait() }()

		up, exited := s.waitUp(network, dial, 15*time.Second)
		if up {
			t.Cleanup(s.stop)
			return s
		}
		s.stop()
		out, _ := os.ReadFile(s.log)
		if exited && network == "tcp" && attempt < 3 {
			t.Logf("swtpm exited at start (port taken?), retrying: %s", out)
			continue
		}
		t.Fatalf("swtpm (%s) did not come up: %s", s.addr, out)
	}
}

// waitUp polls the data channel until it accepts a connection, swtpm exits, or the
// deadline passes.
func (s *swtpm) waitUp(network, addr string, within time.Duration) (up, exited bool) {
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if c, err := net.DialTimeout(network, addr, time.Second); err == nil {
			c.Close()
			return true, false
		}
		select {
		case err := <-s.done:
			s.done <- err // stop reads it again
			return false, true
		case <-deadline.C:
			return false, false
		case <-tick.C:
		}
	}
}

// stop terminates swtpm (SIGTERM, then SIGKILL) and waits for it.
func (s *swtpm) stop() {
	if s.stopped {
		return
	}
	s.stopped = true
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

func swtpmOpener(addr *string) opener {
	return func(t *testing.T, ctx context.Context, log *zap.Logger) (*Device, error) {
		return Open(ctx, Config{Backend: BackendSwtpm, Path: *addr, CommandTimeout: 30 * time.Second}, log)
	}
}

const swtpmFlags = "not-need-init,startup-clear"

func TestSwtpmTCP(t *testing.T) {
	state := t.TempDir()
	s := startSwtpm(t, "tcp", state, "", swtpmFlags)
	ek, key := runDeviceSuite(t, swtpmOpener(&s.addr))
	if t.Failed() {
		return
	}
	// The persistent handles live in swtpm's NV state: a new swtpm process on the same state
	// directory has the same EK and the same identity key.
	s.stop()
	s = startSwtpm(t, "tcp", state, "", swtpmFlags)
	d := mustOpen(t, swtpmOpener(&s.addr))
	defer d.Close()
	if string(d.EndorsementKey()) != string(ek) {
		t.Error("EK changed across an swtpm restart")
	}
	signEquals(t, d, key, []byte("after a restart"))
}

func TestSwtpmUnix(t *testing.T) {
	s := startSwtpm(t, "unix", t.TempDir(), shortTempDir(t), swtpmFlags)
	runDeviceSuite(t, swtpmOpener(&s.addr))
}

// A Device keeps its connection; when swtpm goes away and comes back on the same socket, the
// next command reconnects.
func TestSwtpmReconnect(t *testing.T) {
	state, sock := t.TempDir(), shortTempDir(t)
	s := startSwtpm(t, "unix", state, sock, swtpmFlags)
	d := mustOpen(t, swtpmOpener(&s.addr))
	defer d.Close()
	key := testKey("reconnect")
	if err := d.ImportActivation(testContext(t), blobFor(t, d.EndorsementKey(), d.StorageRootKey(), key)); err != nil {
		t.Fatal(err)
	}
	signEquals(t, d, key, []byte("before"))

	s.stop()
	if _, err := d.Sign(testContext(t), []byte("while down")); err == nil {
		t.Fatal("Sign succeeded with swtpm stopped")
	}
	startSwtpm(t, "unix", state, sock, swtpmFlags)
	signEquals(t, d, key, []byte("after"))
}

// swtpm started without startup-clear answers TPM_RC_INITIALIZE: Open sends TPM2_Startup.
func TestSwtpmWithoutStartup(t *testing.T) {
	s := startSwtpm(t, "tcp", t.TempDir(), "", "not-need-init")
	d := mustOpen(t, swtpmOpener(&s.addr))
	defer d.Close()
	if len(d.EndorsementKey()) != 316 {
		t.Errorf("EK of %d bytes", len(d.EndorsementKey()))
	}
}
