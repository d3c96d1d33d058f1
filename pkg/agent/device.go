// Package agent wires one device from configuration: its credential, its IoT Hub session
// (pkg/hub), periodic telemetry rendered from a template, and logging of cloud-to-device
// messages, desired patches and connection status. A Device keeps no package-level state and
// takes its logger from the caller, so many devices can run in one process.
//
// A Device is made of components: the TPM (tpm.go, opened by New, closed by Close), the
// scripted and built-in direct methods (methods.go), reboot (reboot.go), firmware updates
// (firmware.go) and the twin sync (twin.go, pkg/twinsync). Those with work of their own have a
// Run(ctx) that Device.Run starts and stops; goroutines are kept few, since a fleet runs
// thousands of devices in one process (TestGoroutinesPerDevice counts them). The device's own
// loop (telemetry ticks, the session's end, reprovisioning, simulated reboots) is event-driven
// (loop.go): Device.Start holds no goroutine while the session is up; Run is Start and a wait.
//
// Health: Device.Liveness reports whether the device's loops make progress (the supervisor's
// delivery of status changes and inbound messages, the twin sync, the telemetry loop): each
// piece of work is entered and left, and Liveness.Check(max) fails naming any loop busy with one
// piece for longer than max. An idle loop is healthy. /healthz and the systemd watchdog use it
// (ping only while Check passes). Device.Ready says whether the device is connected and its
// twin synced (/readyz).
package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"text/template"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/methods"
	"github.com/iothubby/iothubby/pkg/spool"
	"github.com/iothubby/iothubby/pkg/tpm"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// TemplateData is what a telemetry template sees.
type TemplateData struct {
	DeviceID string
	ModuleID string
	// Seq counts messages from 1 in this run.
	Seq uint64
	// Time is the send time, RFC 3339 with milliseconds, UTC.
	Time string
	// Unix is the send time in seconds since the epoch.
	Unix int64
	// Index is the device's index in a fleet (0 for a single agent).
	Index int
	// Profile is the device's fleet profile name (empty for a single agent).
	Profile string
}

// templateFuncs are the functions telemetry templates may call.
var templateFuncs = template.FuncMap{
	// randFloat returns a uniform float in [min, max).
	"randFloat": func(min, max float64) float64 { return min + mrand.Float64()*(max-min) },
	// randInt returns a uniform integer in [min, max].
	"randInt": func(min, max int) int {
		if max <= min {
			return min
		}
		return min + mrand.IntN(max-min+1)
	},
}

// ParseTemplate parses a telemetry body template.
func ParseTemplate(text string) (*template.Template, error) {
	t, err := template.New("telemetry").Funcs(templateFuncs).Option("missingkey=error").Parse(text)
	if err != nil {
		return nil, fmt.Errorf("%w: telemetry.template: %w", ErrConfig, err)
	}
	return t, nil
}

