package agent

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/firmware"
	"github.com/iothubby/iothubby/pkg/methods"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// FirmwareConfig enables firmware updates (pkg/firmware), started by the firmwareUpdate
// method or the desired `firmware` property, with progress in the reported `firmware` property.
type FirmwareConfig struct {
	// Mode is "" (off), "exec" (ApplyCommand installs the image) or "simulate".
	Mode string `yaml:"mode"`
	// PublicKey (base64 of 32 bytes) or PublicKeyFile (PEM "PUBLIC KEY" or base64): when set,
	// every manifest must carry a valid Ed25519 signature.
	PublicKey     string `yaml:"publicKey"`
	PublicKeyFile string `yaml:"publicKeyFile"`
	// AllowDowngrade accepts versions older than the running one.
	AllowDowngrade bool `yaml:"allowDowngrade"`
	// AllowHTTP accepts http:// image URLs (tests only).
	AllowHTTP bool `yaml:"allowHTTP"`
	// CAFile is a PEM bundle trusted for image servers, in addition to the system roots.
	CAFile string `yaml:"caFile"`
	// DownloadTimeout bounds one download attempt (default 30m).
	DownloadTimeout time.Duration `yaml:"downloadTimeout"`
	// ApplyCommand (exec) gets IOTHUBBY_FIRMWARE_IMAGE, _VERSION and _SLOT.
	ApplyCommand []string `yaml:"applyCommand"`
	// ApplyDuration and FailureRate shape a simulated apply.
	ApplyDuration time.Duration `yaml:"applyDuration"`
	FailureRate   float64       `yaml:"failureRate"`
}

func (c *Config) checkFirmware() error {
	f := &c.Firmware
	switch f.Mode {
	case "":
		return nil
	case "exec":
		if len(f.ApplyCommand) == 0 {
			return fmt.Errorf("%w: firmware.mode exec needs firmware.applyCommand", ErrConfig)
		}
	case "simulate":
		if f.FailureRate < 0 || f.FailureRate > 1 || f.ApplyDuration < 0 {
			return fmt.Errorf("%w: firmware.failureRate must be 0..1 and applyDuration not negative", ErrConfig)
		}
	default:
		return fmt.Errorf("%w: firmware.mode %q (exec or simulate)", ErrConfig, f.Mode)
	}
	if c.StateDir == "" {
		return fmt.Errorf("%w: firmware updates need stateDir", ErrConfig)
	}
	for p := range c.Twin.Properties {
		if p == "firmware" || strings.HasPrefix(p, "firmware.") {
			return fmt.Errorf("%w: twin.properties.%s: the desired firmware property drives firmware updates", ErrConfig, p)
		}
	}
	if _, ok := c.Methods["firmwareUpdate"]; ok {
		return fmt.Errorf("%w: methods.firmwareUpdate: the name is the built-in firmware method", ErrConfig)
	}
	return nil
}

func (f *FirmwareConfig) publicKey() (ed25519.PublicKey, error) {
	text := f.PublicKey
	if f.PublicKeyFile != "" {
		b, err := os.ReadFile(f.PublicKeyFile)
		if err != nil {
			return nil, err
		}
		if blk, _ := pem.Decode(b); blk != nil {
			k, err := x509.ParsePKIXPublicKey(blk.Bytes)
			if err != nil {
				return nil, err
			}
			pub, ok := k.(ed25519.PublicKey)
			if !ok {
				return nil, errors.New("not an Ed25519 public key")
			}
			return pub, nil
		}
		text = string(b)
	}
	if text == "" {
		return nil, nil
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(text))
	if err != nil || len(raw) != ed25519.PublicKeySize {
		return nil, errors.New("public key must be base64 of 32 bytes")
	}
	return ed25519.PublicKey(raw), nil
}

