//go:build soak

package soak

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/iothubby/iothubby/internal/netfault"
	"github.com/iothubby/iothubby/pkg/connstr"
	"github.com/iothubby/iothubby/pkg/hubsim/endpoints"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Settings of the agents under test; the duplicate bound is derived from them.
const (
	telemetryInterval = 200 * time.Millisecond
	maxInFlight       = 8
	fsyncInterval     = time.Second
	sampleEvery       = 2 * time.Second
	// hubsim keeps the last 1000 messages per device: at 5 per second that is 200 s, so a poll
	// every 30 s (and one just before each hubsim SIGKILL) sees every record.
	pollEvery     = 30 * time.Second
	waitBound     = 60 * time.Second // bound on any single wait for a process or a view
	convergeBound = 30 * time.Second // reported state converged this long after the last fault
)

// Bounds on resource growth over the second half of the run (fitted slope × span).
var growthBounds = map[string]float64{
	"agent/go_goroutines":                20,
	"agent/process_open_fds":             10,
	"agent/go_memstats_heap_inuse_bytes": 8 << 20,
	"hubsim/threads":                     8,
	"hubsim/open_fds":                    20,
	"hubsim/rss_kb":                      32 << 10,
}

var binDir string

func TestMain(m *testing.M) {
	binDir = os.Getenv("IOTHUBBY_BIN")
	if binDir == "" {
		dir, err := os.MkdirTemp("", "iothubby-soak-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		cmd := exec.Command("go", "build", "-o", dir+"/", "github.com/iothubby/iothubby/cmd/...")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build binaries:", err)
			os.Exit(2)
		}
		binDir = dir
		code := m.Run()
		os.RemoveAll(dir)
		os.Exit(code)
	}
	os.Exit(m.Run())
}

// fault is one injected fault: when it started and when it ended (the rule's duration passed,
// the killed process is back), and the agents it concerns.
type fault struct {
	kind       string
	start, end time.Time
	agents     []int
}

type agentProc struct {
	*proc
	metrics  string    // --metrics-addr
	killedAt time.Time // when the soak SIGKILLed it (zero: not killed)
}

type agent struct {
	idx      int
	id       string
	proxy    *netfault.Proxy // between the agent and hubsim's MQTT listener
	stateDir string
	cfgPath  string
	csPath   string

	mu    sync.Mutex
	procs []*agentProc
	kills int
}

func (a *agent) cur() *agentProc {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.procs[len(a.procs)-1]
}

// handed is one scrape of an agent process's telemetry_sent_total.
type handed struct {
	agent int
	p     *proc
	sent  uint64
}

type sample struct {
	at time.Duration // since the start
	v  float64
}

type hubInst struct {
	*proc
	up       time.Time // serving since
	lastPoll time.Time
}

type soak struct {
	t         *testing.T
	seed      int64
	netFaults bool // network faults through internal/netfault in the schedule (SOAK_NETFAULT)
	dur       time.Duration
	start     time.Time
	state     string
	mqtt      string
	https     string
	svc       *service.Client
	caFile    string
	hubHost   string
	agents    []*agent
	fleet     *fleetRun      // nil without SOAK_FLEET
	targets   []string       // every device id the drivers and the poller work on: agents', then the fleet's
	rng       *rand.Rand     // the schedule's; only the scheduler goroutine draws from it
	bg        sync.WaitGroup // goroutines that lift timed network faults
	unsuppor  map[string]string

	// gate: the desired driver and the telemetry poller hold it shared; a hubsim restart holds
	// it exclusively, from the last poll of the old instance until every agent synced with the
	// new one, so no desired version is written to an instance about to be killed unseen.
	gate sync.RWMutex
	hubs []*hubInst // guarded by gate

	mu          sync.Mutex // guards everything below
	faults      []fault
	skipped     map[string]int
	handed      []handed
	samples     map[string][]sample
	hubSamples  map[*proc]map[string][]sample
	records     []record
	methods     map[string]int
	desiredSeq  map[string]int64 // last value written
	desiredVer  map[string]int64 // version the hub answered for it
	lostDesired int              // acknowledged desired versions a hubsim SIGKILL lost
	// syncedBeforeSeen counts agents whose sync with a restarted hubsim the soak read before it
	// saw that hubsim serve (killHub's back).
	syncedBeforeSeen int
	unobserved       []window // from a hubsim's last poll to its SIGKILL
	patchErrs        map[string]int
	unexpected       []string // driver and harness errors that are violations
}

type record struct{ mid, key string }

func envDuration(name string, def time.Duration) (time.Duration, error) {
	v := os.Getenv(name)
	if v == "" {
		return def, nil
	}
	return time.ParseDuration(v)
}

