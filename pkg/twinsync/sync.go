// Package twinsync is the agent's device twin synchronisation: on every connect it GETs the twin,
// applies desired changes newer than the last applied version to handlers, acknowledges them the
// Plug and Play way, and keeps the intended reported state (persisted in a state directory) in
// step with the hub. The document rules it applies are pkg/twin's; the I/O goes through a
// Session (pkg/hub's in production).
package twinsync

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/internal/atomicfile"
	"github.com/iothubby/iothubby/pkg/backoff"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/twin"
)

// Session is what the sync needs from a hub.Session.
type Session interface {
	TwinGet(ctx context.Context) (hub.Response, error)
	TwinPatchReported(ctx context.Context, patch []byte) (hub.Response, error)
}

// Change is one desired property handed to its Handler.
type Change struct {
	// Path is the handler's path, dotted for nested properties ("a.b").
	Path string
	// Value is the desired value (decoded JSON; numbers are json.Number); nil when deleted.
	Value any
	// Deleted is true when the property was removed from the desired section.
	Deleted bool
	// Version is the desired $version the change belongs to (the ack's av).
	Version int64

	s *Sync
}

// Later schedules a final acknowledgement after d (for "accept after a delay"): when it is due
// and the property's desired version is still Version, ack is recorded. Call it from the
// Handler and return a 202 Ack.
func (c Change) Later(d time.Duration, ack Ack) {
	c.s.deferred = append(c.s.deferred, deferredAck{due: c.s.clock.Now().Add(d), path: c.Path, version: c.Version, value: c.Value, ack: ack})
}

// Ack is a Plug and Play writable-property acknowledgement: reported as
// {"value":..,"ac":Status,"av":<desired $version>,"ad":Description}.
type Ack struct {
	// Status is ac: 200 applied, 202 in progress, 400 rejected, 500 failed. 0 sends no ack.
	Status int
	// Description is ad (optional).
	Description string
	// Value is the value in use; nil echoes the desired value.
	Value any
}

// Handler applies a desired property and returns its acknowledgement. It runs on the sync's
// goroutine, one change at a time; it should return promptly (use Change.Later for slow work).
// For a deleted property (Change.Deleted) the property's ack is removed from reported whatever
// the handler returns.
type Handler func(ctx context.Context, c Change) Ack

// Config configures a Sync.
type Config struct {
	// DeviceID names the device (state file and logs).
	DeviceID string
	// StateDir, when set, holds twin-<deviceId>.json: the last applied desired version and
	// document and the intended reported state, written atomically on every change (see
	// Sync.Report for what happens when it cannot be written).
	StateDir string
	// WriteFile writes the state file (default: create the directory, then write atomically
	// with internal/atomicfile). A seam for tests.
	WriteFile func(path string, data []byte) error
	// Handlers by desired property path ("interval", "network.mode").
	Handlers map[string]Handler
	// Default handles desired top-level properties that no handler covers; nil records them
	// without an acknowledgement.
	Default Handler
	// Facts are reported on every connect (agent version, firmware, boot time, static properties).
	Facts map[string]any
	// Backoff spaces the retries after a 429, a 5xx or a lost connection (default Min 1 s,
	// Max 30 s).
	Backoff backoff.Policy
	// Clock is what every timer and reading of the time in the sync uses (default clock.Real()).
	Clock clock.Clock
	// Rand returns the backoff's jitter, uniform in [0, 1) (default math/rand/v2.Float64).
	Rand func() float64
	// Logger receives the sync's logs; nil discards them.
	Logger *zap.Logger
}

type deferredAck struct {
	due     time.Time
	path    string
	version int64
	value   any
	ack     Ack
}

// persisted is the state file's content.
type persisted struct {
	DesiredVersion int64          `json:"desiredVersion"`
	Desired        map[string]any `json:"desired"`
	Reported       map[string]any `json:"reported"`
}