// newUpdater builds the firmware updater (nil when firmware updates are off).
func (d *Device) newUpdater() (*firmware.Updater, error) {
	f := d.cfg.Firmware
	if f.Mode == "" {
		return nil, nil
	}
	pub, err := f.publicKey()
	if err != nil {
		return nil, fmt.Errorf("%w: firmware public key: %w", ErrConfig, err)
	}
	roots, err := x509.SystemCertPool()
	if err != nil {
		roots = x509.NewCertPool()
	}
	if f.CAFile != "" {
		b, err := os.ReadFile(f.CAFile)
		if err != nil || !roots.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("%w: firmware.caFile: no certificate read (%v)", ErrConfig, err)
		}
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.ResponseHeaderTimeout = 30 * time.Second
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}
	var applier firmware.Applier = firmware.CommandApplier{Command: f.ApplyCommand}
	if f.Mode == "simulate" {
		applier = firmware.SimulatedApplier{Duration: f.ApplyDuration, FailureRate: f.FailureRate}
	}
	initial := d.cfg.Twin.FirmwareVersion
	if initial == "" {
		initial = "0.0.0"
	}
	return firmware.New(firmware.Config{
		Dir:             filepath.Join(d.cfg.StateDir, "firmware-"+strings.ReplaceAll(d.id.deviceID, "/", "_")),
		InitialVersion:  initial,
		PublicKey:       pub,
		AllowDowngrade:  f.AllowDowngrade,
		AllowHTTP:       f.AllowHTTP,
		HTTPClient:      &http.Client{Transport: tr},
		DownloadTimeout: f.DownloadTimeout,
		Applier:         applier,
		Rebooter:        firmware.RebootFunc(d.reboot.forFirmware),
		Reporter:        fwReporter{d},
		Logger:          d.log.Named("firmware"),
	})
}

// firmwareUpdates is the firmware component: the updater, run while the device runs, on a
// goroutine that exists only while an update is under way.
type firmwareUpdates struct {
	u *firmware.Updater

	mu      sync.Mutex
	ctx     context.Context // from Start
	started bool
	stopped bool // Wait was called: no work starts any more
	running bool
	again   bool // kicked while running: step once more
	wg      sync.WaitGroup
}

// Run resumes an update a restart interrupted and carries out those the firmwareUpdate method
// and the desired firmware property start, until ctx ends.
func (f *firmwareUpdates) Run(ctx context.Context) error {
	f.Start(ctx)
	<-ctx.Done()
	f.Wait()
	return ctx.Err()
}

// Start does Run's work in the background until ctx ends, holding a goroutine only while there
// is work: it resumes an interrupted update now, and each kick (a manifest the updater
// accepted) starts the work again.
func (f *firmwareUpdates) Start(ctx context.Context) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.started {
		return
	}
	f.started, f.ctx = true, ctx
	f.kickLocked()
}

// Wait stops new work from starting and waits for the work under way, which returns once the
// context given to Start ends.
func (f *firmwareUpdates) Wait() {
	f.mu.Lock()
	f.stopped = true
	f.mu.Unlock()
	f.wg.Wait()
}

// kick has the updater step: call it after a manifest was accepted.
func (f *firmwareUpdates) kick() {
	f.mu.Lock()
	f.kickLocked()
	f.mu.Unlock()
}

func (f *firmwareUpdates) kickLocked() {
	if f.running {
		f.again = true
		return
	}
	if !f.started || f.stopped || f.ctx.Err() != nil {
		return
	}
	f.running = true
	f.wg.Add(1)
	go f.work(f.ctx)
}

func (f *firmwareUpdates) work(ctx context.Context) {
	defer f.wg.Done()
	for {
		err := f.u.Step(ctx)
		f.mu.Lock()
		if !f.again || err != nil {
			f.running, f.again = false, false
			f.mu.Unlock()
			return
		}
		f.again = false
		f.mu.Unlock()
	}
}

// fwReporter puts the updater's status in the reported `firmware` property (the twin sync
// persists it and re-sends it after a reconnect).
type fwReporter struct{ d *Device }

func (r fwReporter) Report(_ context.Context, s firmware.Status) error {
	ts := r.d.sync.Load()
	if ts == nil {
		return errors.New("no twin sync yet")
	}
	return ts.Report(map[string]any{"firmware": fwReported(s), "firmwareVersion": s.Version})
}

