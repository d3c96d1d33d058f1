package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/iothubby/iothubby/pkg/hubsim/endpoints"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/service"
)

// childEnv selects a child mode of this binary: the fleet benchmarks run each side in its own
// process (so that its RSS is its own) by re-executing the bench binary with it set.
const childEnv = "IOTHUBBY_BENCH_CHILD"

// fleetSpec is what a child (Go or Node) holds: one hubsim, its devices and the telemetry period.
type fleetSpec struct {
	Host        string        `json:"host"`
	MQTTAddress string        `json:"mqttAddress"`
	CAFile      string        `json:"caFile"`
	Parallel    int           `json:"parallel"`
	TelemetryMs int64         `json:"telemetryMs"`
	Devices     []fleetDevice `json:"devices"`
}

type fleetDevice struct {
	ID  string `json:"id"`
	Key string `json:"key"`
}

// startHubsimProc runs hubsim as its own process with a fresh state folder.
func startHubsimProc(ctx context.Context, binDir string, extra ...string) (endpoints.Endpoints, func(), error) {
	state, err := os.MkdirTemp("", "iothubby-bench-fleet-")
	if err != nil {
		return endpoints.Endpoints{}, nil, err
	}
	args := append([]string{"serve", "--state", state, "--mqtt-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0",
		"--amqp-addr", "127.0.0.1:0", "--log-level", "warn"}, extra...)
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "hubsim"), args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		os.RemoveAll(state)
		return endpoints.Endpoints{}, nil, err
	}
	stop := func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		os.RemoveAll(state)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ep, err := endpoints.Read(state)
		if err == nil && ep.PID == cmd.Process.Pid {
			return ep, stop, nil
		}
		if time.Now().After(deadline) {
			stop()
			return endpoints.Endpoints{}, nil, errors.New("hubsim did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// procStatusKiB reads a field (VmRSS, VmHWM) of /proc/PID/status in KiB.
func procStatusKiB(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/%d/status has no %s", pid, field)
}

// procCPU is a process's utime+stime from /proc/PID/stat, in seconds.
func procCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bad /proc stat")
	}
	f := strings.Fields(s[i+2:])
	// Fields after the command: state(0) ... utime(11) stime(12).
	if len(f) < 13 {
		return 0, errors.New("short /proc stat")
	}
	u, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, errors.New("bad /proc stat times")
	}
	return (u + st) / 100, nil // USER_HZ is 100 on Linux
}

// childProc is one side of a fleet comparison running in its own process. It prints BASE when
// loaded and idle, then HELD ... once every device is connected; closing its stdin ends it.
type childProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines *bufio.Scanner
}

func startChild(ctx context.Context, cmd *exec.Cmd) (*childProc, error) {
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &childProc{cmd: cmd, stdin: in, lines: bufio.NewScanner(out)}, nil
}

// expect waits for the child's next line, which must start with word; it returns the rest.
func (c *childProc) expect(word string, timeout time.Duration) ([]string, error) {
	got := make(chan bool, 1)
	go func() { got <- c.lines.Scan() }()
	select {
	case ok := <-got:
		if !ok {
			return nil, fmt.Errorf("child ended before %s (%v)", word, c.lines.Err())
		}
	case <-time.After(timeout):
		_ = c.cmd.Process.Kill()
		return nil, fmt.Errorf("child: no %s within %s", word, timeout)
	}
	f := strings.Fields(c.lines.Text())
	if len(f) == 0 || f[0] != word {
		return nil, fmt.Errorf("child said %q, want %s", c.lines.Text(), word)
	}
	return f[1:], nil
}

func (c *childProc) stop() {
	_ = c.stdin.Close()
	done := make(chan struct{})
	go func() { _ = c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = c.cmd.Process.Kill()
		<-done
	}
}

// goMemFig is a Go process's memory from its runtime metrics after GCs let grown stacks shrink:
// heap objects, the unused part of in-use heap spans (fragmentation), goroutine stacks, and the
// goroutine count. Objects+unused+stacks is what the fleet exposes as go_memstats_heap_inuse_bytes
// + go_memstats_stack_inuse_bytes.
type goMemFig struct{ objects, unused, stacks, goroutines float64 }

