// Package swtpm starts and stops real swtpm processes (Debian package swtpm) for tests and
// benchmarks: over TCP on free loopback ports or over Unix sockets, with their state in a
// directory, started with the flags the agent's swtpm backend needs, and waited for on their
// data channel with a deadline. One process serves one TPM.
package swtpm

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Flags are the --flags the agent's swtpm backend expects: no CMD_INIT, TPM2_Startup done.
const Flags = "not-need-init,startup-clear"

// EnvRequire set to 1 makes RequireBinary fail rather than skip (CI sets it).
const EnvRequire = "IOTHUBBY_REQUIRE_SWTPM"

// upWithin bounds the wait for swtpm's data channel.
const upWithin = 15 * time.Second

// Options describe one swtpm process.
type Options struct {
	// Network is "tcp" (free loopback ports) or "unix" (sockets in SockDir).
	Network string
	// StateDir holds the TPM's state (and swtpm's log).
	StateDir string
	// SockDir holds the Unix sockets; keep its path short (108 bytes for a socket path).
	SockDir string
	// Flags is swtpm's --flags; default Flags.
	Flags string
}

// Process is a running swtpm.
type Process struct {
	// Addr is the agent's tpm.path for it: tcp://127.0.0.1:port or unix:///path.
	Addr string
	// Dial is the address to dial on Network.
	Dial string
	cmd  *exec.Cmd
	done chan error
	log  string
	// stopped is set by Stop, which the owner calls from one goroutine.
	stopped bool
}

// Binary returns swtpm's path.
func Binary() (string, error) {
	p, err := exec.LookPath("swtpm")
	if err != nil {
		return "", errors.New("swtpm is not installed (apt-get install swtpm)")
	}
	return p, nil
}

// RequireBinary skips t when swtpm is missing, or fails it when EnvRequire is 1.
func RequireBinary(t testing.TB) {
	t.Helper()
	if _, err := Binary(); err != nil {
		if os.Getenv(EnvRequire) == "1" {
			t.Fatalf("%v; %s=1 makes this a failure", err, EnvRequire)
		}
		t.Skipf("%v (set %s=1 to make this a failure)", err, EnvRequire)
	}
}

// Start runs swtpm and waits until its data channel accepts connections. Over TCP, a port
// taken between choosing it and swtpm binding it makes swtpm exit: Start then tries others.
func Start(o Options) (*Process, error) {
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	if o.Flags == "" {
		o.Flags = Flags
	}
	for attempt := 1; ; attempt++ {
		p := &Process{done: make(chan error, 1), log: filepath.Join(o.StateDir, fmt.Sprintf("swtpm-%d.log", attempt))}
		var server, ctrl string
		switch o.Network {
		case "tcp":
			p1, err := freePort()
			if err != nil {
				return nil, err
			}
			p2, err := freePort()
			if err != nil {
				return nil, err
			}
			server = fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", p1)
			ctrl = fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", p2)
			p.Dial = fmt.Sprintf("127.0.0.1:%d", p1)
			p.Addr = "tcp://" + p.Dial
		case "unix":
			p.Dial = filepath.Join(o.SockDir, "swtpm.sock")
			server = "type=unixio,path=" + p.Dial
			ctrl = "type=unixio,path=" + filepath.Join(o.SockDir, "swtpm-ctrl.sock")
			p.Addr = "unix://" + p.Dial
		default:
			return nil, fmt.Errorf("swtpm: network %q is not tcp or unix", o.Network)
		}
		logf, err := os.Create(p.log)
		if err != nil {
			return nil, err
		}
		p.cmd = exec.Command(bin, "socket", "--tpm2", "--server", server, "--ctrl", ctrl,
			"--tpmstate", "dir="+o.StateDir, "--flags", o.Flags)
		p.cmd.Stdout, p.cmd.Stderr = logf, logf // files: no copying goroutines
		err = p.cmd.Start()
		logf.Close()
		if err != nil {
			return nil, fmt.Errorf("starting swtpm: %w", err)
		}
		go func() { p.done <- p.cmd.Wait() }()
		up, exited := p.waitUp(o.Network)
		if up {
			return p, nil
		}
		p.Stop()
		out, _ := os.ReadFile(p.log)
		if exited && o.Network == "tcp" && attempt < 3 {
			continue
		}
		return nil, fmt.Errorf("swtpm (%s) did not come up: %s", p.Addr, out)
	}
}

// waitUp polls the data channel until it accepts a connection, swtpm exits, or upWithin
// passes; a port has no event to wait on.
func (p *Process) waitUp(network string) (up, exited bool) {
	deadline := time.NewTimer(upWithin)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if c, err := net.DialTimeout(network, p.Dial, time.Second); err == nil {
			c.Close()
			return true, false
		}
		select {
		case err := <-p.done:
			p.done <- err // Stop reads it again
			return false, true
		case <-deadline.C:
			return false, false
		case <-tick.C:
		}
	}
}

// Stop terminates swtpm (SIGTERM, then SIGKILL after 10 s) and waits for it. A second Stop
// does nothing.
func (p *Process) Stop() {
	if p.stopped {
		return
	}
	p.stopped = true
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// StartT starts swtpm for a test (skipping or failing as RequireBinary does when it is
// missing) and stops it when the test ends.
func StartT(t testing.TB, o Options) *Process {
	t.Helper()
	RequireBinary(t)
	p, err := Start(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	return p
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}
