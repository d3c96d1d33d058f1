package agent

import (
	"errors"
	"fmt"
	"reflect"
	"text/template"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/methods"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// ErrRestartNeeded is returned by Device.Reload when the new configuration changes something a
// running session cannot take (identity, endpoint, credentials, TLS, connection tuning, queue,
// method timeout and concurrency, firmware, reboot, state directory): the caller stops this
// Device and runs a new one with the new configuration, which reconnects.
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

// Reload applies a new configuration to the running device, on the same connection:
//   - telemetry (interval, template, content type and encoding, properties) changes at once:
//     the next message is rendered with the new template and the interval restarts from the
//     reload;
//   - the scripted direct methods (methods) are swapped in one step: a call that arrives after
//     Reload runs the new script (a removed name is answered 501), calls already running finish
//     with the script they started with;
//   - the twin behaviours (twin.properties, twin.default) apply to the desired changes that
//     arrive after Reload; values already acknowledged are not acknowledged again;
//   - the reported facts (twin.reported, twin.firmwareVersion) are reported at once: new and
//     changed ones with their value, removed ones as null.
//
// The log settings are the caller's (cmd/agent builds the logger). Anything else that differs
// makes Reload return ErrRestartNeeded, with nothing applied. An invalid configuration is
// refused with an error matching ErrConfig, and the running one is kept.
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
	scripts, err := cfg.checkMethods(d.dpsEnabled())
	if err != nil {
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
	// What a running session cannot take: everything but telemetry, the scripted methods, the
	// twin behaviours and the log settings.
	old, nw := d.cfg, cfg
	for _, c := range []*Config{&old, &nw} {
		c.Telemetry, c.Log, c.Methods = TelemetryConfig{}, LogConfig{}, nil
		c.Twin.Properties, c.Twin.Default = nil, TwinBehaviour{}
		c.Twin.Reported, c.Twin.FirmwareVersion = nil, ""
	}
	if !reflect.DeepEqual(old, nw) {
		return ErrRestartNeeded
	}
	prev := d.tele.Swap(next)
	select {
	case d.teleChanged <- struct{}{}:
	default: // a change is already pending; the loop reads the latest settings
	}
	d.wakeLoop()
	methodsChanged, twinChanged, facts := d.setBehaviours(cfg, scripts)
	if facts != nil {
		// Outside behaviourMu: Report writes the twin state file.
		if err := facts.ts.SetFacts(facts.facts); err != nil && !errors.Is(err, twinsync.ErrNotPersisted) {
			d.log.Error("reload: reported facts not sent", zap.Error(err))
		}
	}
	d.log.Info(MsgConfigReloaded, zap.Duration("telemetry_interval", cfg.Telemetry.Interval),
		zap.Bool("template_changed", prev == nil || prev.cfg.Template != cfg.Telemetry.Template),
		zap.Bool("methods_changed", methodsChanged), zap.Bool("twin_changed", twinChanged))
	return nil
}

// newFacts are reported facts for a running twin sync to take (twinsync.Sync.SetFacts).
type newFacts struct {
	ts    *twinsync.Sync
	facts map[string]any
}

// setBehaviours puts cfg's scripted methods (built as scripts), twin behaviours and reported
// facts in force, in the running session's dispatcher and twin sync too, and reports which
// changed. New facts for a running sync are returned for the caller to send, since sending
// them writes the twin state file.
func (d *Device) setBehaviours(cfg Config, scripts map[string]methods.Handler) (methodsChanged, twinChanged bool, facts *newFacts) {
	d.behaviourMu.Lock()
	defer d.behaviourMu.Unlock()
	methodsChanged = !reflect.DeepEqual(d.scriptCfg, cfg.Methods)
	tb := *d.twinB // copied on write: the first is the configuration's own
	factsChanged := !reflect.DeepEqual(tb.Reported, cfg.Twin.Reported) || tb.FirmwareVersion != cfg.Twin.FirmwareVersion
	if factsChanged {
		tb.Reported, tb.FirmwareVersion = cfg.Twin.Reported, cfg.Twin.FirmwareVersion
		if d.twinSync != nil {
			facts = &newFacts{ts: d.twinSync, facts: d.facts(tb)}
		}
	}
	twinChanged = factsChanged || !reflect.DeepEqual(tb.Properties, cfg.Twin.Properties) || !reflect.DeepEqual(tb.Default, cfg.Twin.Default)
	if methodsChanged {
		var remove []string
		for name := range d.scripts {
			if !d.builtinMethod(name) {
				remove = append(remove, name)
			}
		}
		add := make(map[string]methods.Handler, len(scripts))
		for name, h := range scripts {
			if !d.builtinMethod(name) {
				add[name] = h
			}
		}
		d.scripts, d.scriptCfg = scripts, cfg.Methods
		if d.disp != nil {
			d.disp.Replace(remove, add)
		}
	}
	if twinChanged {
		tb.Properties, tb.Default = cfg.Twin.Properties, cfg.Twin.Default
		if d.twinSync != nil {
			d.twinSync.SetHandlers(d.twinHandlers(tb))
		}
		d.twinB = &tb
	}
	return methodsChanged, twinChanged, facts
}

// sessionEnded forgets the dispatcher and twin sync of a session that ended (ts is its sync).
func (d *Device) sessionEnded(ts *twinsync.Sync) {
	d.behaviourMu.Lock()
	defer d.behaviourMu.Unlock()
	if d.twinSync == ts {
		d.twinSync, d.disp = nil, nil
	}
}