func (m goMemFig) heapStack() float64 { return m.objects + m.unused + m.stacks }

func (m goMemFig) String() string {
	return fmt.Sprintf("%.0f %.0f %.0f %.0f", m.objects, m.unused, m.stacks, m.goroutines)
}

func parseGoMem(f []string) (goMemFig, error) {
	var v [4]float64
	if len(f) != 4 {
		return goMemFig{}, fmt.Errorf("want 4 memory figures, got %q", f)
	}
	for i := range v {
		var err error
		if v[i], err = strconv.ParseFloat(f[i], 64); err != nil {
			return goMemFig{}, err
		}
	}
	return goMemFig{v[0], v[1], v[2], v[3]}, nil
}

// perDev is (m - base) / n.
func (m goMemFig) perDev(base goMemFig, n int) goMemFig {
	d := float64(n)
	return goMemFig{(m.objects - base.objects) / d, (m.unused - base.unused) / d, (m.stacks - base.stacks) / d, (m.goroutines - base.goroutines) / d}
}

func goMem() goMemFig {
	for range 4 {
		runtime.GC()
	}
	debug.FreeOSMemory()
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/heap/unused:bytes"},
		{Name: "/memory/classes/heap/stacks:bytes"}, {Name: "/sched/goroutines:goroutines"}}
	metrics.Read(s)
	return goMemFig{float64(s[0].Value.Uint64()), float64(s[1].Value.Uint64()), float64(s[2].Value.Uint64()), float64(s[3].Value.Uint64())}
}