// Sync keeps a device's twin in step with its hub: on every connect it GETs the twin, applies
// desired changes newer than the last applied version to the handlers, acknowledges them the
// Plug and Play way, and sends the reported properties that differ from the agent's intended
// state until the hub confirms them. Create it with New, feed it Connected and Desired from
// the session's callbacks (they never block), and run Run on a goroutine you own.
type Sync struct {
	cfg   Config
	log   *zap.Logger
	ses   Session
	clock clock.Clock

	// mu guards the inbox below, intended/dirty (Report may be called anywhere), and the writes
	// of desired/applied. It is never held across I/O: Connected, Desired and Intended, which
	// the session's delivery paths call, only ever wait for memory operations.
	mu        sync.Mutex
	connected bool
	patches   []*hub.DesiredPatch
	overflow  bool
	intended  map[string]any
	dirty     map[string]uint64 // top-level reported keys to send, with the generation of their last change
	gen       uint64
	stateSeq  uint64 // counts changes to the persisted state (intended, desired, applied)
	wake      chan struct{}
	// the working goroutine (Start): it runs while there is work or a timer to wait for
	runCtx  context.Context
	started bool
	stopped bool // Wait was called: no goroutine starts any more
	running bool
	wg      sync.WaitGroup
	// idleHook, set by tests before Start, hears each time the working goroutine goes idle.
	idleHook chan struct{}

	// wmu orders the state file's writes; taken before mu, never under it.
	wmu       sync.Mutex
	savedSeq  uint64 // the state as of stateSeq savedSeq is on disk
	failedSeq uint64 // the last write that failed covered changes up to failedSeq
	failErr   error

	// owned by Run
	online    bool // a connect has been seen: twin requests can be answered
	applied   int64
	desired   map[string]any
	needGet   bool
	haveTwin  bool
	deferred  []deferredAck
	retryAt   time.Time
	retryN    int
	confirmed int64
}

const maxQueuedPatches = 256