func TestSoak(t *testing.T) {
	dur, err := envDuration("SOAK", 10*time.Minute)
	if err != nil || dur < time.Minute {
		t.Fatalf("SOAK=%q: want a duration of at least 1m (%v)", os.Getenv("SOAK"), err)
	}
	seed := time.Now().UnixNano() % 1_000_000
	if v := os.Getenv("SOAK_SEED"); v != "" {
		if seed, err = strconv.ParseInt(v, 10, 64); err != nil {
			t.Fatalf("SOAK_SEED=%q: %v", v, err)
		}
	}
	n := 3
	if v := os.Getenv("SOAK_AGENTS"); v != "" {
		if n, err = strconv.Atoi(v); err != nil || n < 2 || n > 50 {
			t.Fatalf("SOAK_AGENTS=%q: want 2 to 50", v)
		}
	}
	fleetN := 20
	if v := os.Getenv("SOAK_FLEET"); v != "" {
		if fleetN, err = strconv.Atoi(v); err != nil || fleetN < 0 || fleetN > 1000 {
			t.Fatalf("SOAK_FLEET=%q: want 0 to 1000 devices", v)
		}
	}
	// SOAK_NETFAULT=0 leaves the network faults out of the schedule, to tell whether a failure
	// needs them. (It was the brief soak's default while toxiproxy v2.5.0 could panic when a fault
	// changed on a live proxy; internal/netfault no longer changes toxics after a proxy starts.)
	netFault := os.Getenv("SOAK_NETFAULT") != "0"
	fmt.Printf("soak: SOAK=%v SOAK_SEED=%d SOAK_AGENTS=%d SOAK_FLEET=%d SOAK_NETFAULT=%v (rerun with the same seed for the same schedule)\n", dur, seed, n, fleetN, netFault)

	s := &soak{t: t, seed: seed, netFaults: netFault, dur: dur, state: t.TempDir(), rng: rand.New(rand.NewPCG(uint64(seed), 0x50a6)),
		unsuppor: map[string]string{}, skipped: map[string]int{}, samples: map[string][]sample{},
		hubSamples: map[*proc]map[string][]sample{}, methods: map[string]int{}, desiredSeq: map[string]int64{},
		desiredVer: map[string]int64{}, patchErrs: map[string]int{}}
	rep := s.run(n, fleetN)
	rep.Write(os.Stdout)
	for _, inv := range rep.Failed() {
		t.Errorf("invariant %q violated: %s", inv.Name, inv.Detail)
	}
	if t.Failed() {
		s.dumpTails()
	}
}

func (s *soak) dumpTails() {
	s.gate.RLock()
	if len(s.hubs) > 0 {
		s.t.Logf("--- last log lines of hubsim ---\n%s", s.hubs[len(s.hubs)-1].tailText())
	}
	s.gate.RUnlock()
	for _, a := range s.agents {
		s.t.Logf("--- last log lines of agent %s ---\n%s", a.id, a.cur().tailText())
	}
}

func (s *soak) violation(format string, args ...any) {
	s.mu.Lock()
	s.unexpected = append(s.unexpected, fmt.Sprintf(format, args...))
	s.mu.Unlock()
}

func (s *soak) since() time.Duration { return time.Since(s.start) }

