package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/iothubby/iothubby/pkg/metrics/metricstest"
)

// fleetFile is what the bench puts in an `agent fleet` file: the spec's first count devices as
// a connection-strings file (identities already in hubsim's registry, so the fleet only
// connects), one profile with the spec's telemetry period.
type fleetFile struct {
	count       int
	connectRate float64
	telemetry   time.Duration
	// dps, when set, replaces the connection strings with this identity section (a DPS group);
	// device IDs then come from idPattern dps-NNNNN.
	dps string
}

// writeFleetFile writes dir/devices.cs and dir/fleet.yaml and returns the latter's path.
func writeFleetFile(dir string, spec fleetSpec, f fleetFile) (string, error) {
	var cs strings.Builder
	for _, d := range spec.Devices[:f.count] {
		fmt.Fprintf(&cs, "HostName=%s;DeviceId=%s;SharedAccessKey=%s;GatewayHostName=%s\n", spec.Host, d.ID, d.Key, spec.MQTTAddress)
	}
	csFile := filepath.Join(dir, "devices.cs")
	if err := os.WriteFile(csFile, []byte(cs.String()), 0o600); err != nil {
		return "", err
	}
	identity := "connectionStringsFile: " + csFile
	if f.dps != "" {
		identity = "idPattern: 'dps-{{printf \"%05d\" .Index}}'\n" + f.dps
	}
	interval := "0s"
	if f.telemetry > 0 {
		interval = f.telemetry.String()
	}
	y := fmt.Sprintf(`count: %d
connectRate: %g
connectBurst: %d
stateDir: %s
shutdownTimeout: 20s
tls: {caFile: %q}
%s
profiles:
  - name: bench
    weight: 1
    telemetry: {interval: %s}
log: {level: info, format: json}
`, f.count, f.connectRate, max(int(f.connectRate), 1), filepath.Join(dir, "state"), spec.CAFile, identity, interval)
	file := filepath.Join(dir, "fleet.yaml")
	return file, os.WriteFile(file, []byte(y), 0o600)
}

// fleetProc is one `agent fleet` process: its metrics (and pprof) at url.
type fleetProc struct {
	cmd  *exec.Cmd
	url  string
	done chan struct{} // closed when stderr is drained
}

// startFleet runs `agent fleet --config file --metrics-addr 127.0.0.1:0 --pprof` with extra
// environment and waits (up to a minute) for its "serving metrics" log line.
func startFleet(ctx context.Context, binDir, file string, env ...string) (*fleetProc, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "agent"), "fleet", "--config", file,
		"--metrics-addr", "127.0.0.1:0", "--pprof")
	cmd.Env = append(os.Environ(), env...)
	errOut, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &fleetProc{cmd: cmd, done: make(chan struct{})}
	addr := make(chan string, 1)
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(errOut)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var line struct {
				Level   string `json:"level"`
				Msg     string `json:"msg"`
				Address string `json:"address"`
			}
			if json.Unmarshal(sc.Bytes(), &line) != nil {
				continue // the fleet's plain status lines
			}
			switch {
			case line.Msg == "serving metrics":
				addr <- line.Address
			case line.Level != "info" && line.Level != "debug" && line.Level != "warn":
				fmt.Fprintln(os.Stderr, "agent fleet:", sc.Text())
			}
		}
		_, _ = io.Copy(io.Discard, errOut)
	}()
	select {
	case a := <-addr:
		p.url = "http://" + a
		return p, nil
	case <-p.done:
		_ = cmd.Wait()
		return nil, fmt.Errorf("agent fleet ended before serving metrics: %v", cmd.ProcessState)
	case <-time.After(time.Minute):
		p.stop()
		return nil, errors.New("agent fleet: no metrics address within a minute")
	}
}

func (p *fleetProc) pid() int { return p.cmd.Process.Pid }

// stop interrupts the fleet (it drains and exits 0) and kills it after 60 s.
func (p *fleetProc) stop() {
	_ = p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	_ = p.cmd.Wait()
}

