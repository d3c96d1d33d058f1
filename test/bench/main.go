// Command bench runs iothubby's comparative benchmarks and prints each result as a ratio
// against a baseline measured in the same run (absolute figures vary from machine to machine;
// ratios travel). `make bench` runs it after the go test benchmarks.
//
//	connect: N devices connect with SAS over TLS (paho.mqtt.golang, 32 in parallel) to hubsim,
//	         and to a plain mochi broker with no IoT Hub logic; runs alternate A/B/A/B and the
//	         medians are compared. Target: hubsim/plain >= 0.7.
//	memory:  N devices held connected to a hubsim process, once as iothubby hub.Sessions and once
//	         as bare paho clients; goroutines and heap+stack per device are compared.
//	         Target: ours/paho <= 1.2.
//	twin:    reported PATCH round trip (publish to the 204) with N devices connected, against a
//	         QoS 1 telemetry publish to its PUBACK on the same hubsim in the same run; p50 and
//	         p99 compared. Target: p99 ratio <= 2 (the figure is at 1,000 devices:
//	         -twin-n 1000).
//	methods: direct-method round trip through hubsim's REST API (POST /twins/{id}/methods, the
//	         device answering over MQTT) with N devices connected, against a QoS 1 publish to its
//	         PUBACK on the same hubsim in the same run; p50 and p99 compared. Target: p99 ratio
//	         <= 3 (the figure is at 1,000 devices: -methods-n 1000).
//	c2d:     cloud-to-device round trip (service send to the device's MQTT delivery) over hubsim's
//	         AMQP endpoint against the /hubsim/ REST send in the same run; p99 compared.
//	         Target: AMQP/REST p99 <= 2.
//	jobs:    a twin-update job (jobs v2) over N devices against the same update sent to each
//	         device one by one through the REST API, devices per second, alternating rounds;
//	         medians compared. Target: job/REST >= 1.
//	eventhubs: N devices publish telemetry (MQTT QoS 1) into hubsim; a go-amqp reader then reads
//	         every event back through the Event Hubs-compatible endpoint (one receiver per
//	         partition); the read rate is compared with the publish rate of the same run.
//	         Target: read/publish >= 1.
//	fleet-memory: -fleet-n devices (default 2,000; the figure is 10,000) held against one
//	         hubsim process, each side in its own process: bare paho clients, the real
//	         `agent fleet` (bin/agent; devices from hubsim's registry as a connection-strings
//	         file, telemetry every 60 s; its Go metrics from --metrics-addr after GCs forced
//	         through --pprof; run once with 1 device for the footprint, once with N) and
//	         Microsoft's Node device SDK (test/bench/node/fleet.js). Heap+stack per device,
//	         fleet/paho <= 1.3; RSS per device above the footprint, fleet/Node <= 0.6. Needs
//	         test/conformance/node_modules (npm ci --ignore-scripts).
//	fleet-ramp: connects per second of `agent fleet` over -fleet-n registry devices (connection
//	         strings, connectRate far above what is reached; from its start to all connected in
//	         its metrics) against a plain paho swarm (32 dialling at once, CONNECT + the four
//	         subscriptions; the fleet's TLS settings: one shared session cache, X25519) on the
//	         same hubsim, alternating rounds, medians; CPU per connect of each side and of
//	         hubsim meanwhile. Target: >= 0.8.
//	         Then one round of the fleet provisioning through hubsim's DPS (symmetric-key group
//	         over MQTT) before connecting, printed beside the paho rate (no target).
//	fleet-cpu: CPU seconds (utime+stime from /proc/PID/stat over -fleet-cpu-window after a
//	         warm-up) per 1,000 PUBACKed telemetry messages, -fleet-cpu-n devices each sending
//	         every -fleet-cpu-interval: `agent fleet` against a plain paho swarm in a child
//	         process publishing QoS 1 at the same rate, same hubsim. Target: <= 1.3.
//	sas:     device SAS token build and parse+verify against the bare HMAC-SHA256 they wrap.
//	durable: one pkg/agent device in this process sends -durable-n telemetry messages as fast as
//	         its loop goes to an in-process hubsim, with the in-memory queue and with
//	         queue.persist (default fsync policy), alternating; the median rates (first queued
//	         to last PUBACK) are compared, and the spool's fsyncs per message printed.
//	         Target: persisted/in-memory >= 0.5.
//	recovery: the real agent against a real hubsim that is SIGKILLed and restarted -recovery-n
//	         times on the same state and ports (each once the connection is stable); hubsim ready to the agent's next twin sync, as a
//	         ratio to the agent's backoff floor (1 s), p50 and p99. Targets: p50 <= 1.5, p99 <= 3.
//	dps:     N devices provision through hubsim's DPS over MQTT and then connect to the hub,
//	         against the same N devices only connecting (plain TLS connects), alternating; the
//	         median rates are compared. Target: dps/plain >= 0.4.
//
// Run it with GODEBUG=adaptivestackstart=0 (the Makefile does) so goroutine stacks start at the
// same size in every round. BENCH_HEAP_PROFILE=path writes heap and goroutine profiles of the
// first memory round (path.paho, path.iothubby, ...) for finding where bytes go.
//
// Every loop is bounded in count and time, and all traffic stays on 127.0.0.1.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