// Device is one configured device. Create it with New, then call Run.
type Device struct {
	cfg   Config
	id    identity
	log   *zap.Logger
	runID string

	// tele is the telemetry the loop sends (Reload swaps it; teleChanged then wakes the loop).
	tele        atomic.Pointer[telemetrySettings]
	teleChanged chan struct{}
	// statusHook is OnStatus's function (nil: none); set before Run.
	statusHook func(hub.Status)

	seq       atomic.Uint64
	delivered atomic.Uint64
	failed    atomic.Uint64

	sync atomic.Pointer[twinsync.Sync]

	// closing is set by Close, which then cancels Run's context through runCancel (a Run
	// starting after that cancels its own). started is set by the first Run or Close; done is
	// closed when that Run returns (by Close when no Run came first).
	closing   atomic.Bool
	runCancel atomic.Pointer[context.CancelFunc]
	started   atomic.Bool
	done      chan struct{}

	rootCAs *x509.CertPool // the validated trust roots (for DPS)

	live *Liveness // the loops' progress (liveness.go)
	// testBeforeTelemetry, set by tests, runs at the start of each telemetry send (a wedge).
	testBeforeTelemetry func()
	// waker is the running session's loop (loop.go), woken by wakeLoop; nil between sessions.
	waker atomic.Pointer[waiter]
	// wedge is the loop WedgeForTest armed (nil: none); runCtx is Run's context (testhook.go).
	wedge     atomic.Pointer[string]
	runCtx    atomic.Pointer[context.Context]
	connected atomic.Bool // the session's last status was Connected
	synced    atomic.Bool // the full twin GET after the latest connect succeeded

	// behaviourMu guards what a reload changes in place (reload.go): the scripted direct
	// methods and the twin behaviours, and the running session's dispatcher and twin sync that
	// use them. Held only to swap them, never across I/O.
	behaviourMu sync.Mutex
	scripts     map[string]methods.Handler // the scripted direct methods
	scriptCfg   map[string]methods.Script  // their configuration
	twinB       *TwinConfig                // the twin behaviours (Properties, Default), replaced on change
	disp        *methods.Dispatcher        // the running session's, or nil
	twinSync    *twinsync.Sync             // the running session's, or nil

	reboot *rebooter
	fw     *firmwareUpdates // nil when firmware updates are off

	// tpm holds the identity key when dps.attestation is tpm; closed by Close.
	tpm     *tpm.Device
	tpmOnce sync.Once

	// spool is the disk queue (queue.persist), open while Run runs; spoolRef is the same for
	// QueueStats, which may be called from any goroutine.
	spool    *spool.Spool
	spoolRef atomic.Pointer[spool.Spool]
}

// New checks cfg, loads the credential and prepares the device; it does no network I/O, but
// with dps.attestation tpm it opens the TPM (reading or creating its keys) so that a missing or
// broken TPM is a configuration error at start.
// log is scoped here with the device id.
func New(cfg Config, log *zap.Logger) (*Device, error) {
	if log == nil {
		log = zap.NewNop()
	}
	id, err := cfg.resolve()
	if err != nil {
		return nil, err
	}
	var tpmDev *tpm.Device
	ok := false
	if id.tpm {
		if tpmDev, err = openTPM(&cfg, &id, log); err != nil {
			return nil, err
		}
		// Every later failure in New releases the TPM.
		defer func() {
			if !ok {
				_ = tpmDev.Close()
			}
		}()
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
		return nil, err
	}
	tmpl := cfg.Shared.Template
	if tmpl == nil {
		if tmpl, err = ParseTemplate(cfg.Telemetry.Template); err != nil {
			return nil, err
		}
	}
	var rb [4]byte
	_, _ = rand.Read(rb[:])
	fields := []zap.Field{zap.String("device", id.deviceID)}
	if id.moduleID != "" {
		fields = append(fields, zap.String("module", id.moduleID))
	}
	d := &Device{
		cfg:         cfg,
		id:          id,
		log:         log.With(fields...),
		runID:       hex.EncodeToString(rb[:]),
		done:        make(chan struct{}),
		tpm:         tpmDev,
		teleChanged: make(chan struct{}, 1),
	}
	d.tele.Store(&telemetrySettings{cfg: cfg.Telemetry, tmpl: tmpl})
	d.twinB, d.scriptCfg = &d.cfg.Twin, cfg.Methods
	if d.live = cfg.Shared.Liveness; d.live == nil {
		d.live = NewLiveness(nil)
	}
	if d.scripts, err = cfg.checkMethods(d.dpsEnabled()); err != nil {
		return nil, err
	}
	if err := d.cfg.Reboot.check(); err != nil {
		return nil, err
	}
	if err := d.cfg.Queue.check(d.cfg.StateDir); err != nil {
		return nil, err
	}
	if d.cfg.Reboot.Mode != "" || d.cfg.Firmware.Mode != "" {
		d.newRebooter()
	} // else made by startRun only if a reboot state file is there (a fleet's devices: none)
	if err := d.cfg.checkFirmware(); err != nil {
		return nil, err
	}
	u, err := d.newUpdater()
	if err != nil {
		return nil, err
	}
	if u != nil {
		d.fw = &firmwareUpdates{u: u}
	}
	// Validate the session configuration now, so config errors surface before Run. With DPS the
	// hub is not known yet: a placeholder host stands in.
	vc := d.cfg.hubConfig(d.id)
	if d.dpsEnabled() {
		vc.Host = "provisioning.pending"
	}
	valid, err := hub.Validate(vc)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	d.rootCAs = valid.RootCAs
	// Render once so template errors are configuration errors.
	if _, err := d.render(0, time.Now()); err != nil {
		return nil, fmt.Errorf("%w: telemetry.template: %w", ErrConfig, err)
	}
	ok = true
	return d, nil
}

