package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iothubby/iothubby/pkg/fleet"
	"github.com/iothubby/iothubby/pkg/hubsim/endpoints"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/service"
)

// fleetBench is one hubsim process with n registry devices and the spec file the children
// read, shared by the fleet memory, ramp and CPU comparisons.
type fleetBench struct {
	ep       endpoints.Endpoints
	spec     fleetSpec
	specFile string
	dir      string
	keys     []sas.Key
	tlsCfg   *tls.Config
	stop     func()
}

func newFleetBench(ctx context.Context, binDir string, n int, telemetry time.Duration) (*fleetBench, error) {
	ep, stop, err := startHubsimProc(ctx, binDir)
	if err != nil {
		return nil, err
	}
	b := &fleetBench{ep: ep, stop: stop}
	ok := false
	defer func() {
		if !ok {
			b.close()
		}
	}()
	svc, keys, err := serviceAndDevices(ctx, ep, n)
	if err != nil {
		return nil, err
	}
	svc.Close()
	b.spec = fleetSpec{Host: ep.HubHostName, MQTTAddress: ep.MQTTAddress, CAFile: ep.CAFile, Parallel: parallel, TelemetryMs: telemetry.Milliseconds()}
	for i, k := range keys {
		b.spec.Devices = append(b.spec.Devices, fleetDevice{ID: devID(i), Key: k})
		sk, err := sas.ParseKey(k)
		if err != nil {
			return nil, err
		}
		b.keys = append(b.keys, sk)
	}
	if b.dir, err = os.MkdirTemp("", "iothubby-bench-fleetspec-"); err != nil {
		return nil, err
	}
	b.specFile = filepath.Join(b.dir, "spec.json")
	js, _ := json.Marshal(b.spec)
	if err := os.WriteFile(b.specFile, js, 0o600); err != nil {
		return nil, err
	}
	pem, err := os.ReadFile(ep.CAFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	b.tlsCfg = &tls.Config{RootCAs: pool, ServerName: ep.HubHostName, MinVersion: tls.VersionTLS12}
	ok = true
	return b, nil
}

// rampTLS is the paho swarm's TLS configuration for one ramp: the fleet's (pkg/fleet), so that
// both sides make the same handshakes: one session cache shared by the swarm (fresh for each
// round, as each round is a fresh process on both sides) and the fleet's key exchanges.
func rampTLS(base *tls.Config) *tls.Config {
	c := base.Clone()
	c.ClientSessionCache = tls.NewLRUClientSessionCache(64)
	c.CurvePreferences = fleet.Curves()
	return c
}

// rampPaho is the child side of the ramp comparison: it says READY once loaded, connects the
// spec's devices as bare paho clients (as holdPaho, 32 dialling at once) when told GO on stdin,
// says HELD with the nanoseconds that took, and disconnects them when stdin closes.
func rampPaho(ctx context.Context, spec fleetSpec, tlsCfg *tls.Config, keys []sas.Key) error {
	fmt.Println("READY")
	in := bufio.NewScanner(os.Stdin)
	if !in.Scan() || in.Text() != "GO" {
		return fmt.Errorf("paho ramp: no GO on stdin")
	}
	// BENCH_CHILD_CPU_PROFILE=path keeps a CPU profile of the ramp (path) and allocation
	// profiles before and after it (path.allocs0, path.allocs1).
	stopProf := func() {}
	if prof := os.Getenv("BENCH_CHILD_CPU_PROFILE"); prof != "" {
		writeAllocs(prof + ".allocs0")
		if f, err := os.Create(prof); err == nil {
			if pprof.StartCPUProfile(f) == nil {
				stopProf = func() { pprof.StopCPUProfile(); f.Close(); writeAllocs(prof + ".allocs1") }
			} else {
				f.Close()
			}
		}
	}
	start := time.Now()
	clients, err := connectBare(ctx, endpoints.Endpoints{MQTTAddress: spec.MQTTAddress, HubHostName: spec.Host}, rampTLS(tlsCfg), keys)
	el := time.Since(start)
	stopProf()
	defer disconnectAll(clients)
	if err != nil {
		return err
	}
	fmt.Printf("HELD %d\n", el.Nanoseconds())
	for in.Scan() {
	}
	return nil
}

// pahoRamp runs one round of the paho swarm in a fresh child process (as the fleet's rounds
// are) and returns its connect time and CPU seconds, and a release that ends the child. With
// prof set it keeps the child's CPU profile of the ramp (BENCH_CPU_PROFILE).
func (b *fleetBench) pahoRamp(ctx context.Context, prof string) (time.Duration, float64, func(), error) {
	self, err := os.Executable()
	if err != nil {
		return 0, 0, nil, err
	}
	cmd := exec.CommandContext(ctx, self, b.specFile)
	cmd.Env = append(os.Environ(), childEnv+"=paho-ramp")
	if prof != "" {
		cmd.Env = append(cmd.Env, "BENCH_CHILD_CPU_PROFILE="+prof)
	}
	c, err := startChild(ctx, cmd)
	if err != nil {
		return 0, 0, nil, err
	}
	fail := func(err error) (time.Duration, float64, func(), error) {
		c.stop()
		return 0, 0, nil, fmt.Errorf("paho swarm: %w", err)
	}
	if _, err := c.expect("BASE", time.Minute); err != nil {
		return fail(err)
	}
	if _, err := c.expect("READY", time.Minute); err != nil {
		return fail(err)
	}
	cpu0, err := procCPU(c.cmd.Process.Pid)
	if err != nil {
		return fail(err)
	}
	if _, err := fmt.Fprintln(c.stdin, "GO"); err != nil {
		return fail(err)
	}
	f, err := c.expect("HELD", 10*time.Minute)
	if err != nil {
		return fail(err)
	}
	cpu1, err := procCPU(c.cmd.Process.Pid)
	if err != nil {
		return fail(err)
	}
	if len(f) != 1 {
		return fail(fmt.Errorf("HELD %q", f))
	}
	ns, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		return fail(err)
	}
	return time.Duration(ns), cpu1 - cpu0, c.stop, nil
}