// run is the whole soak; it returns the report (whose failed invariants fail the test).
func (s *soak) run(n, fleetN int) *Report {
	t := s.t
	s.start = time.Now()
	var err error
	if s.mqtt, err = freeAddr(); err != nil {
		t.Fatal(err)
	}
	if s.https, err = freeAddr(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	h, err := s.startHub(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s.hubs = append(s.hubs, h)
	defer func() {
		s.gate.RLock()
		defer s.gate.RUnlock()
		s.hubs[len(s.hubs)-1].kill()
	}()

	for i := 0; i < n; i++ {
		id := fmt.Sprintf("soak-%d", i)
		wctx, wcancel := context.WithTimeout(ctx, waitBound)
		d, err := s.svc.CreateDevice(wctx, service.Device{DeviceID: id, Status: "enabled"})
		wcancel()
		if err != nil {
			t.Fatalf("create %s: %v", id, err)
		}
		a, err := s.newAgent(i, id, d.Authentication.SymmetricKey.PrimaryKey)
		if err != nil {
			t.Fatal(err)
		}
		s.agents = append(s.agents, a)
	}
	defer func() {
		for _, a := range s.agents {
			a.mu.Lock()
			for _, p := range a.procs {
				p.kill()
			}
			a.mu.Unlock()
		}
	}()
	for _, a := range s.agents {
		if err := s.startAgent(a); err != nil {
			t.Fatal(err)
		}
	}
	for _, a := range s.agents {
		if _, err := s.awaitSynced(ctx, a, time.Time{}); err != nil {
			t.Fatal(err)
		}
		s.targets = append(s.targets, a.id)
	}
	if fleetN > 0 {
		if s.fleet, err = s.startFleet(ctx, fleetN); err != nil {
			t.Fatal(err)
		}
		defer s.fleet.kill()
		s.targets = append(s.targets, s.fleet.ids...)
	}

	warmup := 8 * time.Second
	quiet := min(max(s.dur/5, 20*time.Second), 60*time.Second)
	windowEnd := s.start.Add(s.dur - quiet)

	var bg sync.WaitGroup
	bgCtx, bgStop := context.WithCancel(ctx)
	drvCtx, drvStop := context.WithCancel(ctx)
	defer bgStop()
	defer drvStop()
	bg.Add(2)
	go func() { defer bg.Done(); s.telemetryPoller(bgCtx) }()
	go func() { defer bg.Done(); s.sampler(bgCtx) }()
	var drv sync.WaitGroup
	drv.Add(2)
	go func() { defer drv.Done(); s.desiredDriver(drvCtx) }()
	go func() { defer drv.Done(); s.methodDriver(drvCtx) }()

	// The schedule: faults from warmup until the quiet period, paced by the seeded generator.
	next := s.start.Add(warmup)
	hubKillUntil := s.start.Add(warmup + (s.dur-quiet-warmup)/2)
	for {
		if !s.sleepUntil(ctx, next) {
			break
		}
		if !time.Now().Before(windowEnd) {
			break
		}
		s.inject(ctx, time.Now().Before(hubKillUntil), windowEnd)
		next = time.Now().Add(3*time.Second + time.Duration(s.rng.Int64N(int64(5*time.Second))))
	}
	drvStop()
	drv.Wait()
	s.bg.Wait() // every network fault lifted (each ends by windowEnd)

	s.mu.Lock()
	lastEnd := s.start.Add(warmup)
	for _, f := range s.faults {
		if f.end.After(lastEnd) {
			lastEnd = f.end
		}
	}
	s.mu.Unlock()
	converged, convErr := s.awaitConverged(ctx, lastEnd)

	// The rest of the quiet period: telemetry flows, resources are sampled.
	s.sleepUntil(ctx, s.start.Add(s.dur))
	bgStop()
	bg.Wait()

	// Stop the agents cleanly (they drain their queues), then read hubsim's record once more.
	stopErrs := map[string]error{}
	for _, a := range s.agents {
		sctx, scancel := context.WithTimeout(ctx, waitBound)
		if err := a.cur().stop(sctx); err != nil {
			stopErrs[a.id] = err
		}
		scancel()
	}
	if s.fleet != nil {
		sctx, scancel := context.WithTimeout(ctx, waitBound)
		if err := s.fleet.stop(sctx); err != nil {
			stopErrs["fleet"] = err
		}
		scancel()
	}
	s.gate.RLock()
	s.pollTelemetry(ctx, s.hubs[len(s.hubs)-1], len(s.hubs)-1)
	s.gate.RUnlock()

	return s.report(lastEnd, converged, convErr, stopErrs)
}

// sleepUntil is the schedule's pacing; false when ctx ended.
func (s *soak) sleepUntil(ctx context.Context, at time.Time) bool {
	d := time.Until(at)
	if d <= 0 {
		return ctx.Err() == nil
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-tm.C:
		return true
	}
}

func (s *soak) startHub(ctx context.Context) (*hubInst, error) {
	_ = os.Remove(filepath.Join(s.state, endpoints.File))
	p, err := startProc(binDir, "hubsim", func(string) bool { return false }, "serve", "--state", s.state,
		"--mqtt-addr", s.mqtt, "--https-addr", s.https, "--amqp-addr=", "--log-format", "json", "--log-level", "info",
		// The Event Hubs-compatible store keeps 100,000 events per partition by default: it would
		// still be filling (by design) in the second half, where hubsim's memory is measured.
		"--event-max", "500")
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, waitBound)
	defer cancel()
	var ep endpoints.Endpoints
	err = poll(wctx, "hubsim's endpoints.json", func() error {
		if !p.alive() {
			return fmt.Errorf("hubsim exited: %v\n%s", p.err, p.tailText())
		}
		e, err := endpoints.Read(s.state)
		if err != nil {
			return err
		}
		if e.PID != p.cmd.Process.Pid {
			return errNotYet
		}
		ep = e
		return nil
	})
	if err != nil {
		p.kill()
		return nil, err
	}
	if s.svc == nil {
		c, err := service.New(service.Config{ConnectionString: ep.ServiceConnectionString, Address: ep.HTTPSAddress, CAFile: ep.CAFile})
		if err != nil {
			p.kill()
			return nil, err
		}
		s.t.Cleanup(c.Close)
		s.svc, s.caFile, s.hubHost = c, ep.CAFile, ep.HubHostName
	}
	return &hubInst{proc: p, up: time.Now()}, nil
}

// agentKeep selects the agent log lines the checks read.
func agentKeep(msg string) bool {
	switch msg {
	case "connected", "disconnected, retrying", "disconnected", "twin synced", "desired version applied",
		"desired version went back; applying the hub's twin", "telemetry delivered", "telemetry message failed",
		"telemetry message refused", "telemetry kept on disk for the next start", "direct method answered",
		"queue spool opened", "queue spool: resending messages kept on disk", "stopped":
		return true
	}
	return false
}

func (s *soak) newAgent(i int, id, key string) (*agent, error) {
	dir := filepath.Join(s.state, "agents", id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	px, err := netfault.New("127.0.0.1:0", s.mqtt, nil)
	if err != nil {
		return nil, err
	}
	s.t.Cleanup(px.Close)
	// The agent dials the proxy; TLS and authentication are hubsim's, end to end.
	cs := connstr.ConnectionString{HostName: s.hubHost, DeviceID: id, SharedAccessKey: key, GatewayHostName: px.Addr()}.String()
	a := &agent{idx: i, id: id, proxy: px, stateDir: filepath.Join(dir, "state"), cfgPath: filepath.Join(dir, "agent.yaml"), csPath: filepath.Join(dir, "cs")}
	if err := os.WriteFile(a.csPath, []byte(cs), 0o600); err != nil {
		return nil, err
	}
	cfg := fmt.Sprintf(`log:
  format: json
  level: debug
tls:
  caFile: %q
stateDir: %q
shutdownTimeout: 10s
connection:
  keepAlive: 10s
  backoffMin: 1s
  backoffMax: 4s
  operationTimeout: 10s
queue:
  persist: true
  capacity: 5000
  maxInFlight: %d
  fsync: interval
  fsyncInterval: %v
telemetry:
  interval: %v
methodTimeout: 10s
methods:
  echo:
    echo: true
twin:
  default:
    action: accept
`, s.caFile, a.stateDir, maxInFlight, fsyncInterval, telemetryInterval)
	return a, os.WriteFile(a.cfgPath, []byte(cfg), 0o600)
}

func (s *soak) startAgent(a *agent) error {
	addr, err := freeAddr()
	if err != nil {
		return err
	}
	p, err := startProc(binDir, "agent", agentKeep, "run", "--config", a.cfgPath, "--connection-string-file", a.csPath,
		"--metrics-addr", addr)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.procs = append(a.procs, &agentProc{proc: p, metrics: addr})
	a.mu.Unlock()
	return nil
}

// awaitSynced waits until the agent's current process logs "twin synced" at or after since, by
// the agent's own timestamp, and returns that line.
func (s *soak) awaitSynced(ctx context.Context, a *agent, since time.Time) (line, error) {
	wctx, cancel := context.WithTimeout(ctx, waitBound)
	defer cancel()
	p := a.cur()
	l, err := p.await(wctx, since, "twin synced", func(l line) bool {
		return l.msg() == "twin synced" && !l.logged().Before(since)
	})
	if err != nil {
		return line{}, fmt.Errorf("agent %s: %w; its connection lines from 10s before: %s", a.id, err, connectionTrail(p.proc, since.Add(-10*time.Second), since))
	}
	return l, nil
}

// connectionTrail lists a process's connection lines read at or after from, each with the time
// it was read and the agent's own timestamp, relative to ref: the reason a wait for a sync
// failed.
func connectionTrail(p *proc, from, ref time.Time) string {
	var b strings.Builder
	for _, l := range p.snapshot() {
		switch l.msg() {
		case "connected", "disconnected, retrying", "disconnected", "twin synced":
		default:
			continue
		}
		if l.at.Before(from) {
			continue
		}
		fmt.Fprintf(&b, "[read %+v", l.at.Sub(ref).Round(time.Millisecond))
		if ts, err := LogTime(l.str("ts")); err == nil {
			fmt.Fprintf(&b, " logged %+v", ts.Sub(ref).Round(time.Millisecond))
		}
		fmt.Fprintf(&b, " %s", l.msg())
		for _, k := range []string{"reason", "attempt", "retry_in", "error"} {
			if v := l.str(k); v != "" {
				fmt.Fprintf(&b, " %s=%s", k, v)
			}
		}
		b.WriteString("] ")
	}
	return b.String()
}

// inject draws one fault from the schedule and applies it.
func (s *soak) inject(ctx context.Context, hubKillAllowed bool, windowEnd time.Time) {
	type choice struct {
		kind   string
		weight int
	}
	choices := []choice{{"drop", 3}, {"drop-all", 1}, {"refuse-connect", 2}, {"agent-kill", 3},
		{"puback-drop", 2}, {"puback-delay", 1}, {"token-expire", 2}, {"stall", 1}, {"rest-error", 1},
		{"net-latency", 1}, {"net-bandwidth", 1}, {"net-slicer", 1}, {"net-reset", 1}, {"net-blackhole", 2}, {"net-down", 1}}
	if !s.netFaults {
		kept := choices[:0]
		for _, c := range choices {
			if !strings.HasPrefix(c.kind, "net-") {
				kept = append(kept, c)
			}
		}
		choices = kept
	}
	if hubKillAllowed {
		choices = append(choices, choice{"hubsim-kill", 3})
	}
	total := 0
	for _, c := range choices {
		total += c.weight
	}
	r := s.rng.IntN(total)
	var kind string
	for _, c := range choices {
		if r < c.weight {
			kind = c.kind
			break
		}
		r -= c.weight
	}
	ai := s.rng.IntN(len(s.agents))
	dur := 2 + s.rng.Float64()*6 // seconds, for faults with a duration
	if rest := time.Until(windowEnd).Seconds(); dur > rest {
		dur = max(rest, 0.5)
	}
	fseed := s.rng.Uint64()
	if why, ok := s.unsupported(kind); ok {
		s.mu.Lock()
		s.skipped[kind]++
		s.mu.Unlock()
		_ = why
		return
	}
	start := time.Now()
	f := fault{kind: kind, start: start, end: start, agents: []int{ai}}
	var err error
	switch kind {
	case "drop":
		err = s.adminFault(ctx, kind, map[string]any{"action": "drop", "deviceId": s.agents[ai].id})
	case "drop-all":
		f.agents = s.all()
		err = s.adminFault(ctx, kind, map[string]any{"action": "drop"})
	case "refuse-connect":
		// Refuse its CONNECTs for a while, then drop it so the refusal bites.
		err = s.adminFault(ctx, kind, map[string]any{"action": "refuse-connect", "deviceId": s.agents[ai].id,
			"code": 3, "durationSecs": dur, "seed": fseed})
		if err == nil {
			err = s.adminFault(ctx, kind, map[string]any{"action": "drop", "deviceId": s.agents[ai].id})
		}
		f.end = start.Add(time.Duration(dur * float64(time.Second)))
	case "puback-drop":
		err = s.adminFault(ctx, kind, map[string]any{"action": "puback-drop", "deviceId": s.agents[ai].id,
			"durationSecs": dur, "probability": 0.5, "seed": fseed})
		f.end = start.Add(time.Duration(dur * float64(time.Second)))
	case "puback-delay":
		err = s.adminFault(ctx, kind, map[string]any{"action": "puback-delay", "deviceId": s.agents[ai].id,
			"durationSecs": dur, "delaySecs": 2})
		f.end = start.Add(time.Duration(dur * float64(time.Second)))
	case "token-expire":
		err = s.adminFault(ctx, kind, map[string]any{"action": "token-expire", "deviceId": s.agents[ai].id})
	case "stall":
		err = s.adminFault(ctx, kind, map[string]any{"action": "stall", "deviceId": s.agents[ai].id, "durationSecs": dur})
		f.end = start.Add(time.Duration(dur * float64(time.Second)))
	case "rest-error":
		f.agents = nil
		err = s.adminFault(ctx, kind, map[string]any{"action": "rest-error", "code": 503, "durationSecs": dur,
			"pathPrefix": "/twins/", "probability": 0.5, "seed": fseed})
		f.end = start.Add(time.Duration(dur * float64(time.Second)))
	case "net-latency", "net-bandwidth", "net-slicer", "net-reset", "net-blackhole", "net-down":
		d := time.Duration(dur * float64(time.Second))
		switch kind {
		case "net-reset":
			d = min(d, time.Second) // long enough to reset a reconnect attempt or two
		case "net-blackhole":
			// Up to past 1.5 keep-alives: the agent must notice a connection that hears nothing.
			d = min(2*d, max(time.Until(windowEnd), 500*time.Millisecond))
		}
		f.end = start.Add(d)
		err = s.netFault(ctx, s.agents[ai].proxy, kind, f.end)
	case "agent-kill":
		ai = 1 + s.rng.IntN(len(s.agents)-1) // agent 0 lives through the run: its resources are sampled
		f.agents = []int{ai}
		offline := time.Duration(s.rng.Int64N(int64(3 * time.Second)))
		err = s.killAgent(ctx, s.agents[ai], offline)
		f.end = time.Now()
	case "hubsim-kill":
		f.agents = s.all()
		offline := time.Duration(s.rng.Int64N(int64(2 * time.Second)))
		var back time.Time
		back, err = s.killHub(ctx, offline)
		f.end = back
	}
	if errors.Is(err, errUnsupported) {
		return
	}
	if err != nil {
		s.violation("fault %s at %v: %v", kind, start.Sub(s.start).Round(time.Millisecond), err)
		return
	}
	s.mu.Lock()
	s.faults = append(s.faults, f)
	s.mu.Unlock()
}

func (s *soak) all() []int {
	out := make([]int, len(s.agents))
	for i := range out {
		out[i] = i
	}
	return out
}

var errUnsupported = errors.New("fault kind not supported by this hubsim")

func (s *soak) unsupported(kind string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	why, ok := s.unsuppor[kind]
	return why, ok
}

// adminFault POSTs to /hubsim/faults. A 400 for a kind newer than drop and refuse-connect marks
// it unsupported (a hubsim without it): the schedule skips it from then on and the table says
// so, with hubsim's words.
func (s *soak) adminFault(ctx context.Context, kind string, body map[string]any) error {
	wctx, cancel := context.WithTimeout(ctx, waitBound)
	defer cancel()
	var out json.RawMessage
	err := s.svc.HubsimFaults(wctx, service.FaultsPost, body, &out)
	var se wire.ServiceError
	if errors.As(err, &se) && se.Status == 400 && kind != "drop" && kind != "drop-all" && kind != "refuse-connect" {
		s.mu.Lock()
		s.unsuppor[kind] = se.Text
		s.skipped[kind]++
		s.mu.Unlock()
		return errUnsupported
	}
	return err
}

// netFault puts a network fault on an agent's proxy until end; a goroutine the soak owns (s.bg)
// lifts it then, or when ctx ends.
func (s *soak) netFault(ctx context.Context, px *netfault.Proxy, kind string, end time.Time) error {
	var f *netfault.Fault
	var err error
	switch kind {
	case "net-latency":
		f, err = px.Latency(300*time.Millisecond, 100*time.Millisecond)
	case "net-bandwidth":
		f, err = px.Bandwidth(2)
	case "net-slicer":
		f, err = px.Slicer(64, 32, time.Millisecond)
	case "net-reset":
		f, err = px.Reset()
	case "net-blackhole":
		f, err = px.Blackhole()
	case "net-down":
		px.Down()
	}
	if err != nil {
		return err
	}
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		s.sleepUntil(ctx, end) // the fault's duration
		if f != nil {
			if err := f.Remove(); err != nil {
				s.violation("lift %s: %v", kind, err)
			}
			return
		}
		if err := px.Up(); err != nil {
			s.violation("lift %s: %v", kind, err)
		}
	}()
	return nil
}

func (s *soak) killAgent(ctx context.Context, a *agent, offline time.Duration) error {
	p := a.cur()
	// The moment of the signal, not of the reaped exit (kill waits for that, longer under load):
	// the killed process's last flush was before it, and killAllowance reckons back from it.
	killedAt := time.Now()
	p.kill()
	a.mu.Lock()
	a.kills++
	p.killedAt = killedAt
	a.mu.Unlock()
	s.sleepUntil(ctx, time.Now().Add(offline)) // the schedule's pacing: how long the device stays off
	return s.startAgent(a)
}

// killHub SIGKILLs hubsim and starts it again on the same state directory; it returns when the
// new instance serves. It holds the gate until every agent synced with the new instance, and
// then reconciles the driver's desired versions with what the new instance kept.
func (s *soak) killHub(ctx context.Context, offline time.Duration) (time.Time, error) {
	s.gate.Lock()
	defer s.gate.Unlock()
	old := s.hubs[len(s.hubs)-1]
	s.pollTelemetry(ctx, old, len(s.hubs)-1)
	old.kill()
	killed := time.Now()
	s.sleepUntil(ctx, killed.Add(offline))
	h, err := s.startHub(ctx)
	if err != nil {
		return time.Time{}, fmt.Errorf("hubsim restart: %w", err)
	}
	back := time.Now()
	s.hubs = append(s.hubs, h)
	s.mu.Lock()
	s.unobserved = append(s.unobserved, window{old.lastPoll, killed.Add(time.Second)})
	s.mu.Unlock()
	// Any sync an agent logged after the old instance died is with the new one. It may come
	// before back, the moment the soak saw the new instance serve: an agent whose retry falls
	// between hubsim listening and the soak's next poll of endpoints.json (up to 200 ms apart)
	// connects and syncs in that gap. Waiting for a sync after back then waited for a second
	// one that no fault would cause (seed 820947: deadline exceeded, the agent long synced).
	for _, a := range s.agents {
		l, err := s.awaitSynced(ctx, a, killed)
		if err != nil {
			return back, fmt.Errorf("after the hubsim restart: %w", err)
		}
		if l.at.Before(back) { // read before back: a wait from back would have skipped it
			s.mu.Lock()
			s.syncedBeforeSeen++
			s.mu.Unlock()
		}
	}
	if s.fleet != nil {
		if err := s.awaitFleetConnected(ctx, back); err != nil {
			return back, fmt.Errorf("after the hubsim restart: %w", err)
		}
	}
	// A PATCH hubsim answered within its last 100 ms may be gone (docs/hubsim.md): count it and
	// go on from what the hub has, so later versions are not compared against a lost one.
	for _, id := range s.targets {
		wctx, cancel := context.WithTimeout(ctx, waitBound)
		var tw service.Twin
		err := poll(wctx, "twin of "+id+" after the hubsim restart", func() error { // a rest-error may answer 503
			var err error
			tw, err = s.svc.GetTwin(wctx, id)
			return err
		})
		cancel()
		if err != nil {
			return back, err
		}
		ver := desiredVersion(tw)
		s.mu.Lock()
		if ver < s.desiredVer[id] {
			s.lostDesired += int(s.desiredVer[id] - ver)
			s.desiredVer[id] = ver
			v, _ := tw.Properties.Desired["soakSeq"].(float64)
			s.desiredSeq[id] = int64(v)
		}
		s.mu.Unlock()
	}
	return back, nil
}

func desiredVersion(tw service.Twin) int64 {
	v, _ := tw.Properties.Desired["$version"].(float64)
	return int64(v)
}

// telemetryPoller reads hubsim's recorded telemetry (in memory, the last 1000 per device) every
// pollEvery, so a hubsim restart loses nothing the soak has not seen.
func (s *soak) telemetryPoller(ctx context.Context) {
	tk := time.NewTicker(pollEvery)
	defer tk.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tk.C:
		}
		s.gate.RLock()
		s.pollTelemetry(ctx, s.hubs[len(s.hubs)-1], len(s.hubs)-1)
		s.gate.RUnlock()
	}
}