// New loads the persisted state (if any) and returns a Sync ready to Run.
func New(ses Session, cfg Config) (*Sync, error) {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.Backoff.Min <= 0 {
		cfg.Backoff.Min = time.Second
	}
	if cfg.Backoff.Max < cfg.Backoff.Min {
		cfg.Backoff.Max = max(30*time.Second, cfg.Backoff.Min)
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.Real()
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	if cfg.WriteFile == nil {
		cfg.WriteFile = writeAtomic
	}
	s := &Sync{
		cfg: cfg, log: cfg.Logger, ses: ses, clock: cfg.Clock,
		intended: map[string]any{}, dirty: map[string]uint64{}, desired: map[string]any{},
		wake: make(chan struct{}, 1), needGet: true,
	}
	if p := s.statePath(); p != "" {
		b, err := os.ReadFile(p)
		switch {
		case errors.Is(err, os.ErrNotExist):
		case err != nil:
			return nil, fmt.Errorf("twin: state: %w", err)
		default:
			var st persisted
			if err := json.Unmarshal(b, &st); err != nil {
				// Exiting here would restart the agent forever under its unit: set the file
				// aside and start from the hub's twin (needGet is set).
				aside := p + ".damaged-" + s.clock.Now().UTC().Format("20060102T150405.000000000Z")
				if rerr := os.Rename(p, aside); rerr != nil {
					return nil, fmt.Errorf("twin: state file %s is damaged (%v) and cannot be set aside: %w", p, err, rerr)
				}
				s.log.Warn("twin state file damaged: set aside, starting from the hub's twin",
					zap.String("path", p), zap.String("set_aside_as", aside), zap.Error(err))
				return s, nil
			}
			s.applied = st.DesiredVersion
			s.desired = renumber(st.Desired)
			s.intended = renumber(st.Reported)
			s.log.Info("twin state loaded", zap.Int64("desired_version", s.applied), zap.Int("reported_keys", len(s.intended)))
		}
	}
	return s, nil
}

func renumber(m map[string]any) map[string]any {
	if m == nil {
		return map[string]any{}
	}
	b, _ := json.Marshal(m)
	out, err := twin.Decode(b)
	if err != nil {
		return map[string]any{}
	}
	return out
}

func (s *Sync) statePath() string {
	if s.cfg.StateDir == "" {
		return ""
	}
	return filepath.Join(s.cfg.StateDir, "twin-"+strings.ReplaceAll(s.cfg.DeviceID, "/", "_")+".json")
}

// ErrNotPersisted means a change was taken (it is applied, and sent to the hub) but the state
// file could not be written, so it would not survive a restart.
var ErrNotPersisted = errors.New("twinsync: state not saved")

// persist makes sure the state as of change seq is on disk. The snapshot is taken under mu and
// written outside it, under wmu, which orders the writes: each writes the newest snapshot, and
// a caller whose change an earlier write already covered returns at once, so a later snapshot
// is never overwritten by an earlier one. A failed write is logged and returned; the next
// change writes the whole state again.
func (s *Sync) persist(seq uint64) error {
	p := s.statePath()
	if p == "" {
		return nil
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	switch {
	case s.savedSeq >= seq:
		return nil
	case s.failedSeq >= seq:
		return s.failErr
	}
	s.mu.Lock()
	at := s.stateSeq
	b, err := json.Marshal(persisted{DesiredVersion: s.applied, Desired: s.desired, Reported: s.intended})
	s.mu.Unlock()
	if err == nil {
		err = s.cfg.WriteFile(p, b)
	}
	if err != nil {
		s.failedSeq, s.failErr = at, fmt.Errorf("%w: %s: %w", ErrNotPersisted, p, err)
		s.log.Error("twin state not saved; the sync goes on from memory", zap.String("path", p),
			zap.Uint64("change", at), zap.Error(err))
		return s.failErr
	}
	s.savedSeq = at
	return nil
}

func writeAtomic(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return atomicfile.WriteFile(path, b, 0o600)
}

func (s *Sync) poke() {
	s.mu.Lock()
	s.pokeLocked()
	s.mu.Unlock()
}

// pokeLocked wakes the working goroutine, or starts one when the sync is started and none is
// running. Call with s.mu held.
func (s *Sync) pokeLocked() {
	if s.running {
		select {
		case s.wake <- struct{}{}:
		default:
		}
		return
	}
	if !s.started || s.stopped || s.runCtx.Err() != nil {
		return
	}
	s.running = true
	s.wg.Add(1)
	go s.work(s.runCtx)
}

// Connected tells the sync that the session (re)connected; it never blocks.
func (s *Sync) Connected() {
	s.mu.Lock()
	s.connected = true
	s.mu.Unlock()
	s.poke()
}

// Desired queues a desired-properties notification; it never blocks. When too many are queued
// the sync does a full GET instead.
func (s *Sync) Desired(p *hub.DesiredPatch) {
	s.mu.Lock()
	if len(s.patches) >= maxQueuedPatches {
		s.patches, s.overflow = nil, true
	} else {
		s.patches = append(s.patches, p)
	}
	s.mu.Unlock()
	s.poke()
}

// Report merges patch into the intended reported state (last writer wins; null deletes),
// persists it, and has the top-level members that changed sent. Members equal to the intended
// state are not sent again (a reconnect's GET re-sends whatever the hub lacks). The patch must
// pass the document rules.
//
// Report returns once the change is on disk, so a caller may forget what it reported. The
// write happens outside the lock that Connected, Desired and Intended take. When the state
// directory cannot be written, the sync keeps going from memory (the patch is taken and sent;
// desired properties are still applied and acknowledged): Report returns an error matching
// ErrNotPersisted, the failure is logged with the path, and the next change tries to write the
// whole state again. Only what a restart would remember is lost.
func (s *Sync) Report(patch map[string]any) error { return s.report(patch, true) }

// report is Report; with persist false a change is taken and sent but not written on its own
// (the next change that is written carries it): for the facts reported at every connect,
// which come from the configuration and are reported again after a restart, so a fleet's
// devices do not each write their state file at their first connect for them.
func (s *Sync) report(patch map[string]any, persist bool) error {
	// normalise Go values (ints, structs) to decoded JSON, so comparisons with the hub's view hold
	b, err := json.Marshal(patch)
	if err != nil {
		return &twin.Error{Rule: twin.RuleJSON, Detail: err.Error()}
	}
	if patch, err = twin.Decode(b); err != nil {
		return err
	}
	if err := twin.CheckPatch(patch); err != nil {
		return err
	}
	s.mu.Lock()
	next := twin.Merge(twin.Clone(s.intended).(map[string]any), patch)
	if err := twin.CheckSize(twin.Reported, next); err != nil {
		s.mu.Unlock()
		return err
	}
	changed := false
	for k := range patch {
		ov, had := s.intended[k]
		nv, has := next[k]
		if had != has || !twin.Equal(ov, nv) {
			s.gen++
			s.dirty[k] = s.gen
			changed = true
		}
	}
	s.intended = next
	var seq uint64
	if changed && persist {
		s.stateSeq++
		seq = s.stateSeq
	}
	s.mu.Unlock()
	if !changed {
		return nil
	}
	s.poke()
	if !persist {
		return nil
	}
	return s.persist(seq)
}

// Intended returns a copy of the intended reported state.
func (s *Sync) Intended() map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	return twin.Clone(s.intended).(map[string]any)
}

// Run runs the sync until ctx is done: Start, then Wait once ctx ends.
func (s *Sync) Run(ctx context.Context) {
	s.Start(ctx)
	<-ctx.Done()
	s.Wait()
}

// Start runs the sync in the background until ctx ends, without holding a goroutine while it
// is idle: a goroutine works while there is something to do or a timer (a retry, a deferred
// acknowledgement) to wait for, and exits when there is neither; Connected, Desired and Report
// start one again. Call Start once; after ctx ends, Wait waits for the goroutine to return.
func (s *Sync) Start(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		return
	}
	s.started, s.runCtx = true, ctx
	s.pokeLocked()
}