func (b *fleetBench) close() {
	if b.dir != "" {
		os.RemoveAll(b.dir)
	}
	b.stop()
}

// fleetRound starts `agent fleet` over the bench's devices in a fresh state folder.
func (b *fleetBench) fleetRound(ctx context.Context, binDir string, f fleetFile, env ...string) (*fleetProc, func(), error) {
	dir, err := os.MkdirTemp(b.dir, "round-")
	if err != nil {
		return nil, nil, err
	}
	file, err := writeFleetFile(dir, b.spec, f)
	if err != nil {
		return nil, nil, err
	}
	p, err := startFleet(ctx, binDir, file, env...)
	if err != nil {
		return nil, nil, err
	}
	return p, func() { p.stop(); os.RemoveAll(dir) }, nil
}

// benchFleetRamp compares how fast `agent fleet` connects n devices whose identities are
// already in the registry (connection strings; connectRate far above what is reached) with a
// plain paho swarm (32 dialling at once, each CONNECT + the four device subscriptions) against
// the same hubsim, alternating rounds after one unmeasured warm-up round of the swarm; medians
// of devices per second are compared. Each round of each side is a fresh process: the swarm's
// time runs from its GO (its keys are parsed) to all n subscribed, the fleet's from its "serving
// metrics" line (its devices are created, none started) to all n connected in its metrics.
func benchFleetRamp(ctx context.Context, binDir string, n, rounds int, report func(string, float64, bool, string)) error {
	b, err := newFleetBench(ctx, binDir, n, 0)
	if err != nil {
		return err
	}
	defer b.close()
	// BENCH_CPU_PROFILE=path keeps profiles of the first round and of the DPS round (below).
	prof := os.Getenv("BENCH_CPU_PROFILE")
	var pahoRates, fleetRates []float64
	// Warm-up, not measured: the first connection of each device costs hubsim more (its heap
	// grows, its per-device state is made), and would burden whichever side went first.
	_, _, release, err := b.pahoRamp(ctx, "")
	if err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	release()
	for r := range rounds {
		childProf := ""
		if prof != "" && r == 0 {
			childProf = prof + ".ramp.paho"
		}
		hcpu0, _ := procCPU(b.ep.PID)
		el, pcpu, release, err := b.pahoRamp(ctx, childProf)
		hcpu1, _ := procCPU(b.ep.PID)
		if err != nil {
			return fmt.Errorf("round %d: %w", r, err)
		}
		release()
		pahoRates = append(pahoRates, float64(n)/el.Seconds())
		p, stop, err := b.fleetRound(ctx, binDir, fleetFile{count: n, connectRate: 1e6})
		if err != nil {
			return err
		}
		allocs := func(name string) {
			if prof != "" && r == 0 {
				p.getFile(ctx, "/debug/pprof/allocs", prof+".ramp.fleet."+name)
			}
		}
		allocs("allocs0")
		fcpu0, _ := procCPU(p.pid())
		fhcpu0, _ := procCPU(b.ep.PID)
		start := time.Now()
		profDone := make(chan struct{})
		go func() {
			defer close(profDone)
			// BENCH_CPU_PROFILE=path keeps a CPU profile of the first fleet ramp (n/150 seconds,
			// at least 3: the whole ramp and the twin work after it), its goroutines 1.5 s in
			// (where the devices wait), and its allocations before and after (allocs0, allocs1:
			// go tool pprof -sample_index=alloc_space -base allocs0 allocs1).
			if prof != "" && r == 0 {
				var wg sync.WaitGroup
				wg.Add(1)
				go func() {
					defer wg.Done()
					select {
					case <-ctx.Done():
						return
					case <-time.After(1500 * time.Millisecond):
					}
					p.getFile(ctx, "/debug/pprof/goroutine?debug=1", prof+".ramp.fleet.goroutines")
				}()
				p.getFile(ctx, fmt.Sprintf("/debug/pprof/profile?seconds=%d", max(3, n/150)), prof+".ramp.fleet")
				wg.Wait()
			}
		}()
		err = p.waitConnected(ctx, n, 10*time.Minute)
		fel := time.Since(start)
		fcpu1, _ := procCPU(p.pid())
		fhcpu1, _ := procCPU(b.ep.PID)
		<-profDone
		allocs("allocs1")
		if err == nil {
			fmt.Printf("fleet-ramp: round %d: agent fleet %s\n", r, connectStats(ctx, p))
		}
		stop()
		if err != nil {
			return fmt.Errorf("fleet round %d: %w", r, err)
		}
		fleetRates = append(fleetRates, float64(n)/fel.Seconds())
		ms := func(a, b float64) float64 { return (b - a) * 1000 / float64(n) }
		fmt.Printf("fleet-ramp: round %d: paho swarm %.0f connects/s (ms CPU per connect: %.2f swarm, %.2f hubsim), agent fleet %.0f connects/s (ms CPU per connect: %.2f fleet, %.2f hubsim)\n",
			r, pahoRates[r], ms(0, pcpu), ms(hcpu0, hcpu1), fleetRates[r], ms(fcpu0, fcpu1), ms(fhcpu0, fhcpu1))
	}
	ratio := median(fleetRates) / median(pahoRates)
	report("fleet ramp connects/s / paho", ratio, ratio >= 0.8, ">= 0.8")

	// The same fleet provisioning every device through hubsim's DPS (symmetric-key group over
	// MQTT: two TLS handshakes per device), reported beside the paho median (no target).
	dpsSvc, err := service.New(service.Config{ConnectionString: b.ep.DPSConnectionString, Address: b.ep.HTTPSAddress, CAFile: b.ep.CAFile})
	if err != nil {
		return err
	}
	defer dpsSvc.Close()
	groupKey := make([]byte, 64)
	_, _ = rand.Read(groupKey)
	key := base64.StdEncoding.EncodeToString(groupKey)
	if _, err := dpsSvc.PutEnrollmentGroup(ctx, "bench", map[string]any{"enrollmentGroupId": "bench",
		"attestation": map[string]any{"type": "symmetricKey", "symmetricKey": map[string]any{"primaryKey": key, "secondaryKey": key}}}, ""); err != nil {
		return fmt.Errorf("enrollment group: %w", err)
	}
	dps := fmt.Sprintf("dps:\n  idScope: %s\n  globalEndpoint: %s\n  transport: mqtt\n  hubAddress: %s\n  groupKey: %s\n",
		b.ep.IDScope, b.ep.MQTTAddress, b.ep.MQTTAddress, key)
	p, stop, err := b.fleetRound(ctx, binDir, fleetFile{count: n, connectRate: 1e6, dps: dps})
	if err != nil {
		return err
	}
	cpu0, _ := procCPU(p.pid())
	hcpu0, _ := procCPU(b.ep.PID)
	start := time.Now()
	profDone := make(chan struct{})
	go func() {
		defer close(profDone)
		// BENCH_CPU_PROFILE=path: path.dps.fleet is a CPU profile of this round (n/100 s, at
		// least 3).
		if prof != "" {
			p.getFile(ctx, fmt.Sprintf("/debug/pprof/profile?seconds=%d", max(3, n/100)), prof+".dps.fleet")
		}
	}()
	err = p.waitConnected(ctx, n, 10*time.Minute)
	el := time.Since(start)
	cpu1, _ := procCPU(p.pid())
	hcpu1, _ := procCPU(b.ep.PID)
	if err == nil {
		fmt.Printf("fleet-ramp: DPS round: agent fleet %s\n", connectStats(ctx, p))
	}
	<-profDone
	stop()
	if err != nil {
		return fmt.Errorf("fleet DPS round: %w", err)
	}
	rate := float64(n) / el.Seconds()
	fmt.Printf("fleet-ramp: agent fleet provisioning through DPS then connecting: %.0f devices/s (ms CPU per device: %.2f fleet, %.2f hubsim), %.3f of the paho swarm's plain connects/s (no target)\n",
		rate, (cpu1-cpu0)*1000/float64(n), (hcpu1-hcpu0)*1000/float64(n), rate/median(pahoRates))
	return nil
}