// pollTelemetry reads every device's recorded telemetry from instance h (number inst).
func (s *soak) pollTelemetry(ctx context.Context, h *hubInst, inst int) {
	started := time.Now()
	for _, id := range s.targets {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		msgs, err := s.svc.Telemetry(wctx, id)
		cancel()
		if err != nil {
			if ctx.Err() == nil && h.alive() {
				s.violation("recorded telemetry of %s: %v", id, err)
			}
			return
		}
		s.mu.Lock()
		for _, m := range msgs {
			s.records = append(s.records, record{mid: m.SystemProperties["message-id"],
				key: fmt.Sprintf("%d/%s", inst, m.SystemProperties["iothub-enqueuedtime"])})
		}
		s.mu.Unlock()
	}
	h.lastPoll = started
}

// sampler scrapes each agent's telemetry counter and agent 0's resource gauges, and reads
// hubsim's resources from /proc, every sampleEvery.
func (s *soak) sampler(ctx context.Context) {
	tk := time.NewTicker(sampleEvery)
	defer tk.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tk.C:
		}
		at := s.since()
		for _, a := range s.agents {
			p := a.cur()
			if !p.alive() {
				continue
			}
			want := []string{"iothubby_telemetry_sent_total"}
			if a.idx == 0 {
				want = append(want, "go_goroutines", "process_open_fds", "go_memstats_heap_inuse_bytes")
			}
			m, err := scrape(ctx, p.metrics, want...)
			if err != nil {
				continue // the agent may be starting or just killed
			}
			s.mu.Lock()
			if v, ok := m["iothubby_telemetry_sent_total"]; ok {
				s.handed = append(s.handed, handed{agent: a.idx, p: p.proc, sent: uint64(v)})
			}
			if a.idx == 0 {
				for _, k := range want[1:] {
					if v, ok := m[k]; ok {
						s.samples["agent/"+k] = append(s.samples["agent/"+k], sample{at, v})
					}
				}
			}
			s.mu.Unlock()
		}
		s.gate.RLock()
		h := s.hubs[len(s.hubs)-1]
		s.gate.RUnlock()
		if th, fds, rss, err := procStats(h.cmd.Process.Pid); err == nil && h.alive() {
			s.mu.Lock()
			m := s.hubSamples[h.proc]
			if m == nil {
				m = map[string][]sample{}
				s.hubSamples[h.proc] = m
			}
			m["hubsim/threads"] = append(m["hubsim/threads"], sample{at, th})
			m["hubsim/open_fds"] = append(m["hubsim/open_fds"], sample{at, fds})
			m["hubsim/rss_kb"] = append(m["hubsim/rss_kb"], sample{at, rss})
			s.mu.Unlock()
		}
	}
}

