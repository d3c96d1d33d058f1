package firmware

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/internal/atomicfile"
)

// MsgUpdateFailed is the log message of a failed update (field "target"), which tests wait for.
const MsgUpdateFailed = "firmware update failed"

// State is a stage of an update, as reported.
type State string

// The stages. Current and Failed are final; the others are resumed after a restart.
const (
	Downloading State = "downloading"
	Verifying   State = "verifying"
	Applying    State = "applying"
	Rebooting   State = "rebooting"
	Current     State = "current"
	Failed      State = "failed"
)

func (s State) final() bool { return s == Current || s == Failed }

// Status is what the updater reports (the agent's reported `firmware` property).
type Status struct {
	State State `json:"state"`
	// Version is the running firmware version.
	Version string `json:"version"`
	// TargetVersion is the version being installed, or the one that failed.
	TargetVersion string `json:"targetVersion,omitempty"`
	Percent       int    `json:"percent,omitempty"`
	Error         string `json:"error,omitempty"`
	// Updated is when this status was reached.
	Updated time.Time `json:"lastUpdated"`
}

// Reporter publishes a status; an error means it was not delivered (it is re-sent later).
type Reporter interface {
	Report(ctx context.Context, s Status) error
}

// Applier installs a verified image into the inactive slot.
type Applier interface {
	Apply(ctx context.Context, image string, m Manifest, slot string) error
}

// Rebooter restarts the device (for real, in which case it may never return, or simulated).
type Rebooter interface {
	Reboot(ctx context.Context) error
}

// Errors from Start.
var (
	// ErrBusy means another update is in progress.
	ErrBusy = errors.New("firmware: another update is in progress")
	// ErrDowngrade means the manifest's version is older than the running one.
	ErrDowngrade = errors.New("firmware: downgrade refused")
	// ErrNotPersisted means state.json could not be written (Start refuses the update then).
	ErrNotPersisted = errors.New("firmware: state not saved")
)

// Config configures an Updater.
type Config struct {
	// Dir holds the persisted state (state.json) and the slots (slot-a, slot-b).
	Dir string
	// InitialVersion is the running version when Dir holds no state yet.
	InitialVersion string
	// PublicKey, when set, must have signed every manifest (Ed25519).
	PublicKey ed25519.PublicKey
	// AllowDowngrade accepts versions older than the running one.
	AllowDowngrade bool
	// AllowHTTP accepts plain http:// image URLs (tests only).
	AllowHTTP bool
	// HTTPClient downloads images (default: a client with TLS 1.2+ and a 30 s header timeout).
	HTTPClient *http.Client
	// DownloadTimeout bounds one download attempt (default 30 min); Attempts bounds the
	// attempts (default 5), RetryDelay separates them (default 2 s).
	DownloadTimeout time.Duration
	Attempts        int
	RetryDelay      time.Duration
	// RunningVersion, when set, reads the version actually running after a reboot; a mismatch
	// with the target means the device rolled back, and the update fails.
	RunningVersion func() (string, error)
	Applier        Applier
	Rebooter       Rebooter
	Reporter       Reporter
	Logger         *zap.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
	// WriteFile writes state.json (default: atomically with internal/atomicfile). A seam for
	// tests.
	WriteFile func(path string, data []byte) error
}

// persisted is state.json.
type persisted struct {
	Version    string    `json:"version"`
	ActiveSlot string    `json:"activeSlot"`
	Target     *Manifest `json:"target,omitempty"`
	State      State     `json:"state"`
	Percent    int       `json:"percent,omitempty"`
	Error      string    `json:"error,omitempty"`
	Updated    time.Time `json:"updated"`
	// Unreported is set until the current status has been delivered.
	Unreported bool `json:"unreported,omitempty"`
}

// Updater runs firmware updates one at a time. Run owns its only goroutine.
//
// The state is changed under mu and written outside it (persist), so Status and Start never
// wait for the disk behind another path's write.
type Updater struct {
	cfg  Config
	log  *zap.Logger
	kick chan struct{}

	mu  sync.Mutex
	st  persisted
	seq uint64 // counts changes to st that must reach the disk

	// wmu orders the writes of state.json; taken before mu, never under it.
	wmu       sync.Mutex
	savedSeq  uint64
	failedSeq uint64
	failErr   error
}

const stateFile = "state.json"

