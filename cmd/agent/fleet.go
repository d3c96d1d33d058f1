package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/pprof"
	"os"
	"runtime/debug"
	"strconv"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/term"

	"github.com/iothubby/iothubby/internal/atomicfile"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/fleet"
	"github.com/iothubby/iothubby/pkg/metrics"
)

// Environment variables of the fleet command: a Kubernetes Indexed Job sets
// JOB_COMPLETION_INDEX in each pod; the shard count comes from IOTHUBBY_SHARD_COUNT.
const (
	EnvShardIndex = "JOB_COMPLETION_INDEX"
	EnvShardCount = "IOTHUBBY_SHARD_COUNT"
)

// FleetGOGC is the garbage collector's target percentage `agent fleet` sets unless $GOGC is
// given: 50 instead of Go's 100 lowers the heap a fleet may grow to between collections by a
// third, for a little more GC CPU (measured: 6% less RSS per device at 400 devices). The Go
// runtime reads $GOMEMLIMIT itself; set it (e.g. to a pod's memory limit minus 10%) so the
// collector works harder before the limit rather than the process being killed.
const FleetGOGC = 50

// setFleetGC applies FleetGOGC unless the environment (lookup) sets GOGC; it returns the
// percentage now in force, or -1 when GOGC came from the environment.
func setFleetGC(lookup func(string) (string, bool), setGCPercent func(int) int) int {
	if _, ok := lookup("GOGC"); ok {
		return -1
	}
	setGCPercent(FleetGOGC)
	return FleetGOGC
}

// statusEvery is how often a status line is printed once the fleet is up.
const statusEvery = 10 * time.Second

type fleetFlags struct {
	config                 string
	summary                string
	metricsAddr            string
	pprof                  bool
	shardIndex, shardCount int
	logLevel, logFormat    string
}

