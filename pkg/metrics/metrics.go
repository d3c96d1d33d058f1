// Package metrics turns the events of agent devices (pkg/agent's Observer) into Prometheus
// metrics, the same names for one `agent run` and for an `agent fleet` of thousands, and serves
// them with the health endpoints.
//
// Every Metrics owns its own prometheus.Registry (no default global registry, no package-level
// state), so tests and several agents can live in one process. Label values are bounded: there
// is no device-id label, method names outside the configured set are counted as "other",
// failure reasons and statuses come from fixed lists.
//
// The metric names, all prefixed iothubby_, are documented in README.md (Observability).
package metrics

import (
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/iothubby/iothubby/pkg/hub"
)

// Namespace prefixes every metric name.
const Namespace = "iothubby"

// OtherMethod is the method label of calls to methods outside Config.Methods.
const OtherMethod = "other"

// Config configures a Metrics.
type Config struct {
	// Methods are the direct-method names counted under their own name; calls to any other name
	// are counted as "other", so a caller cannot grow the label set.
	Methods []string
	// ProcessCollectors adds the Go runtime and process collectors (go_*, process_*).
	ProcessCollectors bool
}

// Metrics is one process's metric set and registry. Its methods are safe for concurrent use and
// never block on I/O; they match pkg/agent's Observer (and its optional extensions).
type Metrics struct {
	reg     *prometheus.Registry
	methods map[string]bool

	devices        *prometheus.GaugeVec
	connects       prometheus.Counter
	disconnects    *prometheus.CounterVec
	provisioning   *prometheus.CounterVec
	telSent        prometheus.Counter
	telAcked       prometheus.Counter
	telFailed      *prometheus.CounterVec
	telQueued      prometheus.Gauge
	c2d            prometheus.Counter
	desired        prometheus.Counter
	reported       *prometheus.CounterVec
	methodCalls    *prometheus.CounterVec
	connectTime    prometheus.Histogram
	pubackTime     prometheus.Histogram
	twinRoundTrip  *prometheus.HistogramVec
	methodDuration *prometheus.HistogramVec

	mu    sync.Mutex
	state map[string]deviceState // guarded by mu; memory only
}

// deviceState is what Metrics remembers per device: its last status (for the devices gauge)
// and when its current connection attempt started (for the connect-time histogram).
type deviceState struct {
	status    hub.ConnState
	attemptAt time.Time
}

// States are the values of the devices gauge's status label.
var States = []hub.ConnState{hub.Connected, hub.DisconnectedRetrying, hub.Disconnected, hub.Disabled}