// New loads the persisted state (or starts at InitialVersion in slot a).
func New(cfg Config) (*Updater, error) {
	if cfg.Dir == "" || cfg.Applier == nil || cfg.Rebooter == nil || cfg.Reporter == nil {
		return nil, errors.New("firmware: Dir, Applier, Rebooter and Reporter are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.WriteFile == nil {
		cfg.WriteFile = func(path string, data []byte) error { return atomicfile.WriteFile(path, data, 0o600) }
	}
	if cfg.DownloadTimeout <= 0 {
		cfg.DownloadTimeout = 30 * time.Minute
	}
	if cfg.Attempts <= 0 {
		cfg.Attempts = 5
	}
	if cfg.RetryDelay <= 0 {
		cfg.RetryDelay = 2 * time.Second
	}
	if cfg.HTTPClient == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.ResponseHeaderTimeout = 30 * time.Second
		tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		cfg.HTTPClient = &http.Client{Transport: tr}
	}
	for _, d := range []string{cfg.Dir, slotDir(cfg.Dir, "a"), slotDir(cfg.Dir, "b")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("firmware: %w", err)
		}
	}
	u := &Updater{cfg: cfg, log: cfg.Logger, kick: make(chan struct{}, 1)}
	b, err := os.ReadFile(filepath.Join(cfg.Dir, stateFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
		if cfg.InitialVersion == "" {
			return nil, errors.New("firmware: InitialVersion is required on first start")
		}
		u.st = persisted{Version: cfg.InitialVersion, ActiveSlot: "a", State: Current, Updated: cfg.Now()}
	case err != nil:
		return nil, fmt.Errorf("firmware: %w", err)
	default:
		if err := json.Unmarshal(b, &u.st); err != nil {
			p := filepath.Join(cfg.Dir, stateFile)
			if cfg.InitialVersion == "" {
				return nil, fmt.Errorf("firmware: %s is corrupt: %w", p, err)
			}
			// Exiting would restart the agent forever under its unit: set the file aside and
			// start as on a first start; the hub's twin says what to install.
			aside := p + ".damaged-" + cfg.Now().UTC().Format("20060102T150405.000000000Z")
			if rerr := os.Rename(p, aside); rerr != nil {
				return nil, fmt.Errorf("firmware: %s is corrupt (%v) and cannot be set aside: %w", p, err, rerr)
			}
			u.log.Warn("firmware state file damaged: set aside, starting from the initial version",
				zap.String("path", p), zap.String("set_aside_as", aside), zap.Error(err))
			u.st = persisted{Version: cfg.InitialVersion, ActiveSlot: "a", State: Current, Updated: cfg.Now()}
		}
	}
	return u, nil
}

func slotDir(dir, slot string) string { return filepath.Join(dir, "slot-"+slot) }

func other(slot string) string {
	if slot == "a" {
		return "b"
	}
	return "a"
}

// Status returns the current status.
func (u *Updater) Status() Status {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.statusLocked()
}

func (u *Updater) statusLocked() Status {
	s := Status{State: u.st.State, Version: u.st.Version, Percent: u.st.Percent, Error: u.st.Error, Updated: u.st.Updated}
	if u.st.Target != nil {
		s.TargetVersion = u.st.Target.Version
	}
	return s
}

// Start accepts a manifest: it is verified (signature, downgrade) and persisted, and Run
// carries it out. The same manifest again is a no-op (a desired property re-read on every
// connect, a method retried), as is the version already running.
func (u *Updater) Start(m Manifest) error {
	if err := m.Validate(u.cfg.AllowHTTP); err != nil {
		return err
	}
	if err := m.VerifySignature(u.cfg.PublicKey); err != nil {
		return err
	}
	u.mu.Lock()
	if !u.st.State.final() {
		defer u.mu.Unlock()
		if u.st.Target != nil && u.st.Target.Same(m) {
			return nil
		}
		return ErrBusy
	}
	if m.Version == u.st.Version {
		u.mu.Unlock()
		return nil
	}
	if !u.cfg.AllowDowngrade && CompareVersions(m.Version, u.st.Version) < 0 {
		defer u.mu.Unlock()
		return fmt.Errorf("%w: %s is older than the running %s", ErrDowngrade, m.Version, u.st.Version)
	}
	if u.st.State == Failed && u.st.Target != nil && u.st.Target.Same(m) {
		u.mu.Unlock()
		return nil // the same failed update is not retried on its own; send a new manifest
	}
	prev := u.st
	u.st.Target = &m
	seq := u.setLocked(Downloading, 0, "")
	u.mu.Unlock()
	// The update is accepted only once it is on disk: if the write fails it is refused, and the
	// state goes back to what it was (unless something changed it meanwhile, which only Run's
	// own reporting could, and Run has not been kicked yet).
	if err := u.persist(seq); err != nil {
		u.mu.Lock()
		if u.seq == seq {
			u.st = prev
		}
		u.mu.Unlock()
		return err
	}
	select {
	case u.kick <- struct{}{}:
	default:
	}
	return nil
}