// Wait stops the sync from starting work again and waits for the working goroutine, which
// returns once the context given to Start ends.
func (s *Sync) Wait() {
	s.mu.Lock()
	s.stopped = true
	s.mu.Unlock()
	s.wg.Wait()
}

// work steps the sync until it is idle (nothing queued, no timer to wait for) or ctx ends.
// One runs at a time: the fields "owned by Run" pass from one to the next through s.mu.
func (s *Sync) work(ctx context.Context) {
	defer s.wg.Done()
	var timer clock.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		s.step(ctx)
		if ctx.Err() != nil {
			s.idle()
			return
		}
		wait, armed := s.nextDue()
		if !armed {
			s.mu.Lock()
			select {
			case <-s.wake: // poked meanwhile: step again
				s.mu.Unlock()
				continue
			default:
			}
			s.running = false
			s.mu.Unlock()
			if s.idleHook != nil {
				s.idleHook <- struct{}{}
			}
			return
		}
		if timer == nil {
			timer = s.clock.NewTimer(wait)
		} else {
			timer.Reset(wait)
		}
		select {
		case <-ctx.Done():
			s.idle()
			return
		case <-s.wake:
		case <-timer.C():
		}
	}
}

func (s *Sync) idle() {
	s.mu.Lock()
	s.running = false
	s.mu.Unlock()
}

// nextDue returns how long until the next retry or deferred acknowledgement, and false when
// none is pending.
func (s *Sync) nextDue() (time.Duration, bool) {
	now := s.clock.Now()
	wait, armed := time.Duration(0), false
	due := func(at time.Time) {
		d := max(0, at.Sub(now))
		if !armed || d < wait {
			wait, armed = d, true
		}
	}
	if !s.retryAt.IsZero() {
		due(s.retryAt)
	}
	for _, d := range s.deferred {
		due(d.due)
	}
	return wait, armed
}

// backoff logs msg (MsgGetRetrying or MsgReportedRetrying) and arms the retry after a backoff.
func (s *Sync) backoff(msg string, err error) {
	d := s.cfg.Backoff.Delay(s.retryN, s.cfg.Rand())
	s.retryN++
	s.retryAt = s.clock.Now().Add(d)
	s.log.Warn(msg, zap.Error(err), zap.Duration("retry_in", d), zap.Int("attempt", s.retryN))
}