// benchFleetCPU compares CPU seconds per 1,000 acknowledged telemetry messages at steady
// state: `agent fleet` with n devices sending every interval against a plain paho swarm (a
// child process: n clients, each publishing QoS 1 every interval and waiting for the PUBACK)
// against the same hubsim. CPU is utime+stime from /proc/PID/stat over the window after a
// warm-up; messages are the PUBACKs counted in the window (the fleet's
// iothubby_telemetry_acknowledged_total, the child's own count).
func benchFleetCPU(ctx context.Context, binDir string, n int, interval, window time.Duration, report func(string, float64, bool, string)) error {
	b, err := newFleetBench(ctx, binDir, n, interval)
	if err != nil {
		return err
	}
	defer b.close()
	warm := 2*interval + 2*time.Second
	self, err := os.Executable()
	if err != nil {
		return err
	}
	// Paho swarm.
	cmd := exec.CommandContext(ctx, self, b.specFile)
	cmd.Env = append(os.Environ(), childEnv+"=paho-telemetry")
	c, err := startChild(ctx, cmd)
	if err != nil {
		return err
	}
	if _, err := c.expect("BASE", time.Minute); err != nil {
		c.stop()
		return err
	}
	if _, err := c.expect("HELD", 10*time.Minute); err != nil {
		c.stop()
		return err
	}
	acks := func() (float64, error) {
		if _, err := fmt.Fprintln(c.stdin, "?"); err != nil {
			return 0, err
		}
		f, err := c.expect("ACKS", time.Minute)
		if err != nil || len(f) != 1 {
			return 0, fmt.Errorf("paho swarm: ACKS: %v %q", err, f)
		}
		return strconv.ParseFloat(f[0], 64)
	}
	paho, err := cpuWindow(ctx, c.cmd.Process.Pid, acks, warm, window)
	c.stop()
	if err != nil {
		return fmt.Errorf("paho swarm: %w", err)
	}
	// agent fleet.
	p, stop, err := b.fleetRound(ctx, binDir, fleetFile{count: n, connectRate: 1e6, telemetry: interval})
	if err != nil {
		return err
	}
	defer stop()
	if err := p.waitHeld(ctx, n, 10*time.Minute); err != nil {
		return err
	}
	fleet, err := cpuWindow(ctx, p.pid(), func() (float64, error) {
		f, err := p.scrape(ctx)
		return f.Get("iothubby_telemetry_acknowledged_total"), err
	}, warm, window)
	if err != nil {
		return fmt.Errorf("agent fleet: %w", err)
	}
	fmt.Printf("fleet-cpu: %d devices, telemetry every %s, %s window: paho swarm %.3f CPU s per 1,000 messages (%.0f acked), agent fleet %.3f (%.0f acked)\n",
		n, interval, window, paho.perThousand(), paho.msgs, fleet.perThousand(), fleet.msgs)
	ratio := fleet.perThousand() / paho.perThousand()
	report("fleet CPU/1k msgs / paho", ratio, ratio <= 1.3, "<= 1.3")
	return nil
}