// desiredDriver changes one device's desired property soakSeq every 0.5 to 2 s, round robin,
// each change a new desired version.
func (s *soak) desiredDriver(ctx context.Context) {
	rng := rand.New(rand.NewPCG(uint64(s.seed), 0xde51))
	for i := 0; ; i++ {
		if !s.sleepUntil(ctx, time.Now().Add(500*time.Millisecond+time.Duration(rng.Int64N(int64(1500*time.Millisecond))))) {
			return
		}
		a := struct{ id string }{s.targets[i%len(s.targets)]}
		s.gate.RLock()
		s.mu.Lock()
		val := s.desiredSeq[a.id] + 1
		s.mu.Unlock()
		var patch service.TwinPatch
		patch.Properties.Desired = map[string]any{"soakSeq": val}
		wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		tw, err := s.svc.UpdateTwin(wctx, a.id, patch, "")
		cancel()
		s.mu.Lock()
		var se wire.ServiceError
		switch {
		case err == nil:
			s.desiredSeq[a.id] = val
			s.desiredVer[a.id] = desiredVersion(tw)
			s.patchErrs["ok"]++
		case errors.As(err, &se) && se.Status == 503:
			s.patchErrs["503 (rest-error fault)"]++
		case ctx.Err() != nil:
		default:
			s.unexpected = append(s.unexpected, fmt.Sprintf("desired PATCH of %s: %v", a.id, err))
		}
		s.mu.Unlock()
		s.gate.RUnlock()
	}
}