func newFleetCmd(stderr io.Writer) *cobra.Command {
	var f fleetFlags
	cmd := &cobra.Command{
		Use:   "fleet --config FILE",
		Short: "Run many simulated devices in one process (configs/fleet.yaml)",
		Long: `Run many simulated devices in one process, each a full agent device, from a fleet file
(configs/fleet.yaml documents every field). SIGINT/SIGTERM (or the file's duration) drain every
device within shutdownTimeout and exit 0.

--shard-index/--shard-count run one contiguous part of the index range; they default to
$` + EnvShardIndex + ` (a Kubernetes Indexed Job) and $` + EnvShardCount + `.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runFleet(cmd, &f, stderr)
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&f.config, "config", "c", "", "fleet file (see configs/fleet.yaml); required")
	fl.StringVar(&f.summary, "summary", "", "write a JSON summary to this file at exit")
	fl.StringVar(&f.metricsAddr, "metrics-addr", "", "serve Prometheus /metrics on this address, e.g. :9090")
	fl.BoolVar(&f.pprof, "pprof", false, "also serve Go's /debug/pprof/ (heap, goroutine, CPU profiles) on --metrics-addr")
	fl.IntVar(&f.shardIndex, "shard-index", 0, "this process's shard, 0-based [$"+EnvShardIndex+"]")
	fl.IntVar(&f.shardCount, "shard-count", 1, "number of shards the fleet is split into [$"+EnvShardCount+"]")
	fl.StringVar(&f.logLevel, "log-level", "", "log level: debug, info, warn, error (default: the file's, info)")
	fl.StringVar(&f.logFormat, "log-format", "", "log format: console or json (default: the file's, console)")
	return cmd
}

// shardFromEnv fills the shard flags from the environment unless given on the command line.
func shardFromEnv(cmd *cobra.Command, f *fleetFlags) error {
	for _, e := range []struct {
		flag, env string
		dst       *int
	}{{"shard-index", EnvShardIndex, &f.shardIndex}, {"shard-count", EnvShardCount, &f.shardCount}} {
		if cmd.Flags().Changed(e.flag) {
			continue
		}
		if v, ok := os.LookupEnv(e.env); ok && v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				return usageError{fmt.Errorf("$%s=%q is not a number", e.env, v)}
			}
			*e.dst = n
		}
	}
	if f.shardCount < 1 || f.shardIndex < 0 || f.shardIndex >= f.shardCount {
		return usageError{fmt.Errorf("--shard-index %d must be in [0, --shard-count %d)", f.shardIndex, f.shardCount)}
	}
	return nil
}

func runFleet(cmd *cobra.Command, f *fleetFlags, stderr io.Writer) error {
	if f.config == "" {
		return usageError{fmt.Errorf("--config is required")}
	}
	if err := shardFromEnv(cmd, f); err != nil {
		return err
	}
	if f.pprof && f.metricsAddr == "" {
		return usageError{fmt.Errorf("--pprof needs --metrics-addr")}
	}
	cfg, err := fleet.Load(f.config)
	if err != nil {
		return err
	}
	if f.logLevel != "" {
		cfg.Log.Level = f.logLevel
	}
	if f.logFormat != "" {
		cfg.Log.Format = f.logFormat
	}
	log, err := newLogger(cfg.Log, stderr)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	if gc := setFleetGC(os.LookupEnv, debug.SetGCPercent); gc > 0 {
		log.Debug("garbage collection target set ($GOGC overrides)", zap.Int("gogc", gc))
	}
	opts := fleet.Options{ShardIndex: f.shardIndex, ShardCount: f.shardCount, Logger: log}
	var m *metrics.Metrics
	if f.metricsAddr != "" {
		var names []string
		for _, p := range cfg.Profiles {
			for n := range p.Methods {
				names = append(names, n)
			}
		}
		m = metrics.New(metrics.Config{Methods: names, ProcessCollectors: true})
		opts.Observer = m
	}
	fl, err := fleet.Prepare(cmd.Context(), cfg, opts)
	if err != nil {
		return err
	}
	defer fl.Close()
	if m != nil {
		var h http.Handler = metrics.Handler(m, nil)
		if f.pprof {
			h = withPprof(h)
		}
		srv, err := metrics.Listen(f.metricsAddr, h)
		if err != nil {
			return fmt.Errorf("%w: --metrics-addr: %w", agent.ErrConfig, err)
		}
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Close(ctx)
		}()
		log.Info("serving metrics", zap.String("address", srv.Addr()))
	}
	ctx, cancel := context.WithCancel(cmd.Context())
	defer cancel()
	statusDone := make(chan struct{})
	go func() {
		defer close(statusDone)
		showProgress(ctx, fl, stderr)
	}()
	runErr := fl.Run(ctx)
	cancel()
	<-statusDone
	if f.summary != "" {
		b, err := json.MarshalIndent(fl.Summary(), "", "  ")
		if err == nil {
			err = atomicfile.WriteFile(f.summary, append(b, '\n'), 0o644)
		}
		if err != nil && runErr == nil {
			runErr = fmt.Errorf("--summary: %w", err)
		}
	}
	return runErr
}

// withPprof serves Go's profiles under /debug/pprof/ beside h (e.g. /debug/pprof/heap?gc=1
// runs a garbage collection and returns a heap profile: where a fleet's bytes go).
func withPprof(h http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", h)
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// showProgress shows the ramp on a terminal as a live progress line (connected / target,
// connects per second, failures), then a status line every 10 s; without a terminal it prints
// only the plain status lines.
func showProgress(ctx context.Context, fl *fleet.Fleet, w io.Writer) {
	line := func(p fleet.Progress) string {
		return fmt.Sprintf("fleet: %d/%d connected, %d connects, %d connect failures", p.Connected, p.Target, p.Connects, p.ConnectFailures)
	}
	tty := false
	if f, ok := w.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	if tty {
		target := fl.Progress().Target
		bar := progressbar.NewOptions(target, progressbar.OptionSetWriter(w),
			progressbar.OptionSetDescription("connecting"), progressbar.OptionShowCount(),
			progressbar.OptionShowIts(), progressbar.OptionSetItsString("conn"),
			progressbar.OptionThrottle(200*time.Millisecond), progressbar.OptionClearOnFinish())
		tick := time.NewTicker(250 * time.Millisecond)
		for ramping := true; ramping; {
			select {
			case <-ctx.Done():
				tick.Stop()
				_ = bar.Exit()
				return
			case <-tick.C:
				p := fl.Progress()
				bar.Describe(fmt.Sprintf("connecting (%d failures)", p.ConnectFailures))
				_ = bar.Set(p.EverConnected)
				if p.EverConnected >= p.Target {
					ramping = false
				}
			}
		}
		tick.Stop()
		_ = bar.Finish()
		fmt.Fprintln(w, line(fl.Progress()))
	}
	t := time.NewTicker(statusEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fmt.Fprintln(w, line(fl.Progress()))
		}
	}
}
