package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/internal/atomicfile"
	"github.com/iothubby/iothubby/pkg/methods"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// RebootConfig enables the built-in `reboot` direct method.
type RebootConfig struct {
	// Mode is "" (no reboot method), "exec" (run Command, report completion after the real
	// reboot) or "simulate" (disconnect, wait BootDelay, reconnect).
	Mode string `yaml:"mode"`
	// Command is argv for exec mode, e.g. ["systemctl", "reboot"].
	Command []string `yaml:"command"`
	// BootDelay is how long a simulated reboot stays offline (default 5s).
	BootDelay time.Duration `yaml:"bootDelay"`
}

// DefaultBootDelay is a simulated reboot's offline time when none is configured.
const DefaultBootDelay = 5 * time.Second

func (c *RebootConfig) check() error {
	switch c.Mode {
	case "":
	case "simulate":
		if c.BootDelay < 0 {
			return fmt.Errorf("%w: reboot.bootDelay must not be negative", ErrConfig)
		}
		if c.BootDelay == 0 {
			c.BootDelay = DefaultBootDelay
		}
	case "exec":
		if len(c.Command) == 0 {
			return fmt.Errorf("%w: reboot.mode exec needs reboot.command", ErrConfig)
		}
		if _, err := exec.LookPath(c.Command[0]); err != nil {
			return fmt.Errorf("%w: reboot.command: %w", ErrConfig, err)
		}
	default:
		return fmt.Errorf("%w: reboot.mode %q (simulate or exec)", ErrConfig, c.Mode)
	}
	return nil
}

// errSimulatedReboot is how a session's loop reports that a simulated reboot was requested.
var errSimulatedReboot = errors.New("agent: simulated reboot")

// rebootState is reboot-<deviceId>.json in the state directory.
type rebootState struct {
	BootCount  int       `json:"bootCount"`
	LastReboot time.Time `json:"lastReboot,omitzero"`
	// Pending is set between an exec reboot's request and the agent's next start.
	Pending *pendingReboot `json:"pending,omitempty"`
	// Report is a result not yet handed to the twin sync.
	Report map[string]any `json:"report,omitempty"`
}

type pendingReboot struct {
	RequestedAt time.Time `json:"requestedAt"`
	// BootTime is the system boot time when the reboot was requested (zero when unknown).
	BootTime time.Time `json:"bootTime,omitzero"`
}

// rebooter is the device's reboot component: the persisted reboot state, the `reboot` direct
// method, the reboot the firmware updater asks for, and the simulated boot between two
// sessions. It has no goroutine of its own.
type rebooter struct {
	cfg  RebootConfig
	path string // reboot-<deviceId>.json in the state directory; "" without one
	log  *zap.Logger
	// report hands reported properties to the current twin sync.
	report func(map[string]any)
	// bootTime reads the system boot time (a seam for tests).
	bootTime func() (time.Time, bool)

	// mu guards rb, reportGen, justBooted and booted; it is never held across I/O. rb is the
	// persisted reboot state (reportGen counts the results put in rb.Report); rebooting is set
	// while a reboot is under way.
	mu        sync.Mutex
	rb        rebootState
	reportGen uint64
	rebooting atomic.Bool
	// wmu orders the writes of the state file; taken before mu, never under it.
	wmu sync.Mutex
	// simReboot asks the running session for a simulated reboot; booted is closed (and
	// replaced) when a simulated boot completes.
	simReboot chan struct{}
	booted    chan struct{}
	// wake wakes the device's loop after a send on simReboot (nil: nothing to wake).
	wake       func()
	justBooted bool
}

// askSimulated asks the running session's loop for a simulated reboot (one pending at most)
// and wakes the loop.
func (d *rebooter) askSimulated() {
	select {
	case d.simReboot <- struct{}{}:
	default:
	}
	if d.wake != nil {
		d.wake()
	}
}

func newRebooter(cfg RebootConfig, stateDir, deviceID string, log *zap.Logger, report func(map[string]any)) *rebooter {
	r := &rebooter{cfg: cfg, log: log, report: report, bootTime: bootTime,
		simReboot: make(chan struct{}, 1), booted: make(chan struct{})}
	if stateDir != "" {
		r.path = rebootStatePath(stateDir, deviceID)
	}
	return r
}

// rebootStatePath is the reboot state file of deviceID in stateDir.
func rebootStatePath(stateDir, deviceID string) string {
	return filepath.Join(stateDir, "reboot-"+strings.ReplaceAll(deviceID, "/", "_")+".json")
}