// New builds the metric set in a new registry.
func New(cfg Config) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry(), methods: map[string]bool{}, state: map[string]deviceState{}}
	for _, n := range cfg.Methods {
		m.methods[n] = true
	}
	f := func(name, help string) prometheus.Opts {
		return prometheus.Opts{Namespace: Namespace, Name: name, Help: help}
	}
	h := func(name, help string, buckets []float64) prometheus.HistogramOpts {
		return prometheus.HistogramOpts{Namespace: Namespace, Name: name, Help: help, Buckets: buckets}
	}
	// Network latencies: 5 ms to ~40 s.
	net := prometheus.ExponentialBuckets(0.005, 2, 14)
	m.devices = prometheus.NewGaugeVec(prometheus.GaugeOpts(f("devices", "Devices by connection status (Connected, Disconnected_Retrying, Disconnected, Disabled).")), []string{"status"})
	m.connects = prometheus.NewCounter(prometheus.CounterOpts(f("connects_total", "Hub connections established.")))
	m.disconnects = prometheus.NewCounterVec(prometheus.CounterOpts(f("disconnects_total", "Hub connections lost or refused, by reason (the SDKs' status reasons).")), []string{"reason"})
	m.provisioning = prometheus.NewCounterVec(prometheus.CounterOpts(f("provisioning_total", "DPS provisioning results: cached, registered, failed.")), []string{"result"})
	m.telSent = prometheus.NewCounter(prometheus.CounterOpts(f("telemetry_sent_total", "Telemetry messages handed to the session's queue.")))
	m.telAcked = prometheus.NewCounter(prometheus.CounterOpts(f("telemetry_acknowledged_total", "Telemetry messages acknowledged by the hub (PUBACK).")))
	m.telFailed = prometheus.NewCounterVec(prometheus.CounterOpts(f("telemetry_failed_total", "Telemetry messages that failed, by reason.")), []string{"reason"})
	m.telQueued = prometheus.NewGauge(prometheus.GaugeOpts(f("telemetry_queued", "Telemetry messages sent and not yet acknowledged or failed.")))
	m.c2d = prometheus.NewCounter(prometheus.CounterOpts(f("c2d_received_total", "Cloud-to-device messages received.")))
	m.desired = prometheus.NewCounter(prometheus.CounterOpts(f("desired_versions_total", "Desired-property versions received and handed to the twin sync.")))
	m.reported = prometheus.NewCounterVec(prometheus.CounterOpts(f("reported_patches_total", "Reported-property patches sent, by result (ok, error).")), []string{"result"})
	m.methodCalls = prometheus.NewCounterVec(prometheus.CounterOpts(f("method_calls_total", "Direct-method calls answered, by method and status.")), []string{"method", "status"})
	m.connectTime = prometheus.NewHistogram(h("connect_seconds", "Time from the start of a connection attempt to connected (TLS, CONNECT, subscriptions).", net))
	m.pubackTime = prometheus.NewHistogram(h("telemetry_puback_seconds", "Time from handing a telemetry message to the queue to its PUBACK (includes time queued while disconnected).", net))
	m.twinRoundTrip = prometheus.NewHistogramVec(h("twin_roundtrip_seconds", "Twin request round trip, by operation (get, patch).", net), []string{"op"})
	m.methodDuration = prometheus.NewHistogramVec(h("method_seconds", "Time from receiving a direct-method call to answering it, by method.", prometheus.ExponentialBuckets(0.001, 2, 16)), []string{"method"})
	m.reg.MustRegister(m.devices, m.connects, m.disconnects, m.provisioning, m.telSent, m.telAcked,
		m.telFailed, m.telQueued, m.c2d, m.desired, m.reported, m.methodCalls, m.connectTime,
		m.pubackTime, m.twinRoundTrip, m.methodDuration)
	if cfg.ProcessCollectors {
		m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	// Series that exist from the start, so a scrape shows zeros rather than nothing.
	for _, s := range States {
		m.devices.WithLabelValues(s.String())
	}
	for _, r := range []string{"ok", "error"} {
		m.reported.WithLabelValues(r)
	}
	return m
}

// Registry returns the registry the metrics are in (to serve it, or to add more).
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Provisioned counts a DPS provisioning outcome (cached, registered, failed).
func (m *Metrics) Provisioned(_, outcome string, _ error) {
	switch outcome {
	case "cached", "registered", "failed":
	default:
		outcome = "other"
	}
	m.provisioning.WithLabelValues(outcome).Inc()
}

// ConnectAttempt notes that device starts a connection attempt at t (hub.Config.BeforeConnect):
// the next Connected status observes the connect time from t.
func (m *Metrics) ConnectAttempt(device string, t time.Time) {
	m.mu.Lock()
	s := m.state[device]
	s.attemptAt = t
	m.state[device] = s
	m.mu.Unlock()
}

