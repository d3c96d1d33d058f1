//go:build soak

package soak

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// line is one JSON log line of a process and when the soak read it.
type line struct {
	at time.Time
	m  map[string]any
}

func (l line) msg() string { s, _ := l.m["msg"].(string); return s }

func (l line) str(k string) string {
	switch v := l.m[k].(type) {
	case string:
		return v
	case nil:
		return ""
	default:
		return fmt.Sprint(v)
	}
}

func (l line) num(k string) int64 { f, _ := l.m[k].(float64); return int64(f) }

// logged is when the process logged the line (its "ts"), or when the soak read it if it has
// none: a line is read a little after it is logged.
func (l line) logged() time.Time {
	if ts, err := LogTime(l.str("ts")); err == nil {
		return ts
	}
	return l.at
}

// proc is one run of a binary. Its JSON log lines that keep accepts are kept (with the time they
// were read); the last lines of every kind are kept for a failure report.
type proc struct {
	name    string
	cmd     *exec.Cmd
	started time.Time
	done    chan struct{}
	err     error // valid after done
	keep    func(msg string) bool

	mu    sync.Mutex
	lines []line
	tail  []string
	wake  chan struct{}
}

const tailLines = 30

func startProc(binDir, name string, keep func(string) bool, args ...string) (*proc, error) {
	cmd := exec.Command(filepath.Join(binDir, name), args...)
	cmd.Env = append(os.Environ(), "NO_COLOR=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = cmd.Stdout
	p := &proc{name: name, cmd: cmd, done: make(chan struct{}), wake: make(chan struct{}), keep: keep}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p.started = time.Now()
	go func() { // owned by p: ends when the process's output does, then reaps it
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64*1024), 1<<20)
		for sc.Scan() {
			p.add(sc.Text())
		}
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) add(s string) {
	now := time.Now()
	var m map[string]any
	_ = json.Unmarshal([]byte(s), &m)
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.tail) >= tailLines {
		copy(p.tail, p.tail[1:])
		p.tail = p.tail[:tailLines-1]
	}
	p.tail = append(p.tail, s)
	if m == nil {
		return
	}
	if msg, _ := m["msg"].(string); p.keep == nil || p.keep(msg) {
		p.lines = append(p.lines, line{at: now, m: m})
		close(p.wake)
		p.wake = make(chan struct{})
	}
}

// snapshot returns the kept lines so far.
func (p *proc) snapshot() []line {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]line(nil), p.lines...)
}

func (p *proc) tailText() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.tail, "\n")
}

// await waits until a kept line read at or after since satisfies match, or until deadline.
func (p *proc) await(ctx context.Context, since time.Time, what string, match func(line) bool) (line, error) {
	from := 0
	for {
		p.mu.Lock()
		for ; from < len(p.lines); from++ {
			if l := p.lines[from]; !l.at.Before(since) && match(l) {
				p.mu.Unlock()
				return l, nil
			}
		}
		wake := p.wake
		p.mu.Unlock()
		select {
		case <-wake:
		case <-p.done:
			p.mu.Lock()
			more := from < len(p.lines)
			p.mu.Unlock()
			if !more {
				return line{}, fmt.Errorf("%s exited (%v) while waiting for %s", p.name, p.err, what)
			}
		case <-ctx.Done():
			return line{}, fmt.Errorf("%s: no %s: %w", p.name, what, ctx.Err())
		}
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

// kill sends SIGKILL and waits for the exit.
func (p *proc) kill() {
	if p.alive() {
		_ = p.cmd.Process.Kill()
	}
	<-p.done
}

// stop sends SIGTERM and waits for the exit, at most until ctx ends (then SIGKILL).
func (p *proc) stop(ctx context.Context) error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		p.kill()
		return fmt.Errorf("%s did not exit after SIGTERM: %w", p.name, ctx.Err())
	}
}

// freeAddr reserves a loopback port for a process that must keep its address across restarts.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// poll calls f until it returns nil or ctx ends; it is for state with no notification (hubsim's
// REST view, endpoints.json). The interval grows from 5 ms to 200 ms.
func poll(ctx context.Context, what string, f func() error) error {
	interval := 5 * time.Millisecond
	for {
		err := f()
		if err == nil {
			return nil
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%s: %w (last: %v)", what, ctx.Err(), err)
		case <-t.C:
		}
		interval = min(2*interval, 200*time.Millisecond)
	}
}

var errNotYet = errors.New("not yet")

// procStats reads a process's thread count, open files and resident memory from /proc.
func procStats(pid int) (threads, fds, rssKB float64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "Threads:":
			fmt.Sscan(f[1], &threads)
		case "VmRSS:":
			fmt.Sscan(f[1], &rssKB)
		}
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, 0, 0, err
	}
	return threads, float64(len(ents)), rssKB, nil
}

// scrape reads a Prometheus text exposition from http://addr/metrics and returns the
// unlabelled samples wanted.
func scrape(ctx context.Context, addr string, want ...string) (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("metrics: %s", resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 4<<20))
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 || !slices.Contains(want, f[0]) {
			continue
		}
		if v, err := strconv.ParseFloat(f[1], 64); err == nil {
			out[f[0]] = v
		}
	}
	return out, sc.Err()
}