// fwReported is a status as a reported patch. Reported properties merge into the object already
// there, so every field is sent, empty ones as "" or 0: left out, a current status would keep
// the error and percent of an earlier one.
func fwReported(s firmware.Status) map[string]any {
	return map[string]any{"state": s.State, "version": s.Version, "targetVersion": s.TargetVersion,
		"percent": s.Percent, "error": s.Error, "lastUpdated": s.Updated}
}

// firmwareReboot is the updater's Rebooter: the reboot method's logic. Simulate: a simulated
// reboot, returning once the device is back. Exec: the reboot command, then wait to be stopped
// (the update is confirmed on the next start). Without a reboot mode, nothing to do.
func (d *rebooter) forFirmware(ctx context.Context) error {
	switch d.cfg.Mode {
	case "simulate":
		d.mu.Lock()
		booted := d.booted
		d.mu.Unlock()
		d.askSimulated()
		select {
		case <-booted:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	case "exec":
		now := time.Now().UTC()
		bt, _ := d.bootTime()
		d.mu.Lock()
		d.rb.Pending = &pendingReboot{RequestedAt: now, BootTime: bt}
		d.mu.Unlock()
		err := d.save()
		if err != nil {
			return err
		}
		d.execReboot(now)
		<-ctx.Done()
		return ctx.Err()
	}
	d.log.Info("firmware applied; no reboot mode configured, continuing")
	return nil
}

// firmwareMethod is the firmwareUpdate direct method: the payload is a manifest.
func (d *Device) firmwareMethod(f *firmwareUpdates) methods.Handler {
	u := f.u
	return methods.HandlerFunc(func(_ context.Context, r *methods.Request) methods.Response {
		m, err := firmware.ParseManifest(r.Payload, d.cfg.Firmware.AllowHTTP)
		if err == nil {
			err = u.Start(m)
		}
		if err == nil {
			f.kick()
		}
		switch {
		case err == nil:
			b, _ := json.Marshal(map[string]any{"message": "update accepted", "version": m.Version, "state": u.Status().State})
			return methods.Response{Status: 202, Payload: b}
		case errors.Is(err, firmware.ErrNotPersisted):
			// the device's fault, not the manifest's: the update can be sent again later
			d.log.Error("firmware update refused: state not saved", zap.Error(err))
			b, _ := json.Marshal(map[string]string{"message": err.Error()})
			return methods.Response{Status: 500, Payload: b}
		case errors.Is(err, firmware.ErrBusy), errors.Is(err, firmware.ErrDowngrade):
			d.reportRefused(u, m, err)
			b, _ := json.Marshal(map[string]string{"message": err.Error()})
			return methods.Response{Status: 409, Payload: b}
		default:
			d.reportRefused(u, m, err)
			b, _ := json.Marshal(map[string]string{"message": err.Error()})
			return methods.Response{Status: 400, Payload: b}
		}
	})
}

// firmwareDesired handles the desired `firmware` property: a manifest, the twin-driven path.
// It sends no Plug and Play ack: the reported `firmware` property carries progress instead.
func (d *Device) firmwareDesired(f *firmwareUpdates) twinsync.Handler {
	u := f.u
	return func(_ context.Context, c twinsync.Change) twinsync.Ack {
		if c.Deleted {
			return twinsync.Ack{}
		}
		b, _ := json.Marshal(c.Value)
		m, err := firmware.ParseManifest(b, d.cfg.Firmware.AllowHTTP)
		if err == nil {
			err = u.Start(m)
		}
		if err == nil {
			f.kick()
		}
		if err != nil {
			d.log.Warn("desired firmware refused", zap.Int64("version", c.Version), zap.Error(err))
			d.reportRefused(u, m, err)
		}
		return twinsync.Ack{}
	}
}

// reportRefused puts a manifest the updater refused (invalid, badly signed, a downgrade) in the
// reported firmware property as failed, with the running version kept; busy is not reported (the
// update under way keeps reporting its own progress).
func (d *Device) reportRefused(u *firmware.Updater, m firmware.Manifest, err error) {
	if errors.Is(err, firmware.ErrBusy) {
		return
	}
	st := u.Status()
	st.State, st.TargetVersion, st.Percent, st.Error, st.Updated = firmware.Failed, m.Version, 0, err.Error(), time.Now().UTC()
	d.report(map[string]any{"firmware": fwReported(st)})
}
