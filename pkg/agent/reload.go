package agent

import (
	"errors"
	"fmt"
	"reflect"
	"text/template"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hub"
)

// ErrRestartNeeded is returned by Device.Reload when the new configuration changes something a
// running session cannot take (identity, endpoint, credentials, TLS, connection tuning, queue,
// twin behaviours, methods, firmware, reboot, state directory): the caller stops this Device and
// runs a new one with the new configuration, which reconnects.
var ErrRestartNeeded = errors.New("agent: the new configuration needs a new session")

// telemetrySettings are what the telemetry loop reads for each message; Reload swaps them
// whole.
type telemetrySettings struct {
	cfg  TelemetryConfig
	tmpl *template.Template
}

// OnStatus sets a function called with every connection status change of the device's hub
// session (from the session's delivery goroutine: it must not block). Call it before Run.
func (d *Device) OnStatus(f func(hub.Status)) { d.statusHook = f }

// Reload applies a new configuration to the running device. Telemetry (interval, template,
// content type and encoding, properties) changes at once, on the same connection: the next
// message is rendered with the new template and the interval restarts from the reload. The log
// settings are the caller's (cmd/agent builds the logger). Anything else that differs makes
// Reload return ErrRestartNeeded, with nothing applied. An invalid configuration is refused with
// an error matching ErrConfig, and the running one is kept.
func (d *Device) Reload(cfg Config) error {
	if _, err := cfg.resolve(); err != nil {
		return err
	}
	if cfg.Telemetry.Template == "" {
		cfg.Telemetry.Template = DefaultTemplate
	}
	if cfg.Telemetry.ContentType == "" {
		cfg.Telemetry.ContentType = "application/json"
	}
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = DefaultShutdownTimeout
	}
	if err := cfg.Twin.check(); err != nil {
		return err
	}
	if _, err := cfg.checkMethods(d.dpsEnabled()); err != nil {
		return err
	}
	tmpl, err := ParseTemplate(cfg.Telemetry.Template)
	if err != nil {
		return err
	}
	next := &telemetrySettings{cfg: cfg.Telemetry, tmpl: tmpl}
	if _, err := next.render(d, 0, time.Now()); err != nil {
		return fmt.Errorf("%w: telemetry.template: %w", ErrConfig, err)
	}
	// What a running session cannot take: everything but telemetry and the log settings.
	old, nw := d.cfg, cfg
	old.Telemetry, nw.Telemetry = TelemetryConfig{}, TelemetryConfig{}
	old.Log, nw.Log = LogConfig{}, LogConfig{}
	if !reflect.DeepEqual(old, nw) {
		return ErrRestartNeeded
	}
	prev := d.tele.Swap(next)
	select {
	case d.teleChanged <- struct{}{}:
	default: // a change is already pending; the loop reads the latest settings
	}
	d.log.Info(MsgConfigReloaded, zap.Duration("telemetry_interval", cfg.Telemetry.Interval),
		zap.Bool("template_changed", prev == nil || prev.cfg.Template != cfg.Telemetry.Template))
	return nil
}

// newTicker returns the telemetry tick channel for interval (nil: no telemetry) and its stop.
func newTelemetryTicker(interval time.Duration) (<-chan time.Time, func()) {
	if interval <= 0 {
		return nil, func() {}
	}
	t := time.NewTicker(interval)
	return t.C, t.Stop
}