// setLocked moves to a state in memory and returns the change's number; persist(seq) writes it,
// after u.mu is released, before anything else happens.
func (u *Updater) setLocked(s State, percent int, errText string) uint64 {
	u.st.State, u.st.Percent, u.st.Error, u.st.Updated = s, percent, errText, u.cfg.Now()
	u.st.Unreported = true
	u.seq++
	return u.seq
}

// set moves to a state and persists it.
func (u *Updater) set(s State, percent int, errText string) error {
	u.mu.Lock()
	seq := u.setLocked(s, percent, errText)
	u.mu.Unlock()
	return u.persist(seq)
}

// persist makes sure the state as of change seq is in state.json. The snapshot is taken under
// u.mu and written outside it, under u.wmu, which orders the writes: each writes the newest
// snapshot, and a change an earlier write already covered returns at once, so a later state is
// never overwritten by an earlier one. A failed write is returned (callers log it with their
// context); the next change writes the whole state again.
func (u *Updater) persist(seq uint64) error {
	u.wmu.Lock()
	defer u.wmu.Unlock()
	switch {
	case u.savedSeq >= seq:
		return nil
	case u.failedSeq >= seq:
		return u.failErr
	}
	u.mu.Lock()
	at := u.seq
	b, err := json.MarshalIndent(u.st, "", "  ")
	u.mu.Unlock()
	path := filepath.Join(u.cfg.Dir, stateFile)
	if err == nil {
		err = u.cfg.WriteFile(path, b)
	}
	if err != nil {
		u.failedSeq, u.failErr = at, fmt.Errorf("%w: %s: %w", ErrNotPersisted, path, err)
		return u.failErr
	}
	u.savedSeq = at
	return nil
}

// ReportPending sends the current status if it has not been delivered (call it on every
// connect).
func (u *Updater) ReportPending(ctx context.Context) {
	u.mu.Lock()
	pending, s := u.st.Unreported, u.statusLocked()
	u.mu.Unlock()
	if pending {
		u.report(ctx, s)
	}
}

// report delivers s and, once delivered, records that it was (so a restart does not send it
// again). Failing to record that is logged: its only cost is the status sent again after a
// restart.
func (u *Updater) report(ctx context.Context, s Status) {
	if err := u.cfg.Reporter.Report(ctx, s); err != nil {
		u.log.Info("firmware status not reported; will re-send", zap.String("state", string(s.State)), zap.Error(err))
		return
	}
	u.mu.Lock()
	if !(u.st.State == s.State && u.st.Percent == s.Percent && u.st.Updated.Equal(s.Updated) && u.st.Unreported) {
		u.mu.Unlock()
		return
	}
	u.st.Unreported = false
	u.seq++
	seq := u.seq
	u.mu.Unlock()
	if err := u.persist(seq); err != nil {
		u.log.Error("firmware state not saved: the delivered status will be sent again after a restart",
			zap.String("state", string(s.State)), zap.Error(err))
	}
}

// Run resumes an update that a restart interrupted, then carries out each update Start
// accepts, until ctx ends. An update interrupted by ctx is resumed by the next Run.
func (u *Updater) Run(ctx context.Context) error {
	for {
		if err := u.Step(ctx); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-u.kick:
		}
	}
}

// Step resumes or carries out the update under way, if any, and sends a status not yet
// delivered, then returns; it returns ctx's error at once when ctx has ended. Run is Step in a
// loop woken by Start; a caller that keeps no goroutine while the updater is idle calls Step
// itself, from the start and after each successful Start.
func (u *Updater) Step(ctx context.Context) error {
	// select picks at random between a pending kick and a cancelled ctx: check first, or a
	// stopped updater could go on to confirm an interrupted reboot.
	if err := ctx.Err(); err != nil {
		return err
	}
	u.mu.Lock()
	state, target := u.st.State, u.st.Target
	u.mu.Unlock()
	if !state.final() && target != nil {
		u.process(ctx, *target, state)
	}
	u.ReportPending(ctx)
	return nil
}

