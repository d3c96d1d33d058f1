package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"text/template"
	"time"

	"github.com/iothubby/iothubby/pkg/hub"
)

// Observer receives a device's events, for counters and metrics (pkg/fleet counts them for its
// summary; pkg/metrics turns them into Prometheus metrics). Methods are called from the
// device's own goroutines, possibly concurrently, and must not block. Every method gets the
// device id first. Implementations embed NopObserver so that events added later need no change.
type Observer interface {
	// Provisioned reports a DPS provisioning: outcome is ProvisionCached, ProvisionRegistered or
	// ProvisionFailed (err set).
	Provisioned(device, outcome string, err error)
	// ConnectionStatus reports every change of the hub session's status.
	ConnectionStatus(device string, st hub.Status)
	// TelemetrySent reports a message handed to the session's queue.
	TelemetrySent(device string)
	// TelemetryDone reports a sent message's outcome: err nil when the hub acknowledged it
	// (PUBACK) after latency; otherwise the reason it failed (refused by a full queue, expired,
	// undelivered at shutdown).
	TelemetryDone(device string, latency time.Duration, err error)
	// C2DReceived reports a cloud-to-device message.
	C2DReceived(device string)
	// DesiredReceived reports a desired-properties patch handed to the twin sync.
	DesiredReceived(device string, version int64)
	// MethodAnswered reports a direct-method call and the status it was answered with, after
	// handling for d.
	MethodAnswered(device, method string, status int, d time.Duration)
}

// Provisioning outcomes passed to Observer.Provisioned.
const (
	ProvisionCached     = "cached"
	ProvisionRegistered = "registered"
	ProvisionFailed     = "failed"
)

// NopObserver ignores every event; embed it in an Observer.
type NopObserver struct{}

func (NopObserver) Provisioned(string, string, error)                 {}
func (NopObserver) ConnectionStatus(string, hub.Status)               {}
func (NopObserver) TelemetrySent(string)                              {}
func (NopObserver) TelemetryDone(string, time.Duration, error)        {}
func (NopObserver) C2DReceived(string)                                {}
func (NopObserver) DesiredReceived(string, int64)                     {}
func (NopObserver) MethodAnswered(string, string, int, time.Duration) {}

// Shared holds what a program running many devices in one process (pkg/fleet) shares between
// them or sets per device beyond the YAML; the YAML cannot set it. Zero values: the single
// agent's behaviour.
type Shared struct {
	// Index and Profile are the device's place in a fleet, seen by telemetry templates as
	// .Index and .Profile.
	Index   int
	Profile string
	// Observer receives the device's events; nil: none.
	Observer Observer
	// Liveness, when set, is the Liveness the device's loops report to (a process that
	// replaces its device on reload keeps one for /healthz); nil: the device makes its own.
	Liveness *Liveness
	// BeforeConnect is called before every hub connection attempt (hub.Config.BeforeConnect)
	// and every DPS registration (not for a cached result), e.g. a fleet-wide connect-rate
	// limiter.
	BeforeConnect func(ctx context.Context) error
	// RootCAs, when set, replace tls.caFile (parsed once for the fleet).
	RootCAs *x509.CertPool
	// TLSSessionCache is shared by the hub sessions (TLS session resumption).
	TLSSessionCache tls.ClientSessionCache
	// TLSConfigs, when set, is shared by the hub sessions without a client certificate: those
	// with the same trust roots and server name use one tls.Config (hub.Config.TLSConfigs).
	TLSConfigs *hub.TLSConfigs
	// CurvePreferences, when set, are the TLS key exchanges the hub connections offer
	// (hub.Config.CurvePreferences); nil: Go's defaults.
	CurvePreferences []tls.CurveID
	// LeanMQTT makes the hub sessions use the lean MQTT client (hub.Config.LeanMQTT): one
	// goroutine per connection instead of paho's ten.
	LeanMQTT bool
	// Template, when set, is the parsed telemetry.template (parsed once per profile).
	Template *template.Template
	// Host, when set, holds the host's facts for the reported properties (read once for the
	// fleet with ReadHostFacts); nil: each session reads them.
	Host *HostFacts
}

// observer returns the configured observer or a no-op one.
func (d *Device) observer() Observer {
	if o := d.cfg.Shared.Observer; o != nil {
		return o
	}
	return NopObserver{}
}