func (s *Sync) step(ctx context.Context) {
	if !s.retryAt.IsZero() && s.clock.Now().Before(s.retryAt) {
		s.runDeferred(ctx)
		return
	}
	s.retryAt = time.Time{}
	s.mu.Lock()
	if s.connected {
		s.connected = false
		s.needGet = true
		s.online = true
		if facts := s.cfg.Facts; len(facts) > 0 { // SetFacts may replace them
			s.mu.Unlock()
			if err := s.report(facts, false); err != nil {
				s.log.Error("agent facts not reported", zap.Error(err))
			}
			s.mu.Lock()
		}
	}
	if s.overflow {
		s.overflow, s.needGet = false, true
	}
	s.mu.Unlock()
	if !s.online {
		return // nothing to ask before the first connect; Report and Desired just queue
	}
	if s.needGet {
		if !s.fullGet(ctx) {
			return
		}
	}
	s.applyPatches(ctx)
	s.runDeferred(ctx)
	s.flushReported(ctx)
}

// fullGet fetches the twin, applies what is newer, and marks the reported keys that differ
// from the intended state.
func (s *Sync) fullGet(ctx context.Context) bool {
	resp, err := s.ses.TwinGet(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.backoff(MsgGetRetrying, err)
		}
		return false
	}
	var doc struct {
		Desired  json.RawMessage `json:"desired"`
		Reported json.RawMessage `json:"reported"`
	}
	if err := json.Unmarshal(resp.Body, &doc); err != nil {
		s.backoff(MsgGetRetrying, fmt.Errorf("twin body: %w", err))
		return false
	}
	desired, err1 := twin.Decode(doc.Desired)
	reported, err2 := twin.Decode(doc.Reported)
	if err := errors.Join(err1, err2); err != nil {
		s.backoff(MsgGetRetrying, fmt.Errorf("twin body: %w", err))
		return false
	}
	s.retryN = 0
	version := versionOf(desired)
	rv := versionOf(reported)
	twin.StripReserved(desired)
	twin.StripReserved(reported)
	s.needGet = false
	s.haveTwin = true
	s.mu.Lock()
	// drop queued patches the GET already covers
	s.patches = slices.DeleteFunc(s.patches, func(p *hub.DesiredPatch) bool { return p.Version <= version })
	// reported keys that differ from the intended state are sent again
	for k, v := range s.intended {
		if hv, ok := reported[k]; !ok || !twin.Equal(hv, v) {
			if _, d := s.dirty[k]; !d {
				s.gen++
				s.dirty[k] = s.gen
			}
		}
	}
	s.mu.Unlock()
	s.log.Info(MsgTwinSynced, zap.Int64("desired_version", version), zap.Int64("reported_version", rv),
		zap.Int64("applied_version", s.applied))
	switch {
	case version > s.applied:
		s.apply(ctx, desired, version, true)
	case version < s.applied:
		// The hub's twin is older than what was applied: the device was re-created, or the hub
		// lost state. The GET is the truth; apply it, or later patches would all look stale.
		s.log.Warn("desired version went back; applying the hub's twin", zap.Int64("hub_version", version), zap.Int64("applied_version", s.applied))
		s.apply(ctx, desired, version, true)
	}
	return true
}

func versionOf(m map[string]any) int64 {
	if n, ok := m["$version"].(json.Number); ok {
		v, _ := n.Int64()
		return v
	}
	return 0
}

func (s *Sync) applyPatches(ctx context.Context) {
	for {
		s.mu.Lock()
		if len(s.patches) == 0 || s.needGet {
			s.mu.Unlock()
			return
		}
		p := s.patches[0]
		s.patches = s.patches[1:]
		s.mu.Unlock()
		switch {
		case p.Version <= s.applied:
			s.log.Debug("stale desired patch dropped", zap.Int64("version", p.Version), zap.Int64("applied", s.applied))
		case p.Version != s.applied+1:
			s.log.Info("desired patch versions not contiguous; getting the full twin", zap.Int64("version", p.Version), zap.Int64("applied", s.applied))
			s.needGet = true
			if s.fullGet(ctx) {
				continue
			}
			return
		default:
			patch, err := twin.Decode(p.Body)
			if err != nil {
				s.log.Warn("desired patch unreadable; getting the full twin", zap.Int64("version", p.Version), zap.Error(err))
				s.needGet = true
				if s.fullGet(ctx) {
					continue
				}
				return
			}
			twin.StripReserved(patch)
			next := twin.Merge(twin.Clone(s.desired).(map[string]any), patch)
			s.apply(ctx, next, p.Version, false)
		}
	}
}