// DeviceID returns the device id.
func (d *Device) DeviceID() string { return d.id.deviceID }

// Run connects the device and runs it until ctx is done or Close is called; it then drains
// queued telemetry within ShutdownTimeout and disconnects. It returns nil on such a shutdown and
// an error if the session stops by itself (e.g. matching hub.ErrNotAuthorized). A Device runs
// once: a second Run, or a Run after Close, returns an error at once.
func (d *Device) Run(ctx context.Context) error {
	exited := make(chan error, 1)
	d.Start(ctx, func(err error) { exited <- err })
	return <-exited
}

// startRun does what Run does before its first session (Run's context, which Close also ends,
// the reboot state, the disk queue, the components) and returns what undoes it once the
// sessions are over, to be called also when it fails.
func (d *Device) startRun(parent context.Context) (ctx context.Context, release func(), err error) {
	ctx, cancel := context.WithCancel(parent)
	d.runCtx.Store(&ctx)
	d.runCancel.Store(&cancel)
	if d.closing.Load() { // Close came first and found no cancel to call
		cancel()
	}
	release = cancel
	if d.reboot == nil && d.cfg.StateDir != "" {
		// Reboot and firmware are off: the state of an earlier configuration's reboot is still
		// settled and reported.
		if _, err := os.Stat(rebootStatePath(d.cfg.StateDir, d.id.deviceID)); err == nil {
			d.newRebooter()
		}
	}
	if d.reboot != nil {
		if err := d.reboot.load(); err != nil {
			return ctx, release, err
		}
	}
	var sp *spool.Spool
	if d.cfg.Queue.Persist {
		if sp, err = d.openSpool(); err != nil {
			return ctx, release, err
		}
		d.spool = sp
		d.spoolRef.Store(sp)
	}
	// Components with work of their own run until Run returns (after the session's drain),
	// stopped and waited for by release, before the spool closes.
	stopComps := func() {}
	if d.fw != nil {
		stopComps = startComponents(d.fw)
	}
	return ctx, func() {
		stopComps()
		if sp != nil {
			if err := sp.Close(); err != nil {
				d.log.Warn("queue spool: close", zap.Error(err))
			}
		}
		cancel()
	}, nil
}

// hubConfig returns the hub session's configuration (without DPS).
func (d *Device) hubConfig() *hub.Config {
	hc := d.cfg.hubConfig(d.id)
	return &hc
}

// component is a part of a device with work of its own, run while the device runs. Run(ctx)
// works until ctx ends, on the caller's goroutine; Start(ctx) does the same work in the
// background holding a goroutine only while there is work, and Wait waits for it once ctx
// ended. The device uses Start and Wait, since a fleet runs thousands of devices in one
// process; the twin sync (twinsync.Sync, one per session) has the same shape.
type component interface {
	Run(ctx context.Context) error
	Start(ctx context.Context)
	Wait()
}

// startComponents starts the components and returns the function that stops them and waits for
// them.
func startComponents(comps ...component) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	for _, c := range comps {
		c.Start(ctx)
	}
	return func() {
		cancel()
		for _, c := range comps {
			c.Wait()
		}
	}
}

// sessionRun is one running session and what its end releases.
type sessionRun struct {
	sess        *hub.Session
	ts          *twinsync.Sync
	disp        *methods.Dispatcher
	reprovision chan struct{}
	simReboot   chan struct{}
	stopSync    context.CancelFunc
	deviceID    string
}

