package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/internal/version"
	"github.com/iothubby/iothubby/pkg/twin"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// TwinConfig is how the agent behaves towards its device twin: what it reports about itself,
// and what it does with each desired property (a fake device for testing cloud code, or hooks
// on a real one).
type TwinConfig struct {
	// FirmwareVersion is reported as firmwareVersion; default "unknown".
	FirmwareVersion string `yaml:"firmwareVersion"`
	// Reported are static reported properties sent on every connect (when they differ from
	// what the hub has).
	Reported map[string]any `yaml:"reported"`
	// Default is the behaviour for desired properties no entry of Properties covers.
	// Default action: accept.
	Default TwinBehaviour `yaml:"default"`
	// Properties maps desired property paths ("interval", "network.mode") to behaviours.
	Properties map[string]TwinBehaviour `yaml:"properties"`
}

// TwinBehaviour is what the agent does with a desired property.
type TwinBehaviour struct {
	// Action: accept (apply and ack 200, echoing the value), delay (ack 202 at once, 200 after
	// Delay), reject (ack Status, default 400, reporting the value in use), command (run Command
	// with the value in the environment; exit 0 acks 200, anything else 500), ignore (record
	// the value, send no ack).
	Action string `yaml:"action"`
	// Delay before the final ack of a delay action.
	Delay time.Duration `yaml:"delay"`
	// Status for a reject action (default 400).
	Status int `yaml:"status"`
	// Description is the ack's ad.
	Description string `yaml:"description"`
	// Command is argv for a command action. It gets IOTHUBBY_DEVICE_ID, IOTHUBBY_PROPERTY,
	// IOTHUBBY_VALUE (JSON) and IOTHUBBY_VERSION in its environment.
	Command []string `yaml:"command"`
	// Timeout bounds a command (default 30s).
	Timeout time.Duration `yaml:"timeout"`
}

func (b TwinBehaviour) check(path string) error {
	switch b.Action {
	case "", "accept", "ignore":
	case "delay":
		if b.Delay <= 0 {
			return fmt.Errorf("%w: twin property %q: action delay needs a positive delay", ErrConfig, path)
		}
	case "reject":
		if b.Status != 0 && (b.Status < 400 || b.Status > 599) {
			return fmt.Errorf("%w: twin property %q: reject status must be 4xx or 5xx", ErrConfig, path)
		}
	case "command":
		if len(b.Command) == 0 {
			return fmt.Errorf("%w: twin property %q: action command needs a command", ErrConfig, path)
		}
	default:
		return fmt.Errorf("%w: twin property %q: unknown action %q (accept, delay, reject, command, ignore)", ErrConfig, path, b.Action)
	}
	return nil
}

// checkTwin validates the twin section.
func (c *TwinConfig) check() error {
	if err := c.Default.check("default"); err != nil {
		return err
	}
	for p, b := range c.Properties {
		for _, k := range strings.Split(p, ".") {
			if err := twin.CheckKey(k); err != nil {
				return fmt.Errorf("%w: twin property path %q: %w", ErrConfig, p, err)
			}
		}
		if err := b.check(p); err != nil {
			return err
		}
	}
	if _, err := jsonDoc(c.Reported); err != nil {
		return fmt.Errorf("%w: twin.reported: %w", ErrConfig, err)
	}
	return nil
}

// jsonDoc turns YAML-decoded values into the decoded-JSON form pkg/twin uses, and checks them.
func jsonDoc(m map[string]any) (map[string]any, error) {
	if len(m) == 0 {
		return map[string]any{}, nil
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	doc, err := twin.Decode(b)
	if err != nil {
		return nil, err
	}
	return doc, twin.CheckPatch(doc)
}

// handler builds the twinsync.Handler for a behaviour.
func (d *Device) handler(b TwinBehaviour) twinsync.Handler {
	switch b.Action {
	case "ignore":
		return func(context.Context, twinsync.Change) twinsync.Ack { return twinsync.Ack{} }
	case "delay":
		return func(_ context.Context, c twinsync.Change) twinsync.Ack {
			if c.Deleted {
				return twinsync.Ack{}
			}
			c.Later(b.Delay, twinsync.Ack{Status: 200, Description: b.Description})
			return twinsync.Ack{Status: 202, Description: "in progress"}
		}
	case "reject":
		status := b.Status
		if status == 0 {
			status = 400
		}
		desc := b.Description
		if desc == "" {
			desc = "rejected by configuration"
		}
		return func(_ context.Context, c twinsync.Change) twinsync.Ack {
			// report the value in use: the last one accepted, or nothing
			return twinsync.Ack{Status: status, Description: desc, Value: d.inUse(c.Path)}
		}
	case "command":
		return func(ctx context.Context, c twinsync.Change) twinsync.Ack { return d.runCommand(ctx, b, c) }
	}
	return func(_ context.Context, c twinsync.Change) twinsync.Ack {
		return twinsync.Ack{Status: 200, Description: b.Description}
	}
}

// inUse is the value a rejected property keeps: the value of its last ack, if any.
func (d *Device) inUse(path string) any {
	s := d.sync.Load()
	if s == nil {
		return map[string]any{}
	}
	cur := any(s.Intended())
	for _, k := range strings.Split(path, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return map[string]any{}
		}
		cur = m[k]
	}
	if m, ok := cur.(map[string]any); ok && m["value"] != nil {
		return m["value"]
	}
	return map[string]any{} // an empty object: no value in use
}

