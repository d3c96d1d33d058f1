package main

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/metrics"
)

// obsFlags are agent run's observability flags.
type obsFlags struct {
	metricsAddr string
	healthAddr  string
	wedgeAfter  time.Duration
}

// DefaultWedgeAfter is how long one piece of a loop's work may take before /healthz fails; it
// exceeds the default operation (30 s) and command (30 s) timeouts.
const DefaultWedgeAfter = 2 * time.Minute

func bindObsFlags(cmd *cobra.Command, f *obsFlags) {
	fl := cmd.Flags()
	fl.StringVar(&f.metricsAddr, "metrics-addr", "", "serve Prometheus metrics on host:port at /metrics (e.g. 127.0.0.1:9400)")
	fl.StringVar(&f.healthAddr, "health-addr", "", "serve /healthz, /readyz and /metrics on host:port (may equal --metrics-addr: one server)")
	fl.DurationVar(&f.wedgeAfter, "health-wedge-after", DefaultWedgeAfter, "/healthz fails when a loop has been busy with one piece of work for longer")
}

// methodNames are the direct-method names counted under their own name in the metrics: the
// configured ones and the built-ins.
func methodNames(cfg agent.Config) []string {
	names := []string{"reboot", "firmwareUpdate", "reprovision"}
	for n := range cfg.Methods {
		names = append(names, n)
	}
	return names
}

// observability holds agent run's metric set, its liveness and readiness, and the HTTP
// servers. It lives as long as the process: a reload that replaces the device keeps it.
type observability struct {
	m       *metrics.Metrics
	live    *agent.Liveness
	wedge   time.Duration
	servers []*metrics.Server

	// What /readyz needs, from the device's events (the device may be replaced on reload).
	connected, synced atomic.Bool
}

// newObservability makes the metric set when a flag asks for metrics or health, and attaches
// it to cfg; nil otherwise.
func newObservability(f *obsFlags, cfg *agent.Config) *observability {
	if f.metricsAddr == "" && f.healthAddr == "" {
		return nil
	}
	o := &observability{
		m:     metrics.New(metrics.Config{Methods: methodNames(*cfg), ProcessCollectors: true}),
		live:  agent.NewLiveness(nil),
		wedge: f.wedgeAfter,
	}
	o.attach(cfg)
	return o
}

// attach makes cfg's device report to o (also a configuration read again on reload).
func (o *observability) attach(cfg *agent.Config) {
	if o == nil {
		return
	}
	cfg.Shared.Observer = (*observed)(o)
	cfg.Shared.Liveness = o.live
}

// observed is the device's Observer: the metrics, plus what /readyz needs.
type observed observability

var (
	_ agent.Observer        = (*observed)(nil)
	_ agent.TwinObserver    = (*observed)(nil)
	_ agent.ConnectObserver = (*observed)(nil)
)

func (o *observed) Provisioned(d, outcome string, err error) { o.m.Provisioned(d, outcome, err) }
func (o *observed) ConnectionStatus(d string, st hub.Status) {
	o.connected.Store(st.State == hub.Connected)
	if st.State != hub.Connected {
		o.synced.Store(false)
	}
	o.m.ConnectionStatus(d, st)
}
func (o *observed) TelemetrySent(d string) { o.m.TelemetrySent(d) }
func (o *observed) TelemetryDone(d string, latency time.Duration, err error) {
	o.m.TelemetryDone(d, latency, err)
}
func (o *observed) C2DReceived(d string)                 { o.m.C2DReceived(d) }
func (o *observed) DesiredReceived(d string, v int64)    { o.m.DesiredReceived(d, v) }
func (o *observed) ConnectAttempt(d string, t time.Time) { o.m.ConnectAttempt(d, t) }
func (o *observed) MethodAnswered(d, name string, status int, dur time.Duration) {
	o.m.MethodAnswered(d, name, status, dur)
}
func (o *observed) TwinRequest(d, op string, dur time.Duration, err error) {
	if op == "get" && err == nil && o.connected.Load() {
		o.synced.Store(true)
	}
	o.m.TwinRequest(d, op, dur, err)
}

// ready backs /readyz.
func (o *observability) ready() error {
	switch {
	case !o.connected.Load():
		return fmt.Errorf("%w: not connected to the hub", agent.ErrNotReady)
	case !o.synced.Load():
		return fmt.Errorf("%w: connected, twin not synced yet", agent.ErrNotReady)
	}
	return nil
}

// serve starts the servers: one when both flags name the same address.
func (o *observability) serve(f *obsFlags, log *zap.Logger) error {
	if o == nil {
		return nil
	}
	probes := &metrics.Probes{
		Live:  func() error { return o.live.Check(o.wedge) },
		Ready: o.ready,
	}
	start := func(addr string, p *metrics.Probes) error {
		s, err := metrics.Listen(addr, metrics.Handler(o.m, p))
		if err != nil {
			return usageError{fmt.Errorf("listen on %s: %w", addr, err)}
		}
		o.servers = append(o.servers, s)
		log.Info("serving observability endpoints", zap.String("address", s.Addr()), zap.Bool("health", p != nil))
		return nil
	}
	var err error
	switch {
	case f.healthAddr == "":
		err = start(f.metricsAddr, nil)
	case f.metricsAddr == "" || f.metricsAddr == f.healthAddr:
		err = start(f.healthAddr, probes)
	default:
		if err = start(f.metricsAddr, nil); err == nil {
			err = start(f.healthAddr, probes)
		}
	}
	if err != nil {
		_ = o.close()
	}
	return err
}

// close stops the servers within 5 s.
func (o *observability) close() error {
	if o == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var errs []error
	for _, s := range o.servers {
		errs = append(errs, s.Close(ctx))
	}
	return errors.Join(errs...)
}