// methodDriver calls `echo` on one device every 0.3 to 1 s, round robin, with a payload naming
// the call, and tallies the one answer each call gets.
func (s *soak) methodDriver(ctx context.Context) {
	rng := rand.New(rand.NewPCG(uint64(s.seed), 0x3e7))
	for i := 0; ; i++ {
		if !s.sleepUntil(ctx, time.Now().Add(300*time.Millisecond+time.Duration(rng.Int64N(int64(700*time.Millisecond))))) {
			return
		}
		a := struct{ id string }{s.targets[i%len(s.targets)]}
		payload := fmt.Sprintf(`{"call":%d,"device":%q}`, i, a.id)
		wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		res, err := s.svc.InvokeMethod(wctx, a.id, service.MethodCall{MethodName: "echo", Payload: json.RawMessage(payload),
			ResponseTimeout: 5 * time.Second})
		cancel()
		outcome := ""
		var se wire.ServiceError
		var ne net.Error
		switch {
		case err == nil && res.Status == 200:
			var got, want any
			_ = json.Unmarshal(res.Payload, &got)
			_ = json.Unmarshal([]byte(payload), &want)
			if fmt.Sprint(got) == fmt.Sprint(want) {
				outcome = "200"
			} else {
				outcome = "200 with another call's payload"
				s.violation("method call %d to %s answered with %s", i, a.id, res.Payload)
			}
		case err == nil:
			outcome = fmt.Sprintf("%d", res.Status)
			s.violation("method call %d to %s answered %d", i, a.id, res.Status)
		case errors.Is(err, wire.ErrDeviceNotOnline):
			outcome = "404103 not online"
		case errors.Is(err, wire.ErrMethodTimeout):
			outcome = "504101 timeout"
		case errors.As(err, &se) && se.Status == 503:
			outcome = "503 rest-error"
		case ctx.Err() != nil:
			return
		case errors.As(err, &ne), strings.Contains(err.Error(), "connection refused"), strings.Contains(err.Error(), "EOF"):
			outcome = "hub unreachable"
		default:
			outcome = "error"
			s.violation("method call %d to %s: %v", i, a.id, err)
		}
		s.mu.Lock()
		s.methods[outcome]++
		s.mu.Unlock()
	}
}

