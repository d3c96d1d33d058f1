//go:build e2e

// Package e2e runs iothubby's real binaries (hubsim, agent, hubby) as separate processes over
// real sockets. Build them first (`make e2e` does) and point IOTHUBBY_BIN at the folder; without
// it, TestMain builds them into a temporary folder.
package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/hubsim/endpoints"
	"github.com/iothubby/iothubby/pkg/service"
)

var binDir string

func TestMain(m *testing.M) {
	binDir = os.Getenv("IOTHUBBY_BIN")
	cleanup := func() {}
	if binDir == "" {
		dir, err := os.MkdirTemp("", "iothubby-e2e-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		cleanup = func() { os.RemoveAll(dir) }
		cmd := exec.Command("go", "build", "-o", dir+"/", "github.com/iothubby/iothubby/cmd/...")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build binaries:", err)
			os.Exit(2)
		}
		binDir = dir
	}
	code := m.Run()
	cleanup()
	os.Exit(code)
}

// waitTimeout bounds every wait in these tests; generous because CI machines are small.
const waitTimeout = 60 * time.Second

// proc is a running binary whose JSON log lines are parsed and offered to waiters.
type proc struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error // valid after done

	mu    sync.Mutex
	lines []map[string]any
	raw   []string
	wake  chan struct{} // closed and replaced on every new line
}

func startProc(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, name), args...)
	cmd.Env = append(os.Environ(), "NO_COLOR=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	p := &proc{t: t, name: name, cmd: cmd, done: make(chan struct{}), wake: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64*1024), 1<<20)
		for sc.Scan() {
			p.addLine(sc.Text())
		}
	}()
	go func() {
		<-readDone
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			p.mu.Lock()
			tail := p.raw
			if len(tail) > 80 {
				tail = tail[len(tail)-80:]
			}
			t.Logf("--- last log lines of %s ---\n%s", name, strings.Join(tail, "\n"))
			p.mu.Unlock()
		}
	})
	return p
}

func (p *proc) addLine(s string) {
	var m map[string]any
	if json.Unmarshal([]byte(s), &m) != nil {
		m = map[string]any{"msg": s, "_raw": true}
	}
	p.mu.Lock()
	p.lines = append(p.lines, m)
	p.raw = append(p.raw, s)
	close(p.wake)
	p.wake = make(chan struct{})
	p.mu.Unlock()
}

// await waits until some log line (counting from index from) satisfies match, and returns its
// index. It fails the test at the deadline or if the process exits first.
func (p *proc) await(from int, what string, match func(map[string]any) bool) int {
	p.t.Helper()
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	for {
		p.mu.Lock()
		for i := from; i < len(p.lines); i++ {
			if match(p.lines[i]) {
				p.mu.Unlock()
				return i
			}
		}
		from = len(p.lines)
		wake := p.wake
		p.mu.Unlock()
		select {
		case <-wake:
		case <-p.done:
			// Drain lines that arrived with the exit.
			p.mu.Lock()
			n := len(p.lines)
			p.mu.Unlock()
			if from < n {
				continue
			}
			p.t.Fatalf("%s exited (%v) while waiting for %s", p.name, p.err, what)
		case <-deadline.C:
			p.t.Fatalf("%s: no log line with %s within %v", p.name, what, waitTimeout)
		}
	}
}

// count returns how many log lines so far satisfy match.
func (p *proc) count(match func(map[string]any) bool) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, l := range p.lines {
		if match(l) {
			n++
		}
	}
	return n
}

func (p *proc) numLines() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.lines)
}

// stop sends SIGTERM and waits for the exit; it returns the exit error (nil for exit 0).
func (p *proc) stop() error {
	p.t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(waitTimeout):
		p.t.Fatalf("%s did not exit within %v of SIGTERM", p.name, waitTimeout)
		return nil
	}
}

// waitExit waits for the process to exit by itself.
func (p *proc) waitExit() error {
	p.t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(waitTimeout):
		p.t.Fatalf("%s did not exit within %v", p.name, waitTimeout)
		return nil
	}
}

func (p *proc) kill() {
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// msgIs matches a log line by its message.
func msgIs(msg string) func(map[string]any) bool {
	return func(m map[string]any) bool { return m["msg"] == msg }
}

// and combines matchers.
func and(ms ...func(map[string]any) bool) func(map[string]any) bool {
	return func(l map[string]any) bool {
		for _, m := range ms {
			if !m(l) {
				return false
			}
		}
		return true
	}
}

func field(k string, v any) func(map[string]any) bool {
	return func(m map[string]any) bool { return fmt.Sprint(m[k]) == fmt.Sprint(v) }
}

// hub is a running hubsim process.
type hub struct {
	*proc
	state string
	ep    endpoints.Endpoints
	svc   *service.Client
}

// startHub runs `hubsim serve` on state with the given addresses and waits for endpoints.json.
func startHub(t *testing.T, state, mqttAddr, httpsAddr string, extra ...string) *hub {
	t.Helper()
	_ = os.Remove(filepath.Join(state, "endpoints.json"))
	args := append([]string{"serve", "--state", state, "--mqtt-addr", mqttAddr, "--https-addr", httpsAddr,
		"--amqp-addr", "127.0.0.1:0", "--log-format", "json", "--log-level", "debug"}, extra...)
	p := startProc(t, "hubsim", args...)
	deadline := time.Now().Add(waitTimeout)
	for {
		if ep, err := endpoints.Read(state); err == nil && ep.PID == p.cmd.Process.Pid {
			c, err := service.New(service.Config{ConnectionString: ep.ServiceConnectionString, Address: ep.HTTPSAddress, CAFile: ep.CAFile})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(c.Close)
			return &hub{proc: p, state: state, ep: ep, svc: c}
		}
		if !p.alive() || time.Now().After(deadline) {
			t.Fatalf("hubsim did not write endpoints.json (alive=%v)", p.alive())
		}
		// endpoints.json has no change notification; poll it briefly.
		select {
		case <-p.done:
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// freeAddr reserves a loopback port for a process that must keep its address across restarts.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls f until it returns nil or the deadline passes. It is for state that has no
// notification (hubsim's REST view); log lines are awaited with proc.await instead.
func eventually(t *testing.T, what string, f func() error) {
	t.Helper()
	waitfor.NoError(t, what, f)
}