func main() {
	if kind := os.Getenv(childEnv); kind != "" {
		if len(os.Args) != 2 {
			fmt.Fprintln(os.Stderr, "bench child: want one argument, the spec file")
			os.Exit(2)
		}
		if err := runFleetChild(kind, os.Args[1]); err != nil {
			fmt.Fprintln(os.Stderr, "bench child:", err)
			os.Exit(1)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	only := fs.String("only", "sas,connect,memory,fleet-memory,twin,dps,methods,tpm,c2d,jobs,eventhubs,durable,recovery", "comma-separated benchmarks to run (sas, connect, memory, fleet-memory, fleet-ramp, fleet-cpu, twin, dps, methods, tpm, c2d, jobs, eventhubs, durable, recovery; fleet-ramp and fleet-cpu only when named)")
	recoveryB2B := fs.Bool("recovery-back-to-back", false, "recovery: kill hubsim as soon as the agent has synced, not once its connection is stable (shows the backoff growing across short-lived connections)")
	recoveryN := fs.Int("recovery-n", 5, "hubsim SIGKILL+restarts in the recovery benchmark (about 35 s each)")
	durableN := fs.Int("durable-n", 20000, "telemetry messages per round in the durable queue comparison")
	jobsN := fs.Int("jobs-n", 1000, "devices a twin-update job covers in the jobs comparison")
	jobsParallelism := fs.Int("jobs-parallelism", 16, "hubsim's --job-parallelism in the jobs comparison")
	ehN := fs.Int("eventhubs-n", 16, "devices publishing in the Event Hubs comparison")
	ehEvents := fs.Int("eventhubs-events", 20000, "events published and read in the Event Hubs comparison")
	c2dN := fs.Int("c2d-n", 16, "devices (one worker each) in the C2D round-trip comparison")
	c2dSamples := fs.Int("c2d-samples", 2000, "round trips in all in the C2D comparison")
	tpmN := fs.Int("tpm-n", 20, "registrations of each kind in the TPM comparison")
	dpsN := fs.Int("dps-n", 200, "devices per DPS round")
	connectN := fs.Int("connect-n", 1000, "devices per connect round")
	rounds := fs.Int("rounds", 2, "A/B pairs per comparison (the median is reported)")
	memN := fs.Int("memory-n", 500, "devices held connected in the memory comparison")
	twinN := fs.Int("twin-n", 200, "devices connected in the twin round-trip comparison")
	twinSamples := fs.Int("twin-samples", 4000, "round trips of each kind in the twin comparison")
	methodsN := fs.Int("methods-n", 200, "devices connected in the method round-trip comparison")
	methodsSamples := fs.Int("methods-samples", 2000, "round trips of each kind in the method comparison")
	fleetN := fs.Int("fleet-n", 2000, "devices in the fleet comparisons (the issue's figure is 10,000: -fleet-n 10000)")
	fleetNode := fs.Bool("fleet-node", true, "fleet-memory: also hold the devices with the Node SDK (the RSS baseline)")
	fleetCPUN := fs.Int("fleet-cpu-n", 1000, "devices sending telemetry in the fleet CPU comparison")
	fleetCPUInterval := fs.Duration("fleet-cpu-interval", 2*time.Second, "telemetry period of each device in the fleet CPU comparison")
	fleetCPUWindow := fs.Duration("fleet-cpu-window", 30*time.Second, "measuring window of the fleet CPU comparison")
	binDir := fs.String("bin", os.Getenv("IOTHUBBY_BIN"), "folder with the hubsim and agent binaries (memory and fleet benchmarks)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	want := map[string]bool{}
	for _, s := range strings.Split(*only, ",") {
		want[strings.TrimSpace(s)] = true
	}
	var failed []string
	report := func(name string, ratio float64, ok bool, target string) {
		verdict := "meets"
		if !ok {
			verdict = "MISSES"
			failed = append(failed, name)
		}
		fmt.Printf("RESULT %-28s ratio %.3f  (%s target %s)\n", name, ratio, verdict, target)
	}
	if want["sas"] {
		if err := benchSAS(report); err != nil {
			return err
		}
	}
	if want["connect"] {
		if err := benchConnect(ctx, *connectN, *rounds, report); err != nil {
			return fmt.Errorf("connect: %w", err)
		}
	}
	if want["dps"] {
		if err := benchDPS(ctx, *dpsN, *rounds, report); err != nil {
			return fmt.Errorf("dps: %w", err)
		}
	}
	if want["memory"] {
		if *binDir == "" {
			return errors.New("memory: set -bin or IOTHUBBY_BIN to the folder with the hubsim binary")
		}
		if err := benchMemory(ctx, *binDir, *memN, report); err != nil {
			return fmt.Errorf("memory: %w", err)
		}
	}
	if want["fleet-memory"] {
		if *binDir == "" {
			return errors.New("fleet-memory: set -bin or IOTHUBBY_BIN to the folder with the hubsim binary")
		}
		if err := benchFleetMemory(ctx, *binDir, repoRoot(), *fleetN, *fleetNode, report); err != nil {
			return fmt.Errorf("fleet-memory: %w", err)
		}
	}
	for _, mode := range []string{"fleet-ramp", "fleet-cpu"} {
		if !want[mode] {
			continue
		}
		if *binDir == "" {
			return fmt.Errorf("%s: set -bin or IOTHUBBY_BIN to the folder with the hubsim and agent binaries", mode)
		}
		var err error
		if mode == "fleet-ramp" {
			err = benchFleetRamp(ctx, *binDir, *fleetN, max(*rounds, 1), report)
		} else {
			err = benchFleetCPU(ctx, *binDir, *fleetCPUN, *fleetCPUInterval, *fleetCPUWindow, report)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", mode, err)
		}
	}
	if want["twin"] {
		if err := benchTwin(ctx, *twinN, *twinSamples, report); err != nil {
			return fmt.Errorf("twin: %w", err)
		}
	}
	if want["methods"] {
		if err := benchMethods(ctx, *methodsN, *methodsSamples, report); err != nil {
			return fmt.Errorf("methods: %w", err)
		}
	}
	if want["c2d"] {
		if err := benchC2D(ctx, *c2dN, *c2dSamples/2, report); err != nil {
			return fmt.Errorf("c2d: %w", err)
		}
	}
	if want["jobs"] {
		if err := benchJobs(ctx, *jobsN, max(*rounds, 1)+1, *jobsParallelism, report); err != nil {
			return fmt.Errorf("jobs: %w", err)
		}
	}
	if want["eventhubs"] {
		if err := benchEventHubs(ctx, *ehN, *ehEvents, report); err != nil {
			return fmt.Errorf("eventhubs: %w", err)
		}
	}
	if want["durable"] {
		if err := benchDurable(ctx, *durableN, max(*rounds, 1), report); err != nil {
			return fmt.Errorf("durable: %w", err)
		}
	}
	if want["recovery"] {
		if *binDir == "" {
			return errors.New("recovery: set -bin or IOTHUBBY_BIN to the folder with the hubsim and agent binaries")
		}
		if err := benchRecovery(ctx, *binDir, *recoveryN, *recoveryB2B, report); err != nil {
			return fmt.Errorf("recovery: %w", err)
		}
	}
	if want["tpm"] {
		if err := benchTPM(ctx, *tpmN, report); err != nil {
			return fmt.Errorf("tpm: %w", err)
		}
	}
	if len(failed) > 0 {
		fmt.Printf("targets missed: %s\n", strings.Join(failed, ", "))
	}
	return nil
}

// repoRoot is the repository's top folder (make bench runs from it; go run ./test/bench too).
func repoRoot() string {
	dir, _ := os.Getwd()
	for d := dir; d != filepath.Dir(d); d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
	}
	return dir
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	n := len(s)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}