// newRebooter makes the device's rebooter. A device has one when reboot or firmware updates
// are configured, or a reboot state file is in its state directory when it starts (an earlier
// configuration's reboot to settle and report); otherwise none (~0.5 KiB less for each of a
// fleet's devices), and nothing reboots it.
func (d *Device) newRebooter() {
	d.reboot = newRebooter(d.cfg.Reboot, d.cfg.StateDir, d.id.deviceID, d.log, d.report)
	d.reboot.wake = d.wakeLoop
}

// askSimulatedReboot asks the running session's loop for a simulated reboot (the reboot
// method and firmware updates; neither exists without a rebooter).
func (d *Device) askSimulatedReboot() {
	if d.reboot != nil {
		d.reboot.askSimulated()
	}
}

// load reads the reboot state; an exec reboot still pending is settled here: the system
// boot time moved (or is unknown) means the reboot happened.
func (d *rebooter) load() error {
	settled, err := d.loadState()
	if err != nil || !settled {
		return err
	}
	return d.save()
}

// loadState reads the state file and settles a pending exec reboot in memory (settled: it must
// be saved).
func (d *rebooter) loadState() (settled bool, _ error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if p := d.path; p != "" {
		b, err := os.ReadFile(p)
		switch {
		case errors.Is(err, os.ErrNotExist):
		case err != nil:
			return false, fmt.Errorf("agent: reboot state: %w", err)
		default:
			if err := json.Unmarshal(b, &d.rb); err != nil {
				return false, fmt.Errorf("agent: reboot state %s is damaged: %w", p, err)
			}
		}
	}
	if pr := d.rb.Pending; pr != nil {
		bt, ok := d.bootTime()
		if !ok || pr.BootTime.IsZero() || !bt.Equal(pr.BootTime) {
			when := time.Now().UTC()
			if ok {
				when = bt.UTC()
			}
			d.rb.BootCount++
			d.rb.LastReboot = when
			d.rb.Report = map[string]any{"reboot": map[string]any{"state": "done", "mode": "exec",
				"requestedAt": pr.RequestedAt.UTC().Format(time.RFC3339Nano)},
				"lastReboot": when.Format(time.RFC3339Nano), "bootCount": d.rb.BootCount}
			d.log.Info("reboot completed", zap.Time("boot_time", when))
		} else {
			d.rb.Report = map[string]any{"reboot": map[string]any{"state": "failed", "mode": "exec",
				"requestedAt": pr.RequestedAt.UTC().Format(time.RFC3339Nano), "error": "the agent restarted but the system did not reboot"}}
			d.log.Warn(MsgRebootDidNotHappen)
		}
		d.rb.Pending = nil
		d.reportGen++
		return true, nil
	}
	return false, nil
}

// save writes the reboot state as it is now. The snapshot is taken under mu and written
// outside it, under wmu: each write takes the newest state, so a later state is never
// overwritten by an earlier one.
func (d *rebooter) save() error {
	p := d.path
	if p == "" {
		return nil
	}
	d.wmu.Lock()
	defer d.wmu.Unlock()
	d.mu.Lock()
	b, err := json.Marshal(d.rb)
	d.mu.Unlock()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	return atomicfile.WriteFile(p, b, 0o600)
}

// reportTo hands a pending reboot result to the new session's twin sync (which persists
// and sends it), and wakes whoever waits for a simulated boot to finish (the firmware updater),
// now that reports reach the new session.
func (d *rebooter) reportTo(ts interface{ Report(map[string]any) error }) {
	d.mu.Lock()
	if d.justBooted {
		d.justBooted = false
		close(d.booted)
		d.booted = make(chan struct{})
	}
	result, gen := d.rb.Report, d.reportGen
	d.mu.Unlock()
	if result == nil {
		return
	}
	if err := ts.Report(result); err != nil {
		// Not saved by the twin sync (it still sends it) or refused: keep it for the next session.
		if !errors.Is(err, twinsync.ErrNotPersisted) {
			d.log.Error("reboot result not reported", zap.Error(err))
		}
		return
	}
	d.mu.Lock()
	if d.reportGen == gen { // not replaced by a newer result meanwhile
		d.rb.Report = nil
	}
	d.mu.Unlock()
	if err := d.save(); err != nil {
		d.log.Error("reboot state not saved", zap.Error(err))
	}
}