func (d *Device) runCommand(ctx context.Context, b TwinBehaviour, c twinsync.Change) twinsync.Ack {
	timeout := b.Timeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	val, _ := json.Marshal(c.Value)
	cmd := exec.CommandContext(ctx, b.Command[0], b.Command[1:]...)
	cmd.Env = append(os.Environ(),
		"IOTHUBBY_DEVICE_ID="+d.id.deviceID,
		"IOTHUBBY_PROPERTY="+c.Path,
		"IOTHUBBY_VALUE="+string(val),
		"IOTHUBBY_VERSION="+strconv.FormatInt(c.Version, 10))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	if err != nil {
		desc := strings.TrimSpace(stderr.String())
		if i := strings.IndexByte(desc, '\n'); i >= 0 {
			desc = desc[:i]
		}
		if desc == "" {
			desc = err.Error()
		}
		if len(desc) > 256 {
			desc = desc[:256]
		}
		d.log.Warn("twin command failed", zap.String("property", c.Path), zap.Error(err))
		return twinsync.Ack{Status: 500, Description: desc}
	}
	return twinsync.Ack{Status: 200, Description: b.Description}
}

// facts are what the agent reports about itself on every connect, with the twin settings tc
// (twin.reported, twin.firmwareVersion).
func (d *Device) facts(tc TwinConfig) map[string]any {
	fw := tc.FirmwareVersion
	if fw == "" {
		fw = "unknown"
	}
	f, _ := jsonDoc(tc.Reported)
	h := d.cfg.Shared.Host
	if h == nil {
		hf := ReadHostFacts()
		h = &hf
	}
	f["agentVersion"] = h.AgentVersion
	if d.fw == nil { // with firmware updates the updater reports it (it changes while connected)
		f["firmwareVersion"] = fw
	}
	if !h.BootTime.IsZero() {
		f["bootTime"] = h.BootTime.UTC().Format(time.RFC3339)
	}
	return f
}

// HostFacts are the reported properties that come from the host rather than from the device:
// the agent's version and the system's boot time. A fleet reads them once (Shared.Host)
// instead of every device at every session: reading /proc/stat and the build information
// was a tenth of a fleet's CPU while its devices connected.
type HostFacts struct {
	AgentVersion string
	BootTime     time.Time // zero where unknown
}

// ReadHostFacts reads the agent's version and the boot time (/proc/stat).
func ReadHostFacts() HostFacts {
	h := HostFacts{AgentVersion: AgentVersion()}
	if bt, ok := bootTime(); ok {
		h.BootTime = bt
	}
	return h
}

// AgentVersion is the module version the agent was built from ("devel" for local builds).
func AgentVersion() string {
	return version.String()
}

// bootTime reads the system boot time from /proc/stat (btime); false where there is none.
func bootTime() (time.Time, bool) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil {
				return time.Unix(n, 0), true
			}
		}
	}
	return time.Time{}, false
}

// newSync builds the device's twin sync, with the twin behaviours in force; it becomes the
// sync a reload updates.
func (d *Device) newSync(ses twinsync.Session) (*twinsync.Sync, error) {
	d.behaviourMu.Lock()
	defer d.behaviourMu.Unlock()
	handlers, def := d.twinHandlers(*d.twinB)
	ts, err := twinsync.New(ses, twinsync.Config{
		DeviceID: d.id.deviceID,
		StateDir: d.cfg.StateDir,
		Handlers: handlers,
		Default:  def,
		Facts:    d.facts(*d.twinB),
		Logger:   d.log.Named("twin"),
	})
	if err == nil {
		d.twinSync = ts
	}
	return ts, err
}

// twinHandlers builds the twin sync's handlers for the behaviours of tc (and the firmware
// property when firmware updates are on).
func (d *Device) twinHandlers(tc TwinConfig) (map[string]twinsync.Handler, twinsync.Handler) {
	handlers := map[string]twinsync.Handler{}
	for p, b := range tc.Properties {
		handlers[p] = d.watchHandler(d.handler(b))
	}
	if d.fw != nil {
		handlers["firmware"] = d.watchHandler(d.firmwareDesired(d.fw))
	}
	return handlers, d.watchHandler(d.handler(tc.Default))
}