type cpuFig struct{ cpu, msgs float64 }

func (c cpuFig) perThousand() float64 { return c.cpu / c.msgs * 1000 }

// cpuWindow waits warm, then measures pid's CPU seconds and the growth of acks() over window.
func cpuWindow(ctx context.Context, pid int, acks func() (float64, error), warm, window time.Duration) (cpuFig, error) {
	wait := func(d time.Duration) error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
			return nil
		}
	}
	if err := wait(warm); err != nil {
		return cpuFig{}, err
	}
	a0, err := acks()
	if err != nil {
		return cpuFig{}, err
	}
	c0, err := procCPU(pid)
	if err != nil {
		return cpuFig{}, err
	}
	if err := wait(window); err != nil {
		return cpuFig{}, err
	}
	c1, err := procCPU(pid)
	if err != nil {
		return cpuFig{}, err
	}
	a1, err := acks()
	if err != nil {
		return cpuFig{}, err
	}
	if a1 <= a0 {
		return cpuFig{}, fmt.Errorf("no telemetry acknowledged in the window")
	}
	return cpuFig{cpu: c1 - c0, msgs: a1 - a0}, nil
}

// holdPahoTelemetry is the child side of the CPU comparison: the spec's devices as bare paho
// clients (as holdPaho), each publishing a telemetry message QoS 1 every TelemetryMs (starts
// spread over the first period) and waiting for its PUBACK. Each line on stdin is answered
// with "ACKS <PUBACKs so far>"; end of stdin stops it.
func holdPahoTelemetry(ctx context.Context, spec fleetSpec, tlsCfg *tls.Config, keys []sas.Key) error {
	ep := endpoints.Endpoints{MQTTAddress: spec.MQTTAddress, HubHostName: spec.Host}
	clients, err := connectBare(ctx, ep, tlsCfg, keys)
	defer disconnectAll(clients)
	if err != nil {
		return err
	}
	fmt.Printf("HELD %d\n", len(keys))
	ctx, cancel := context.WithCancel(ctx)
	var acked atomic.Int64
	var wg sync.WaitGroup
	interval := time.Duration(spec.TelemetryMs) * time.Millisecond
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := devID(i)
			topic := "devices/" + id + "/messages/events/"
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Duration(i) * interval / time.Duration(len(clients))):
			}
			t := time.NewTicker(interval)
			defer t.Stop()
			for seq := 1; ; seq++ {
				body := fmt.Sprintf(`{"deviceId":%q,"seq":%d,"time":%q,"temperature":%.2f}`, id, seq,
					time.Now().UTC().Format("2006-01-02T15:04:05.000Z07:00"), 20+float64(seq%1000)/100)
				tok := c.Publish(topic, 1, false, body)
				if tok.WaitTimeout(30*time.Second) && tok.Error() == nil {
					acked.Add(1)
				}
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
		}()
	}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		fmt.Printf("ACKS %d\n", acked.Load())
	}
	cancel()
	wg.Wait()
	return nil
}