// handler is the `reboot` direct method: it answers 200 and then reboots (exec: runs the
// command; simulate: asks the session's loop to disconnect). A reboot already under way answers 409.
func (d *rebooter) handler(requestSimulated func()) methods.Handler {
	return methods.HandlerFunc(func(_ context.Context, r *methods.Request) methods.Response {
		if !d.rebooting.CompareAndSwap(false, true) {
			return methods.Response{Status: 409, Payload: []byte(`{"message":"a reboot is already under way"}`)}
		}
		now := time.Now().UTC()
		mode := d.cfg.Mode
		d.log.Info("reboot requested by direct method", zap.String("rid", r.RequestID), zap.String("mode", mode))
		d.report(map[string]any{"reboot": map[string]any{"state": "rebooting", "mode": mode, "requestedAt": now.Format(time.RFC3339Nano)}})
		if mode == "exec" {
			bt, _ := d.bootTime()
			d.mu.Lock()
			d.rb.Pending = &pendingReboot{RequestedAt: now, BootTime: bt}
			d.mu.Unlock()
			err := d.save()
			if err != nil {
				d.rebooting.Store(false)
				d.log.Error("reboot state not saved", zap.Error(err))
				return methods.Response{Status: 500, Payload: []byte(`{"message":"cannot record the pending reboot"}`)}
			}
		}
		return methods.Response{Status: 200, Payload: []byte(`{"message":"rebooting"}`), Then: func(error) {
			if mode == "simulate" {
				requestSimulated()
				return
			}
			d.execReboot(now)
		}}
	})
}

// execReboot runs the reboot command. On success the system takes the agent down; the pending
// reboot recorded in the state directory is settled on the next start.
func (d *rebooter) execReboot(requested time.Time) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := d.cfg.Command
	cmd := exec.CommandContext(ctx, c[0], c[1:]...)
	out, err := cmd.CombinedOutput()
	if err == nil {
		d.log.Info(MsgRebootCommandRan)
		return
	}
	line := strings.TrimSpace(string(out))
	if i := strings.LastIndexByte(line, '\n'); i >= 0 {
		line = line[i+1:]
	}
	if len(line) > 200 {
		line = line[:200]
	}
	d.log.Error("reboot command failed", zap.Error(err), zap.String("output", line))
	d.mu.Lock()
	d.rb.Pending = nil
	d.mu.Unlock()
	if err := d.save(); err != nil {
		d.log.Error("reboot state not saved", zap.Error(err))
	}
	d.report(map[string]any{"reboot": map[string]any{"state": "failed", "mode": "exec",
		"requestedAt": requested.Format(time.RFC3339Nano), "error": fmt.Sprintf("reboot command: %v: %s", err, line)}})
	d.rebooting.Store(false)
}

// simulateBoot is the offline part of a simulated reboot: it waits BootDelay (false if the
// device is stopped meanwhile), then counts the boot and queues its report for the next session.
func (d *rebooter) simulateBoot(ctx context.Context) bool {
	d.log.Info("simulated reboot: offline", zap.Duration("boot_delay", d.cfg.BootDelay))
	t := time.NewTimer(d.cfg.BootDelay)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
	}
	now := time.Now().UTC()
	d.mu.Lock()
	d.rb.BootCount++
	d.rb.LastReboot = now
	d.rb.Report = map[string]any{"reboot": map[string]any{"state": "done", "mode": "simulate"},
		"lastReboot": now.Format(time.RFC3339Nano), "bootCount": d.rb.BootCount}
	d.reportGen++
	count := d.rb.BootCount
	d.justBooted = true // the next session's start wakes those waiting for the boot
	d.mu.Unlock()
	if err := d.save(); err != nil {
		d.log.Error("reboot state not saved", zap.Error(err))
	}
	d.rebooting.Store(false)
	d.log.Info(MsgSimRebootBooted, zap.Int("boot_count", count))
	return true
}

// report hands reported properties to the current twin sync (best effort: the sync persists
// and re-sends them).
func (d *Device) report(patch map[string]any) {
	s := d.sync.Load()
	if s == nil {
		return
	}
	if err := s.Report(patch); err != nil && !errors.Is(err, twinsync.ErrNotPersisted) {
		// (not persisted: the sync logged it and sends the patch anyway)
		d.log.Error("reported properties refused", zap.Error(err))
	}
}