// runFleetChild is the child side: hold the spec's devices as bare paho clients ("paho"), print
// BASE/HELD with Go memory figures, and end when stdin closes.
func runFleetChild(kind, specFile string) error {
	b, err := os.ReadFile(specFile)
	if err != nil {
		return err
	}
	var spec fleetSpec
	if err := json.Unmarshal(b, &spec); err != nil {
		return err
	}
	pem, err := os.ReadFile(spec.CAFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	fmt.Printf("BASE %s\n", goMem())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var release func()
	tlsCfg := &tls.Config{RootCAs: pool, ServerName: spec.Host, MinVersion: tls.VersionTLS12}
	keys := make([]sas.Key, len(spec.Devices))
	for i, d := range spec.Devices {
		if keys[i], err = sas.ParseKey(d.Key); err != nil {
			return err
		}
	}
	switch kind {
	case "paho":
		release, err = holdPaho(ctx, endpoints.Endpoints{MQTTAddress: spec.MQTTAddress, HubHostName: spec.Host}, tlsCfg, keys)
	case "paho-telemetry":
		return holdPahoTelemetry(ctx, spec, tlsCfg, keys)
	case "paho-ramp":
		return rampPaho(ctx, spec, tlsCfg, keys)
	default:
		return fmt.Errorf("unknown child %q", kind)
	}
	if err != nil {
		return err
	}
	held := goMem()
	if prof := os.Getenv("BENCH_HEAP_PROFILE"); prof != "" {
		for _, p := range []string{"heap", "goroutine"} {
			if f, err := os.Create(prof + "." + p + "." + kind); err == nil {
				_ = pprof.Lookup(p).WriteTo(f, 0)
				f.Close()
			}
		}
	}
	fmt.Printf("HELD %d %s\n", len(spec.Devices), held)
	_, _ = io.Copy(io.Discard, os.Stdin)
	release()
	return nil
}

// fleetSide is what one side of the memory comparison held.
type fleetSide struct {
	rssBaseKiB, rssHeldKiB int64
	baseDevices            int      // devices already held at the base figures (agent fleet: 1)
	cpuHeld                float64  // utime+stime seconds from start to HELD
	goPerDev               goMemFig // Go sides only
	hubsimRSSKiB           int64    // hubsim's VmRSS while this side held its devices
}

func (s fleetSide) rssPerDevKiB(n int) float64 {
	return float64(s.rssHeldKiB-s.rssBaseKiB) / float64(n-s.baseDevices)
}

// runAgentFleet measures the real `agent fleet` process: once with one device (the process's
// footprint: it creates its devices before connecting any, so there is no moment with the
// devices' memory and no connection to read) and once with n; the per-device figures are the
// differences over n-1 devices. Heap+stack and goroutines come from the fleet's own Go metrics
// (--metrics-addr) after it collected garbage (/debug/pprof/heap?gc=1, --pprof).
func runAgentFleet(ctx context.Context, binDir string, spec fleetSpec, n, hubPID int) (fleetSide, error) {
	s := fleetSide{baseDevices: 1}
	var base goMemFig
	for _, count := range []int{1, n} {
		dir, err := os.MkdirTemp("", "iothubby-bench-fleet-")
		if err != nil {
			return s, err
		}
		defer os.RemoveAll(dir)
		file, err := writeFleetFile(dir, spec, fleetFile{count: count, connectRate: 10000, telemetry: 60 * time.Second})
		if err != nil {
			return s, err
		}
		p, err := startFleet(ctx, binDir, file)
		if err != nil {
			return s, err
		}
		err = p.waitHeld(ctx, count, 10*time.Minute)
		var m goMemFig
		if err == nil {
			m, err = p.goMem(ctx)
		}
		var rss int64
		if err == nil {
			rss, err = procStatusKiB(p.pid(), "VmRSS")
		}
		if err == nil && count == n {
			s.cpuHeld, err = procCPU(p.pid())
		}
		if err == nil && count == n {
			s.hubsimRSSKiB, err = procStatusKiB(hubPID, "VmRSS")
		}
		p.stop()
		if err != nil {
			return s, err
		}
		if count == 1 {
			s.rssBaseKiB, base = rss, m
		} else {
			s.rssHeldKiB = rss
			s.goPerDev = m.perDev(base, n-1)
		}
	}
	return s, nil
}

// runSide starts one side, records RSS at BASE and HELD, and stops it.
func runSide(ctx context.Context, cmd *exec.Cmd, n, hubPID int) (fleetSide, error) {
	var s fleetSide
	c, err := startChild(ctx, cmd)
	if err != nil {
		return s, err
	}
	defer c.stop()
	base, err := c.expect("BASE", 60*time.Second)
	if err != nil {
		return s, err
	}
	if s.rssBaseKiB, err = procStatusKiB(c.cmd.Process.Pid, "VmRSS"); err != nil {
		return s, err
	}
	held, err := c.expect("HELD", 10*time.Minute)
	if err != nil {
		return s, err
	}
	if s.rssHeldKiB, err = procStatusKiB(c.cmd.Process.Pid, "VmRSS"); err != nil {
		return s, err
	}
	if s.cpuHeld, err = procCPU(c.cmd.Process.Pid); err != nil {
		return s, err
	}
	if s.hubsimRSSKiB, err = procStatusKiB(hubPID, "VmRSS"); err != nil {
		return s, err
	}
	if len(base) > 0 && len(held) > 1 {
		g0, err := parseGoMem(base)
		if err != nil {
			return s, err
		}
		g1, err := parseGoMem(held[1:])
		if err != nil {
			return s, err
		}
		s.goPerDev = g1.perDev(g0, n)
	}
	return s, nil
}

// benchFleetMemory holds n devices against one hubsim process three ways, each in its own
// process: bare paho clients (the heap+stack baseline), `agent fleet` (registry identities from
// a connection-strings file, telemetry every 60 s) and Microsoft's Node device SDK
// (test/bench/node/fleet.js, the RSS baseline). RSS per device is the process's VmRSS once all
// are connected minus its VmRSS before the first connect (for the fleet: with one device).
func benchFleetMemory(ctx context.Context, binDir, repo string, n int, withNode bool, report func(string, float64, bool, string)) error {
	if withNode {
		if _, err := os.Stat(filepath.Join(repo, "test/conformance/node_modules/azure-iot-device-mqtt")); err != nil {
			return fmt.Errorf("the Node SDK side needs test/conformance/node_modules: cd test/conformance && npm ci --ignore-scripts (%w)", err)
		}
	}
	b, err := newFleetBench(ctx, binDir, n, time.Minute)
	if err != nil {
		return err
	}
	defer b.close()
	ep, spec, specFile := b.ep, b.spec, b.specFile
	self, err := os.Executable()
	if err != nil {
		return err
	}
	goChild := func(kind string) *exec.Cmd {
		cmd := exec.CommandContext(ctx, self, specFile)
		cmd.Env = append(os.Environ(), childEnv+"="+kind)
		return cmd
	}
	nodeChild := func() *exec.Cmd {
		cmd := exec.CommandContext(ctx, "node", "--expose-gc", filepath.Join(repo, "test/bench/node/fleet.js"), specFile)
		cmd.Env = append(os.Environ(), "NODE_PATH="+filepath.Join(repo, "test/conformance/node_modules"), "NODE_EXTRA_CA_CERTS="+ep.CAFile)
		return cmd
	}
	// hubsim's footprint with the devices in its registry and none connected.
	hubIdle, err := procStatusKiB(ep.PID, "VmRSS")
	if err != nil {
		return err
	}
	sides := map[string]fleetSide{}
	kinds := []string{"paho", "fleet", "node"}
	if !withNode {
		kinds = kinds[:2]
	}
	for _, kind := range kinds {
		start := time.Now()
		var s fleetSide
		var err error
		switch kind {
		case "paho":
			s, err = runSide(ctx, goChild("paho"), n, ep.PID)
		case "fleet":
			s, err = runAgentFleet(ctx, binDir, spec, n, ep.PID)
		case "node":
			s, err = runSide(ctx, nodeChild(), n, ep.PID)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", kind, err)
		}
		sides[kind] = s
		fmt.Printf("fleet-memory: %-5s %d devices in %.0fs (%.1f CPU s): RSS %.1f KiB/device (base %d KiB, held %d KiB)",
			kind, n, time.Since(start).Seconds(), s.cpuHeld, s.rssPerDevKiB(n), s.rssBaseKiB, s.rssHeldKiB)
		if kind != "node" {
			g := s.goPerDev
			fmt.Printf(", heap+stack %.1f KiB/device (objects %.1f, unused span bytes %.1f, stacks %.1f), %.1f goroutines/device",
				g.heapStack()/1024, g.objects/1024, g.unused/1024, g.stacks/1024, g.goroutines)
		}
		fmt.Printf("; hubsim %.1f KiB RSS/connection above its idle %d KiB\n", float64(s.hubsimRSSKiB-hubIdle)/float64(n), hubIdle)
	}
	hs := sides["fleet"].goPerDev.heapStack() / sides["paho"].goPerDev.heapStack()
	report("fleet heap+stack/dev / paho", hs, hs <= 1.3, "<= 1.3")
	if withNode {
		rss := sides["fleet"].rssPerDevKiB(n) / sides["node"].rssPerDevKiB(n)
		report("fleet RSS/dev / Node SDK", rss, rss <= 0.6, "<= 0.6")
	}
	return nil
}

// serviceAndDevices creates n devices (bench-00000...) on hubsim and returns their keys, base64.
func serviceAndDevices(ctx context.Context, ep endpoints.Endpoints, n int) (*service.Client, []string, error) {
	svc, err := service.New(service.Config{ConnectionString: ep.ServiceConnectionString, Address: ep.HTTPSAddress, CAFile: ep.CAFile})
	if err != nil {
		return nil, nil, err
	}
	keys, err := createDevices(ctx, svc, n)
	if err != nil {
		svc.Close()
		return nil, nil, err
	}
	out := make([]string, n)
	for i, k := range keys {
		out[i] = k.Base64()
	}
	return svc, out, nil
}