// ConnectionStatus moves the device between the devices gauge's statuses and counts connects
// and disconnects.
func (m *Metrics) ConnectionStatus(device string, st hub.Status) {
	m.mu.Lock()
	s := m.state[device]
	prev, attempt := s.status, s.attemptAt
	s.status = st.State
	if st.State == hub.Connected {
		s.attemptAt = time.Time{}
	}
	if st.State == hub.Disabled {
		delete(m.state, device) // closed by the application: forget it
	} else {
		m.state[device] = s
	}
	m.mu.Unlock()

	if prev != st.State {
		if prev != 0 {
			m.devices.WithLabelValues(prev.String()).Dec()
		}
		if st.State != hub.Disabled {
			m.devices.WithLabelValues(st.State.String()).Inc()
		}
	}
	switch st.State {
	case hub.Connected:
		m.connects.Inc()
		if !attempt.IsZero() && !st.At.IsZero() && !st.At.Before(attempt) {
			m.connectTime.Observe(st.At.Sub(attempt).Seconds())
		}
	case hub.DisconnectedRetrying, hub.Disconnected:
		m.disconnects.WithLabelValues(reasonLabel(st.Reason)).Inc()
	}
}

func reasonLabel(r hub.Reason) string {
	if r < hub.ConnectionOK || r > hub.IdentityInUse {
		return "other"
	}
	return r.String()
}

// TelemetrySent counts a message handed to the queue.
func (m *Metrics) TelemetrySent(string) {
	m.telSent.Inc()
	m.telQueued.Inc()
}

// TelemetryDone counts a message's outcome: acknowledged after latency (err nil), or failed
// with the reason err names.
func (m *Metrics) TelemetryDone(_ string, latency time.Duration, err error) {
	m.telQueued.Dec()
	if err == nil {
		m.telAcked.Inc()
		m.pubackTime.Observe(latency.Seconds())
		return
	}
	m.telFailed.WithLabelValues(FailureReason(err)).Inc()
}

// failureReasons maps the session's errors to the telemetry_failed_total reason label.
var failureReasons = []struct {
	err    error
	reason string
}{
	{hub.ErrQueueFull, "queue_full"},
	{hub.ErrMessageTooLarge, "too_large"},
	{hub.ErrInvalidMessage, "invalid"},
	{hub.ErrMessageExpired, "expired"},
	{hub.ErrCanceled, "canceled"},
	{hub.ErrNotAuthorized, "not_authorized"},
	{hub.ErrConnectionRefused, "connection_refused"},
	{hub.ErrTLSVerify, "tls_verify"},
	{hub.ErrRetryExpired, "retry_expired"},
	{hub.ErrClosed, "closed"},
}

// FailureReason is the reason label for a failed telemetry message: one of queue_full,
// too_large, invalid, expired, canceled, not_authorized, connection_refused, tls_verify,
// retry_expired, closed, other.
func FailureReason(err error) string {
	for _, r := range failureReasons {
		if errors.Is(err, r.err) {
			return r.reason
		}
	}
	return "other"
}

// C2DReceived counts a cloud-to-device message.
func (m *Metrics) C2DReceived(string) { m.c2d.Inc() }

// DesiredReceived counts a desired-properties version.
func (m *Metrics) DesiredReceived(string, int64) { m.desired.Inc() }

// MethodAnswered counts a direct-method call and how long it took to answer.
func (m *Metrics) MethodAnswered(_, method string, status int, d time.Duration) {
	if !m.methods[method] {
		method = OtherMethod
	}
	code := "other"
	if status >= 100 && status <= 599 {
		code = strconv.Itoa(status)
	}
	m.methodCalls.WithLabelValues(method, code).Inc()
	m.methodDuration.WithLabelValues(method).Observe(d.Seconds())
}

// TwinRequest observes a twin request's round trip; op is "get" or "patch" (a reported
// patch, also counted in reported_patches_total).
func (m *Metrics) TwinRequest(_, op string, d time.Duration, err error) {
	switch op {
	case "get", "patch":
	default:
		op = "other"
	}
	if op == "patch" {
		r := "ok"
		if err != nil {
			r = "error"
		}
		m.reported.WithLabelValues(r).Inc()
	}
	if err == nil {
		m.twinRoundTrip.WithLabelValues(op).Observe(d.Seconds())
	}
}