// connectStats summarises the fleet's connection attempts from its metrics: connects, failed
// attempts by reason, and the mean time from an attempt's start to connected.
func connectStats(ctx context.Context, p *fleetProc) string {
	f, err := p.scrape(ctx)
	if err != nil {
		return "metrics: " + err.Error()
	}
	var failed []string
	for _, r := range f.LabelValues("iothubby_disconnects_total", "reason") {
		failed = append(failed, fmt.Sprintf("%s %.0f", r, f.Get("iothubby_disconnects_total", "reason", r)))
	}
	mean := 0.0
	if mf := f["iothubby_connect_seconds"]; mf != nil && len(mf.GetMetric()) == 1 {
		if h := mf.GetMetric()[0].GetHistogram(); h.GetSampleCount() > 0 {
			mean = h.GetSampleSum() / float64(h.GetSampleCount())
		}
	}
	return fmt.Sprintf("%.0f connects, failed attempts %v, mean attempt-to-connected %.0f ms",
		f.Get("iothubby_connects_total"), failed, mean*1000)
}

// writeAllocs writes this process's allocation profile to path (BENCH_CPU_PROFILE).
func writeAllocs(path string) {
	if f, err := os.Create(path); err == nil {
		_ = pprof.Lookup("allocs").WriteTo(f, 0)
		f.Close()
	}
}