// startSession creates the twin sync, the method dispatcher and the hub session (from a copy of
// hc), and starts the sync.
func (d *Device) startSession(hcIn *hub.Config) (*sessionRun, error) {
	hc := *hcIn
	reprovision := make(chan struct{}, 1)
	requestReprovision := func() {
		select {
		case reprovision <- struct{}{}:
		default:
		}
		d.wakeLoop()
	}
	var sessRef atomic.Pointer[hub.Session]
	ts, err := d.newSync(d.observedSession(lazySession{&sessRef}))
	if err != nil {
		return nil, fmt.Errorf("device %s: %w", d.id.deviceID, err)
	}
	d.sync.Store(ts)
	var simReboot chan struct{} // nil (never ready) without a rebooter
	if d.reboot != nil {
		d.reboot.reportTo(ts)
		simReboot = d.reboot.simReboot
	}
	if d.fw != nil {
		d.report(map[string]any{"firmwareVersion": d.fw.u.Status().Version})
		d.fw.u.ReportPending(context.Background())
	}
	hc.Logger = d.log
	if d.spool != nil {
		hc.Spool = d.spool
		hc.QueueMaxBytes = d.cfg.Queue.MaxBytes
		if hc.QueueMaxBytes == 0 {
			hc.QueueMaxBytes = DefaultQueueMaxBytes
		}
	}
	obs := d.observer()
	hc.OnStatus = func(st hub.Status) {
		defer d.live.Enter(LoopSupervisor)()
		d.wedgeIfArmed(LoopSupervisor)
		d.noteStatus(st)
		obs.ConnectionStatus(d.id.deviceID, st)
		if n := d.cfg.DPS.ReprovisionAfterFailures; d.dpsEnabled() && n > 0 && st.Attempt >= n {
			requestReprovision()
		}
		if st.State == hub.Connected {
			ts.Connected()
		}
		if d.statusHook != nil {
			d.statusHook(st)
		}
	}
	mo := newMethodObserver(d.id.deviceID, obs)
	disp := d.newDispatcher(mo.respond(sessionResponder(&sessRef)), mo.refuse(sessionRefuser(&sessRef)), requestReprovision, d.askSimulatedReboot)
	d.deliverTo(&hc, ts, disp, mo)
	d.watchDelivery(&hc)
	sess, err := hub.New(hc)
	if err != nil {
		disp.Close()
		d.sessionEnded(ts)
		d.sync.CompareAndSwap(ts, nil)
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	sessRef.Store(sess)
	d.log.Info("starting", zap.String("host", hc.Host), zap.String("address", sess.Config().Address),
		zap.String("auth", d.id.cred.Kind().String()), zap.Duration("telemetry_interval", d.tele.Load().cfg.Interval))

	// The sync holds a goroutine only while it has work or a timer to wait for.
	syncCtx, stopSync := context.WithCancel(context.Background())
	ts.Start(syncCtx)
	return &sessionRun{sess: sess, ts: ts, disp: disp, reprovision: reprovision, simReboot: simReboot, stopSync: stopSync, deviceID: hc.DeviceID}, nil
}

// telemetryTick sends one telemetry message and reports whether telemetry.count is reached.
func (d *Device) telemetryTick(sess *hub.Session, now time.Time) (done bool) {
	d.sendTelemetry(sess, now)
	if n := d.tele.Load().cfg.Count; n > 0 && d.seq.Load() >= n {
		d.log.Info("telemetry count reached", zap.Uint64("count", n))
		return true
	}
	return false
}

// endSession drains and closes the session within ShutdownTimeout, stops the sync and the
// dispatcher, and returns runErr with the device named.
func (d *Device) endSession(r *sessionRun, runErr error) error {
	defer d.sync.CompareAndSwap(r.ts, nil) // reports after this session go to the next one
	defer d.sessionEnded(r.ts)
	d.log.Info("shutting down", zap.Duration("drain_timeout", d.cfg.ShutdownTimeout))
	r.disp.Close()
	r.stopSync()
	r.ts.Wait()
	cctx, cancel := context.WithTimeout(context.Background(), d.cfg.ShutdownTimeout)
	defer cancel()
	if err := r.sess.Close(cctx); err != nil {
		d.log.Warn("shutdown left telemetry undelivered", zap.Error(err))
	}
	st := r.sess.Stats()
	d.log.Info(MsgStopped, zap.Uint64("delivered", st.Sent), zap.Uint64("failed", st.Failed),
		zap.Uint64("refused", st.Rejected), zap.Uint64("dropped", st.Dropped), zap.Int("queued", st.Queued),
		zap.Uint64("connects", st.Connects))
	if runErr != nil {
		return fmt.Errorf("device %s: %w", r.deviceID, runErr)
	}
	return nil
}

// QueueStats returns the counters of the device's disk queue (queue.persist): records appended
// and acknowledged, fsyncs, damaged segments, what it holds. false when the device has no disk
// queue, or Run has not opened it yet. After Run returned they are the final counts.
func (d *Device) QueueStats() (spool.Stats, bool) {
	sp := d.spoolRef.Load()
	if sp == nil {
		return spool.Stats{}, false
	}
	return sp.Stats(), true
}

// openSpool opens the disk queue in StateDir/queue-<deviceId>[-<moduleId>].
func (d *Device) openSpool() (*spool.Spool, error) {
	name := "queue-" + d.id.deviceID
	if d.id.moduleID != "" {
		name += "-" + d.id.moduleID
	}
	policy, _ := spool.ParseFsync(d.cfg.Queue.Fsync) // checked in New
	dir := filepath.Join(d.cfg.StateDir, strings.ReplaceAll(name, "/", "_"))
	sp, err := spool.Open(dir, spool.Options{
		Fsync:     policy,
		Interval:  d.cfg.Queue.FsyncInterval,
		MaxRecord: hub.MaxMessageSize + 64*1024, // a message's body, and its properties in the topic
		Logger:    d.log,
	})
	if err != nil {
		return nil, fmt.Errorf("device %s: %w", d.id.deviceID, err)
	}
	st := sp.Stats()
	d.log.Info("queue spool opened", zap.String("dir", dir), zap.String("fsync", policy.String()),
		zap.Int("messages", st.Records), zap.Int64("bytes", st.Bytes), zap.Uint64("corrupt_segments", st.Corrupt))
	return sp, nil
}

// deliverTo sets the session's delivery callbacks: cloud-to-device messages are logged, desired
// patches go to the twin sync and method calls to the dispatcher. The session calls them one at
// a time from its delivery goroutine; none of them waits for I/O (Desired and Dispatch only
// queue), so a method answer stuck on a lost connection never delays the patches after it.
func (d *Device) deliverTo(hc *hub.Config, ts *twinsync.Sync, disp *methods.Dispatcher, mo *methodObserver) {
	obs := d.observer()
	hc.OnC2D = d.onC2D
	hc.OnDesired = func(_ context.Context, p *hub.DesiredPatch) {
		d.log.Debug("desired properties patch", zap.Int64("version", p.Version), zap.Int("size", len(p.Body)))
		obs.DesiredReceived(d.id.deviceID, p.Version)
		ts.Desired(p)
	}
	hc.OnMethod = func(_ context.Context, r *hub.MethodRequest) {
		mo.called(r.RequestID, r.Name)
		disp.Dispatch(r.Name, r.RequestID, r.Payload)
	}
}

// Close makes Run return (after its drain), waits for it, and releases the TPM if the device
// has one: call it once the device is no longer needed, even after Run returned, or when Run
// never ran (Run then refuses to start). Calling it again waits again.
func (d *Device) Close() {
	d.closing.Store(true)
	if c := d.runCancel.Load(); c != nil {
		(*c)()
	}
	if d.started.CompareAndSwap(false, true) {
		close(d.done) // no Run came first, and none will
	}
	<-d.done
	d.closeTPM()
}

// lazySession lets the twin sync exist before the session it talks through.
type lazySession struct{ p *atomic.Pointer[hub.Session] }

func (l lazySession) TwinGet(ctx context.Context) (hub.Response, error) {
	if s := l.p.Load(); s != nil {
		return s.TwinGet(ctx)
	}
	return hub.Response{}, hub.ErrClosed
}

func (l lazySession) TwinPatchReported(ctx context.Context, patch []byte) (hub.Response, error) {
	if s := l.p.Load(); s != nil {
		return s.TwinPatchReported(ctx, patch)
	}
	return hub.Response{}, hub.ErrClosed
}

func (d *Device) render(seq uint64, now time.Time) ([]byte, error) {
	return d.tele.Load().render(d, seq, now)
}

func (t *telemetrySettings) render(d *Device, seq uint64, now time.Time) ([]byte, error) {
	var buf bytes.Buffer
	err := t.tmpl.Execute(&buf, TemplateData{
		DeviceID: d.id.deviceID,
		ModuleID: d.id.moduleID,
		Seq:      seq,
		Time:     now.UTC().Format("2006-01-02T15:04:05.000Z07:00"),
		Unix:     now.Unix(),
		Index:    d.cfg.Shared.Index,
		Profile:  d.cfg.Shared.Profile,
	})
	return buf.Bytes(), err
}

// sendTelemetry renders and enqueues one message; its outcome is logged when it completes.
func (d *Device) sendTelemetry(sess *hub.Session, now time.Time) {
	defer d.live.Enter(LoopTelemetry)()
	d.wedgeIfArmed(LoopTelemetry)
	if d.testBeforeTelemetry != nil {
		d.testBeforeTelemetry()
	}
	seq := d.seq.Add(1)
	tele := d.tele.Load()
	body, err := tele.render(d, seq, now)
	if err != nil {
		d.log.Error("telemetry template failed", zap.Uint64("seq", seq), zap.Error(err))
		return
	}
	mid := fmt.Sprintf("%s-%s-%d", d.id.deviceID, d.runID, seq)
	obs := d.observer()
	obs.TelemetrySent(d.id.deviceID)
	msg := &hub.Message{
		Body:            body,
		MessageID:       mid,
		ContentType:     tele.cfg.ContentType,
		ContentEncoding: tele.cfg.ContentEncoding,
		CreationTime:    now,
		Properties:      tele.cfg.Properties,
	}
	err = sess.Enqueue(msg, func(err error) {
		if err != nil && d.spool != nil && errors.Is(err, hub.ErrClosed) {
			d.log.Debug("telemetry kept on disk for the next start", zap.String("message_id", mid))
			return
		}
		obs.TelemetryDone(d.id.deviceID, time.Since(now), err)
		if err != nil {
			d.failed.Add(1)
			d.log.Warn("telemetry message failed", zap.String("message_id", mid), zap.Error(err))
			return
		}
		d.delivered.Add(1)
		d.log.Debug("telemetry delivered", zap.String("message_id", mid))
	})
	if err != nil {
		obs.TelemetryDone(d.id.deviceID, 0, err)
		d.failed.Add(1)
		d.log.Warn("telemetry message refused", zap.String("message_id", mid), zap.Error(err))
	}
}

func (d *Device) onC2D(_ context.Context, m *hub.C2DMessage) {
	d.observer().C2DReceived(d.id.deviceID)
	fields := []zap.Field{
		zap.String("message_id", m.MessageID),
		zap.Int("size", len(m.Body)),
	}
	if m.CorrelationID != "" {
		fields = append(fields, zap.String("correlation_id", m.CorrelationID))
	}
	if m.ContentType != "" {
		fields = append(fields, zap.String("content_type", m.ContentType))
	}
	if len(m.Properties) > 0 {
		props := make(map[string]string, len(m.Properties))
		for _, p := range m.Properties {
			props[p.Key] = p.Value
		}
		fields = append(fields, zap.Any("properties", props))
	}
	if utf8.Valid(m.Body) {
		body := m.Body
		if len(body) > 256 {
			body = body[:256]
		}
		fields = append(fields, zap.ByteString("body", body))
	}
	d.log.Info(MsgC2D, fields...)
}