// awaitConverged polls every twin until its reported soakSeq acknowledges the desired one (value
// and version, status 200); it returns how long after lastEnd that was.
func (s *soak) awaitConverged(ctx context.Context, lastEnd time.Time) (time.Duration, error) {
	wctx, cancel := context.WithDeadline(ctx, lastEnd.Add(convergeBound))
	defer cancel()
	err := poll(wctx, "reported state converged", func() error {
		for _, id := range s.targets {
			tw, err := s.svc.GetTwin(wctx, id)
			if err != nil {
				return err
			}
			want := tw.Properties.Desired["soakSeq"]
			ack, _ := tw.Properties.Reported["soakSeq"].(map[string]any)
			if want == nil {
				continue
			}
			if ack == nil || ack["av"] != float64(desiredVersion(tw)) || ack["value"] != want || ack["ac"] != float64(200) {
				return fmt.Errorf("%s: desired soakSeq %v at version %d, reported %v", id, want, desiredVersion(tw), ack)
			}
		}
		return nil
	})
	return time.Since(lastEnd), err
}

// fleetRun is one `agent fleet` process of n devices from a connection-strings file.
type fleetRun struct {
	*proc
	ids     []string
	summary string
}

// startFleet creates the fleet's devices, starts `agent fleet` and waits until every device is
// connected.
func (s *soak) startFleet(ctx context.Context, n int) (*fleetRun, error) {
	dir := filepath.Join(s.state, "fleet")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	var css []string
	f := &fleetRun{summary: filepath.Join(dir, "summary.json")}
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("soak-fleet-%03d", i)
		wctx, cancel := context.WithTimeout(ctx, waitBound)
		d, err := s.svc.CreateDevice(wctx, service.Device{DeviceID: id, Status: "enabled"})
		cancel()
		if err != nil {
			return nil, fmt.Errorf("create %s: %w", id, err)
		}
		css = append(css, connstr.ConnectionString{HostName: s.hubHost, DeviceID: id,
			SharedAccessKey: d.Authentication.SymmetricKey.PrimaryKey, GatewayHostName: s.mqtt}.String())
		f.ids = append(f.ids, id)
	}
	csFile := filepath.Join(dir, "devices.cs")
	if err := os.WriteFile(csFile, []byte(strings.Join(css, "\n")+"\n"), 0o600); err != nil {
		return nil, err
	}
	cfg := fmt.Sprintf(`count: 0
connectionStringsFile: %q
stateDir: %q
shutdownTimeout: 20s
tls: {caFile: %q}
profiles:
  - name: soak
    weight: 1
    telemetry: {interval: 1s}
    queue: {persist: true, capacity: 2000}
    connection: {keepAlive: 10s, backoffMin: 1s, backoffMax: 4s, operationTimeout: 10s}
    methodTimeout: 10s
    methods:
      echo: {echo: true}
    twin:
      default: {action: accept}
log: {format: json, level: info}
`, csFile, filepath.Join(dir, "state"), s.caFile)
	cfgPath := filepath.Join(dir, "fleet.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	p, err := startProc(binDir, "agent", func(string) bool { return false }, "fleet", "--config", cfgPath, "--summary", f.summary)
	if err != nil {
		return nil, err
	}
	f.proc = p
	s.fleet = f
	if err := s.awaitFleetConnected(ctx, time.Time{}); err != nil {
		p.kill()
		return nil, err
	}
	return f, nil
}

// awaitFleetConnected polls hubsim's connection list until every fleet device has a connection
// made at or after since, subscribed to its desired patches.
func (s *soak) awaitFleetConnected(ctx context.Context, since time.Time) error {
	wctx, cancel := context.WithTimeout(ctx, waitBound)
	defer cancel()
	return poll(wctx, "every fleet device connected", func() error {
		if !s.fleet.alive() {
			return fmt.Errorf("agent fleet exited: %v\n%s", s.fleet.err, s.fleet.tailText())
		}
		cs, err := s.svc.Connections(wctx)
		if err != nil {
			return err
		}
		up := map[string]bool{}
		for _, c := range cs {
			if !c.ConnectedAt.Before(since.Add(-time.Second)) && slices.Contains(c.Subscriptions, "$iothub/twin/PATCH/properties/desired/#") {
				up[c.DeviceID] = true
			}
		}
		for _, id := range s.fleet.ids {
			if !up[id] {
				return fmt.Errorf("%s not connected (%d of %d)", id, len(up), len(s.fleet.ids))
			}
		}
		return nil
	})
}