// process runs an update from the given stage. Stages are persisted before they start, so a
// restart re-enters the interrupted one: a download resumes, an interrupted apply verifies the
// image again first, and a reboot is confirmed.
func (u *Updater) process(ctx context.Context, m Manifest, from State) {
	u.mu.Lock()
	slot := other(u.st.ActiveSlot)
	u.mu.Unlock()
	image := filepath.Join(slotDir(u.cfg.Dir, slot), "image.bin")
	log := u.log.With(zap.String("target", m.Version), zap.String("slot", slot))
	fail := func(err error) {
		log.Warn(MsgUpdateFailed, zap.Error(err))
		if ctx.Err() != nil {
			return // interrupted, not failed: resumed by the next Run
		}
		_ = os.Remove(image)
		if err := u.set(Failed, 0, err.Error()); err != nil {
			log.Error("firmware state not saved", zap.Error(err))
		}
		u.report(ctx, u.Status())
	}
	step := func(s State, percent int) bool {
		if err := u.set(s, percent, ""); err != nil {
			fail(err)
			return false
		}
		u.report(ctx, u.Status())
		return true
	}

	switch from {
	case Downloading:
		log.Info("firmware download starting", zap.String("url", m.URL), zap.Int64("size", m.Size))
		u.report(ctx, u.Status())
		if err := u.download(ctx, m, image); err != nil {
			fail(err)
			return
		}
		fallthrough
	case Verifying, Applying:
		// An interrupted apply goes through verification again: nothing unverified is applied.
		if !step(Verifying, 100) {
			return
		}
		if err := VerifyFile(image, m); err != nil {
			fail(err)
			return
		}
		if !step(Applying, 0) {
			return
		}
		if err := u.cfg.Applier.Apply(ctx, image, m, slot); err != nil {
			fail(fmt.Errorf("apply: %w", err))
			return
		}
		if !step(Rebooting, 0) {
			return
		}
		if err := u.cfg.Rebooter.Reboot(ctx); err != nil {
			fail(fmt.Errorf("reboot: %w", err))
			return
		}
		fallthrough
	case Rebooting:
		u.confirm(ctx, m, slot, log)
	}
}

// confirm runs after the reboot: the new slot becomes active unless the running version says
// the device came back on the old one.
func (u *Updater) confirm(ctx context.Context, m Manifest, slot string, log *zap.Logger) {
	// The downloaded image has been installed (or rolled back): it goes, or the update after
	// next, which downloads into this slot again, would resume from it or take it as complete.
	defer func() { _ = os.Remove(filepath.Join(slotDir(u.cfg.Dir, slot), "image.bin")) }()
	if u.cfg.RunningVersion != nil {
		v, err := u.cfg.RunningVersion()
		if err != nil || v != m.Version {
			if err == nil {
				err = fmt.Errorf("device is running %s after the reboot", v)
			}
			log.Warn("firmware update rolled back", zap.Error(err))
			if err := u.set(Failed, 0, "rolled back: "+err.Error()); err != nil {
				log.Error("firmware state not saved", zap.Error(err))
			}
			u.report(ctx, u.Status())
			return
		}
	}
	u.mu.Lock()
	u.st.ActiveSlot, u.st.Version = slot, m.Version
	seq := u.setLocked(Current, 0, "")
	s := u.statusLocked()
	u.mu.Unlock()
	if err := u.persist(seq); err != nil {
		log.Error("firmware state not saved", zap.Error(err))
	}
	log.Info("firmware update complete", zap.String("version", m.Version))
	u.report(ctx, s)
}

func (u *Updater) download(ctx context.Context, m Manifest, image string) error {
	lastPct := -1
	progress := func(done int64) {
		pct := int(done * 100 / m.Size)
		if pct/10 == lastPct/10 || pct == 100 {
			return
		}
		lastPct = pct
		u.mu.Lock()
		u.st.Percent = pct
		s := u.statusLocked()
		u.mu.Unlock()
		u.report(ctx, s) // best effort; the persisted stage is what matters
	}
	var err error
	for attempt := 1; attempt <= u.cfg.Attempts; attempt++ {
		actx, cancel := context.WithTimeout(ctx, u.cfg.DownloadTimeout)
		err = Download(actx, u.cfg.HTTPClient, m, image, progress)
		cancel()
		var he *HTTPError
		if err == nil || errors.Is(err, ErrTooLarge) || ctx.Err() != nil || errors.As(err, &he) && !he.Retryable() {
			return err
		}
		u.log.Info("firmware download interrupted; resuming", zap.Int("attempt", attempt), zap.Error(err))
		t := time.NewTimer(u.cfg.RetryDelay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
	return err
}