// scrape reads the fleet's /metrics.
func (p *fleetProc) scrape(ctx context.Context) (metricstest.Families, error) {
	return metricstest.Scrape(ctx, p.url+"/metrics")
}

// waitHeld polls the fleet's metrics until n devices are connected and have fetched their
// twin (the full GET each device does after connecting), or timeout passes.
func (p *fleetProc) waitHeld(ctx context.Context, n int, timeout time.Duration) error {
	return p.waitMetrics(ctx, 250*time.Millisecond, timeout, func(f metricstest.Families) (bool, string) {
		conn := f.Get("iothubby_devices", "status", "Connected")
		twin := f.Get("iothubby_twin_roundtrip_seconds", "op", "get")
		return conn >= float64(n) && twin >= float64(n), fmt.Sprintf("%v of %d connected and %v twins fetched", conn, n, twin)
	})
}

// waitConnected polls the fleet's metrics every 20 ms (the ramp's clock) until n devices are
// connected, or timeout passes.
func (p *fleetProc) waitConnected(ctx context.Context, n int, timeout time.Duration) error {
	return p.waitMetrics(ctx, 20*time.Millisecond, timeout, func(f metricstest.Families) (bool, string) {
		conn := f.Get("iothubby_devices", "status", "Connected")
		return conn >= float64(n), fmt.Sprintf("%v of %d connected", conn, n)
	})
}

// waitMetrics scrapes the fleet's metrics every interval until done says so, failing with done's
// description (or the last scrape error) once timeout passes, or when ctx or the fleet ends.
func (p *fleetProc) waitMetrics(ctx context.Context, every, timeout time.Duration, done func(metricstest.Families) (bool, string)) error {
	deadline := time.Now().Add(timeout)
	for {
		f, err := p.scrape(ctx)
		var state string
		if err == nil {
			var ok bool
			if ok, state = done(f); ok {
				return nil
			}
		}
		if time.Now().After(deadline) {
			if err != nil {
				return fmt.Errorf("agent fleet: metrics after %s: %w", timeout, err)
			}
			return fmt.Errorf("agent fleet: %s after %s", state, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.done:
			return errors.New("agent fleet ended")
		case <-time.After(every):
		}
	}
}

// get GETs a path of the fleet's metrics server into w.
func (p *fleetProc) get(ctx context.Context, path string, w io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.url+path, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	_, err = io.Copy(w, resp.Body)
	return err
}

// getFile GETs a path of the fleet's metrics server into a new file (the profiles kept for
// BENCH_CPU_PROFILE and BENCH_HEAP_PROFILE); a profile that cannot be kept changes no figure, so
// errors are ignored.
func (p *fleetProc) getFile(ctx context.Context, path, file string) {
	if f, err := os.Create(file); err == nil {
		_ = p.get(ctx, path, f)
		f.Close()
	}
}

// goMem makes the fleet collect garbage four times (/debug/pprof/heap?gc=1, as the Go children
// do with runtime.GC) and reads heap objects (heap_alloc), the rest of heap_inuse, stack_inuse
// and goroutines from its Go metrics. With BENCH_HEAP_PROFILE set it keeps the heap and goroutine profiles as
// <path>.heap.fleet and <path>.goroutine.fleet.
func (p *fleetProc) goMem(ctx context.Context) (goMemFig, error) {
	for range 4 {
		if err := p.get(ctx, "/debug/pprof/heap?gc=1", io.Discard); err != nil {
			return goMemFig{}, err
		}
	}
	if prof := os.Getenv("BENCH_HEAP_PROFILE"); prof != "" {
		for _, kind := range []string{"heap", "goroutine"} {
			p.getFile(ctx, "/debug/pprof/"+kind, prof+"."+kind+".fleet")
		}
	}
	f, err := p.scrape(ctx)
	if err != nil {
		return goMemFig{}, err
	}
	objects := f.Get("go_memstats_heap_alloc_bytes")
	return goMemFig{objects: objects, unused: f.Get("go_memstats_heap_inuse_bytes") - objects,
		stacks: f.Get("go_memstats_stack_inuse_bytes"), goroutines: f.Get("go_goroutines")}, nil
}