// apply runs the handlers for every path whose value differs between the last applied desired
// document and next, records next as applied at version, and queues the acks.
func (s *Sync) apply(ctx context.Context, next map[string]any, version int64, full bool) {
	prev := s.desired
	s.mu.Lock()
	handlers, def := s.cfg.Handlers, s.cfg.Default // SetHandlers may swap them
	s.mu.Unlock()
	acks := map[string]any{}
	covered := map[string]bool{}
	paths := make([]string, 0, len(handlers))
	for p := range handlers {
		paths = append(paths, p)
		covered[strings.SplitN(p, ".", 2)[0]] = true
	}
	sort.Strings(paths)
	for _, p := range paths {
		old, oldOK := lookup(prev, p)
		val, ok := lookup(next, p)
		if oldOK == ok && twin.Equal(old, val) {
			continue
		}
		c := Change{Path: p, Value: val, Deleted: !ok, Version: version, s: s}
		ack := handlers[p](ctx, c)
		s.log.Info(MsgDesiredPropertyApplied, zap.String("path", p), zap.Int64("version", version), zap.Int("ac", ack.Status))
		setAck(acks, p, c, ack)
	}
	var keys []string
	for k := range next {
		keys = append(keys, k)
	}
	for k := range prev {
		if _, ok := next[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		if covered[k] {
			continue
		}
		old, oldOK := prev[k]
		val, ok := next[k]
		if oldOK == ok && twin.Equal(old, val) {
			continue
		}
		c := Change{Path: k, Value: val, Deleted: !ok, Version: version, s: s}
		if def == nil {
			s.log.Info(MsgDesiredPropertyRecorded, zap.String("path", k), zap.Int64("version", version))
			continue
		}
		ack := def(ctx, c)
		s.log.Info(MsgDesiredPropertyApplied, zap.String("path", k), zap.Int64("version", version), zap.Int("ac", ack.Status))
		setAck(acks, k, c, ack)
	}
	// A GET that only moved the version on (the document is what was applied; e.g. a new
	// device's first connect) changes nothing a restart needs: its next GET finds the same
	// document again. Every other change is written.
	write := version <= s.applied || !twin.Equal(prev, next)
	s.mu.Lock()
	s.desired = next
	s.applied = version
	var seq uint64
	if write {
		s.stateSeq++
		seq = s.stateSeq
	}
	s.mu.Unlock()
	if len(acks) > 0 {
		if err := s.Report(acks); err != nil && !errors.Is(err, ErrNotPersisted) {
			s.log.Error("acknowledgement not reported", zap.Error(err))
		}
	}
	// Usually a no-op: Report wrote this change too. A failure is logged by persist; the
	// handlers ran and the acks go out, so the sync carries on from memory.
	if write {
		_ = s.persist(seq)
	}
	s.log.Info(MsgDesiredVersionApplied, zap.Int64("version", version), zap.Bool("full", full))
}

// SetHandlers replaces Config.Handlers and Config.Default (an agent reload): the desired
// changes applied after it go to the new handlers; what was applied and acknowledged before
// stays as it is (a changed behaviour takes effect with the next change of the property).
// Safe to call while the sync runs; a change being applied finishes with the old handlers.
func (s *Sync) SetHandlers(handlers map[string]Handler, def Handler) {
	s.mu.Lock()
	s.cfg.Handlers, s.cfg.Default = handlers, def
	s.mu.Unlock()
}

// SetFacts replaces Config.Facts (an agent reload) and reports what changed at once: new or
// changed facts with their value, facts no longer given as null (deleted from reported).
// Safe to call while the sync runs; the error is Report's.
func (s *Sync) SetFacts(facts map[string]any) error {
	s.mu.Lock()
	old := s.cfg.Facts
	s.cfg.Facts = facts
	s.mu.Unlock()
	patch := map[string]any{}
	for k, v := range facts {
		patch[k] = v
	}
	for k := range old {
		if _, ok := facts[k]; !ok {
			patch[k] = nil
		}
	}
	if len(patch) == 0 {
		return nil
	}
	return s.Report(patch)
}

// lookup finds a dotted path in a document.
func lookup(doc map[string]any, path string) (any, bool) {
	cur := any(doc)
	for _, k := range strings.Split(path, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[k]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// setAck puts a Plug and Play ack at path in a reported patch.
func setAck(patch map[string]any, path string, c Change, a Ack) {
	if a.Status == 0 {
		return
	}
	v := a.Value
	if v == nil {
		v = c.Value
	}
	ack := map[string]any{"value": v, "ac": a.Status, "av": c.Version}
	if a.Description != "" {
		ack["ad"] = a.Description
	}
	if c.Deleted {
		ack = nil // the property went away: its ack goes too
	}
	parts := strings.Split(path, ".")
	m := patch
	for _, k := range parts[:len(parts)-1] {
		n, ok := m[k].(map[string]any)
		if !ok {
			n = map[string]any{}
			m[k] = n
		}
		m = n
	}
	if ack == nil {
		m[parts[len(parts)-1]] = nil
		return
	}
	m[parts[len(parts)-1]] = ack
}

func (s *Sync) runDeferred(ctx context.Context) {
	now := s.clock.Now()
	acks := map[string]any{}
	keep := s.deferred[:0]
	for _, d := range s.deferred {
		if now.Before(d.due) {
			keep = append(keep, d)
			continue
		}
		// still the desired value of that version? (a newer desired version supersedes it)
		if s.applied == d.version || s.desiredUnchangedSince(d) {
			setAck(acks, d.path, Change{Path: d.path, Value: d.value, Version: d.version}, d.ack)
			s.log.Info(MsgDesiredPropertyApplied, zap.String("path", d.path), zap.Int64("version", d.version), zap.Int("ac", d.ack.Status))
		}
	}
	s.deferred = keep
	if len(acks) > 0 {
		if err := s.Report(acks); err != nil && !errors.Is(err, ErrNotPersisted) {
			s.log.Error("acknowledgement not reported", zap.Error(err))
		}
	}
	_ = ctx
}

func (s *Sync) desiredUnchangedSince(d deferredAck) bool {
	v, ok := lookup(s.desired, d.path)
	return ok && twin.Equal(v, d.value)
}

// flushReported sends the dirty reported keys in one PATCH and clears those the hub confirmed.
func (s *Sync) flushReported(ctx context.Context) {
	if !s.haveTwin || s.needGet {
		return
	}
	s.mu.Lock()
	if len(s.dirty) == 0 {
		s.mu.Unlock()
		return
	}
	patch := map[string]any{}
	sent := map[string]uint64{}
	for k, g := range s.dirty {
		v, ok := s.intended[k]
		if !ok {
			v = nil
		}
		patch[k] = twin.Clone(v)
		sent[k] = g
	}
	s.mu.Unlock()
	body, err := json.Marshal(patch)
	if err != nil {
		s.log.Error("reported patch not encodable", zap.Error(err))
		return
	}
	resp, err := s.ses.TwinPatchReported(ctx, body)
	var se *hub.StatusError
	switch {
	case err == nil:
		s.retryN = 0
		s.confirmed = resp.Version
		s.mu.Lock()
		for k, g := range sent {
			if s.dirty[k] == g {
				delete(s.dirty, k)
			}
		}
		left := len(s.dirty)
		s.mu.Unlock()
		s.log.Info(MsgReportedConfirmed, zap.Int64("reported_version", resp.Version), zap.Int("keys", len(sent)))
		if left > 0 {
			s.poke()
		}
	case ctx.Err() != nil:
	case errors.As(err, &se) && se.Status >= 400 && se.Status < 500 && se.Status != 429:
		// the hub will never take this patch: surface it and do not retry
		s.mu.Lock()
		for k, g := range sent {
			if s.dirty[k] == g {
				delete(s.dirty, k)
			}
		}
		s.mu.Unlock()
		s.log.Error("reported properties rejected by the hub", zap.Int("status", se.Status), zap.Int("code", se.Code),
			zap.String("message", se.Message), zap.Strings("keys", sortedKeys(sent)))
	default:
		s.backoff(MsgReportedRetrying, err)
	}
}

func sortedKeys(m map[string]uint64) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
