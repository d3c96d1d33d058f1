package main

// The agent as a systemd service (configs/iothubby-agent.service, Type=notify):
//
//   - READY=1 once the configuration is loaded and the device's first connection attempt has
//     started (not once it succeeds: a device offline at boot is still a running service);
//   - STATUS= with the connection status and its reason in words, on every change;
//   - WATCHDOG=1 every WATCHDOG_USEC/2 while the device's loops make progress (checkLoops): a
//     wedged loop stops the pings and systemd restarts the agent (WatchdogSec= in the unit);
//   - RELOADING=1 (with MONOTONIC_USEC, which systemd ≥ 253 wants for Type=notify-reload and
//     older versions ignore) when SIGHUP arrives, then READY=1 once the new configuration is
//     applied or refused; the unit reloads with ExecReload=kill -HUP $MAINPID, which works on
//     every systemd the agent supports (Debian 12 ships 252, before notify-reload);
//   - STOPPING=1 when SIGINT/SIGTERM starts the shutdown.
//
// Without $NOTIFY_SOCKET nothing is sent; the reload on SIGHUP works either way.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/iothubby/iothubby/internal/logging"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hub"
)

// msgWatchdogWithheld is logged (with the wedged loops) when the watchdog pings stop.
const msgWatchdogWithheld = "not pinging the systemd watchdog: a loop makes no progress"

// notifier sends sd_notify messages; a no-op when the agent does not run under systemd.
type notifier struct {
	log     *zap.Logger
	enabled bool
}

func newNotifier(log *zap.Logger) *notifier {
	return &notifier{log: log, enabled: os.Getenv("NOTIFY_SOCKET") != ""}
}

// send writes one notification (a datagram on the local socket systemd names; the kernel
// bounds it, and systemd reads its socket continuously).
func (n *notifier) send(state string) {
	if !n.enabled {
		return
	}
	if _, err := daemon.SdNotify(false, state); err != nil {
		n.log.Warn("systemd notification failed", zap.String("state", state), zap.Error(err))
	}
}

func (n *notifier) ready(status string) { n.send("READY=1\nSTATUS=" + status) }

func (n *notifier) status(status string) { n.send("STATUS=" + status) }

func (n *notifier) reloading() {
	var ts unix.Timespec
	mono := ""
	if unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) == nil {
		mono = fmt.Sprintf("\nMONOTONIC_USEC=%d", ts.Nano()/1000)
	}
	n.send("RELOADING=1" + mono + "\nSTATUS=reloading the configuration")
}

func (n *notifier) stopping() { n.send("STOPPING=1\nSTATUS=stopping: draining queued telemetry") }

// watchdogPeriod is how often to ping the watchdog (half of WATCHDOG_USEC), or 0 when systemd
// does not watch this process.
func watchdogPeriod(log *zap.Logger) time.Duration {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn("ignoring WATCHDOG_USEC", zap.Error(err))
		return 0
	}
	return d / 2
}

// statusText puts a connection status in words for systemctl status.
func statusText(st hub.Status) string {
	switch st.State {
	case hub.Connected:
		return "connected to the hub"
	case hub.DisconnectedRetrying:
		s := fmt.Sprintf("disconnected (%s), retrying in %s (attempt %d)", st.Reason, st.RetryIn.Round(time.Millisecond), st.Attempt)
		if st.Err != nil {
			s += ": " + st.Err.Error()
		}
		return s
	case hub.Disconnected:
		s := fmt.Sprintf("disconnected (%s), not retrying", st.Reason)
		if st.Err != nil {
			s += ": " + st.Err.Error()
		}
		return s
	case hub.Disabled:
		return "connection closed"
	}
	return st.State.String()
}

// checkLoops reports whether dev's loops (session supervisor, twin sync, telemetry) make
// progress, allowing each piece of work max: the watchdog's test (pkg/agent's Liveness).
func checkLoops(dev *agent.Device, max time.Duration) error { return dev.Liveness().Check(max) }

// serveLogger builds the run command's logger on stderr, in journald's format when stderr is
// the journal, with a level a reload can change.
func serveLogger(c agent.LogConfig, stderr io.Writer) (*zap.Logger, zap.AtomicLevel, error) {
	f, _ := stderr.(*os.File)
	log, lvl, err := logging.Build(stderr, logging.Options{Level: c.Level, Format: c.Format, Journal: logging.UnderJournal(f)})
	if err != nil {
		return nil, lvl, fmt.Errorf("%w: %w", agent.ErrConfig, err)
	}
	return log, lvl, nil
}

// serve runs the device of cfg until ctx ends, reloading on SIGHUP with load's configuration,
// and talks to systemd throughout. hup delivers SIGHUP (registered before the configuration is
// read, so an early reload does not kill the process).
func serve(ctx context.Context, cfg agent.Config, load func() (agent.Config, error), hup <-chan os.Signal, log *zap.Logger, level zap.AtomicLevel, hooks testHooks) error {
	n := newNotifier(log)
	var tick <-chan time.Time
	period := watchdogPeriod(log)
	if period > 0 {
		t := time.NewTicker(period)
		defer t.Stop()
		tick = t.C
		log.Info("systemd watchdog on", zap.Duration("ping_every", period))
	}
	for {
		dev, err := agent.New(cfg, log)
		if err != nil {
			return err
		}
		// The latest status for the loop below; the hook must not block.
		var latest atomic.Pointer[hub.Status]
		wake := make(chan struct{}, 1)
		dev.OnStatus(func(st hub.Status) {
			latest.Store(&st)
			select {
			case wake <- struct{}{}:
			default:
			}
		})
		// The device stops when this loop says so (after STOPPING=1), not with ctx.
		runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		errc := make(chan error, 1)
		go func() { errc <- dev.Run(runCtx) }()
		n.ready("connecting to the hub")
		stop := func() error {
			cancel()
			err := <-errc
			dev.Close()
			return err
		}
		next, restart := cfg, false
		wedged := false
		for !restart {
			select {
			case <-ctx.Done():
				n.stopping()
				return stop()
			case err := <-errc:
				cancel()
				dev.Close()
				return err
			case <-wake:
				if st := latest.Load(); st != nil {
					n.status(statusText(*st))
				}
			case <-tick:
				if err := checkLoops(dev, period); err != nil {
					if !wedged {
						log.Error(msgWatchdogWithheld, zap.Error(err))
						n.status("unhealthy, not pinging the watchdog: " + err.Error())
					}
					wedged = true
					continue
				}
				if wedged {
					log.Info("loops make progress again; pinging the systemd watchdog")
					if st := latest.Load(); st != nil {
						n.status(statusText(*st))
					}
				}
				wedged = false
				n.send(daemon.SdNotifyWatchdog)
			case <-hooks.wedgeSig:
				if err := dev.WedgeForTest(hooks.wedge); err != nil {
					log.Error("test hook", zap.Error(err))
				}
			case <-hup:
				n.reloading()
				next, restart = reload(dev, cfg, load, log, level)
				if !restart {
					cfg = next
					n.ready(agent.MsgConfigReloaded)
					if st := latest.Load(); st != nil {
						n.status(statusText(*st))
					}
				}
			}
		}
		log.Info("reload: the new configuration needs a new session; reconnecting")
		if err := stop(); err != nil {
			return err
		}
		cfg = next
	}
}

// reload reads and applies the configuration: it returns the configuration now in force, and
// whether the device must be restarted with it. A configuration that cannot be read or is
// invalid is refused with a log line, and the running one kept.
func reload(dev *agent.Device, cur agent.Config, load func() (agent.Config, error), log *zap.Logger, level zap.AtomicLevel) (agent.Config, bool) {
	next, err := load()
	if err != nil {
		log.Error("reload refused: keeping the running configuration", zap.Error(err))
		return cur, false
	}
	lvl, err := logging.ParseLevel(next.Log.Level)
	if err != nil {
		log.Error("reload refused: keeping the running configuration", zap.Error(err))
		return cur, false
	}
	if next.Log.Format != cur.Log.Format {
		log.Warn("reload: log.format changes at the next start; keeping the current format")
		next.Log.Format = cur.Log.Format
	}
	switch err := dev.Reload(next); {
	case errors.Is(err, agent.ErrRestartNeeded):
		level.SetLevel(lvl)
		return next, true
	case err != nil:
		log.Error("reload refused: keeping the running configuration", zap.Error(err))
		return cur, false
	}
	level.SetLevel(lvl)
	return next, false
}

// notifySignals registers SIGHUP for serve.
func notifySignals() (<-chan os.Signal, func()) {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGHUP)
	return c, func() { signal.Stop(c) }
}
