// Package registry is hubsim's device identity registry: devices, shared access policies and
// registered CA certificates, persisted in a bbolt file and served from an in-memory cache.
//
// Identity changes (create, update, delete, CA registration) are written to disk before they
// return. Runtime fields that change on every connection or message (connectionState,
// connectionStateUpdatedTime, lastActivityTime) live in memory and are written in batches by a
// flusher (connection state changes every Options.FlushInterval, lastActivityTime alone every 15
// intervals, everything at Close), so neither a connect nor a message waits for a disk write. cloudToDeviceMessageCount mirrors the in-memory cloud-to-device queue and is not
// persisted. After a restart every device reads Disconnected.
//
// Errors meant for API callers are wire.ServiceError values (DeviceNotFound, DeviceAlreadyExists,
// PreconditionFailed, ArgumentInvalid), so the REST layer can send them as they are.
package registry

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/wire"
)

var (
	bucketDevices  = []byte("devices")
	bucketPolicies = []byte("policies")
	bucketCAs      = []byte("cas")
	bucketMeta     = []byte("meta")
)

// Options tune a Registry. The zero value is usable.
type Options struct {
	// FlushInterval is how often runtime fields (connection state, last activity) are written.
	// Zero means 2 seconds.
	FlushInterval time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Change describes a committed device change. Old is nil for a create, New is nil for a delete.
type Change struct {
	DeviceID string
	Old, New *Device
}

// Registry is the device registry. Its methods are safe for concurrent use.
type Registry struct {
	db   *bolt.DB
	log  *zap.Logger
	opts Options

	wmu     sync.Mutex // serialises write transactions and the cache changes that follow them
	mu      sync.RWMutex
	devices map[string]*entry
	cas     map[string]CACertificate
	caPool  atomic.Pointer[x509.CertPool]
	lastGen int64

	policies map[string]*Policy // immutable after Open

	watchMu  sync.Mutex
	watchers []func(Change)

	dirtyMu sync.Mutex
	dirty   []*entry

	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

// entry is one device in the cache. The identity snapshot is replaced on update; runtime fields
// are updated in place.
type entry struct {
	snap atomic.Pointer[snapshot]

	rmu          sync.Mutex
	connState    ConnectionState
	connUpdated  time.Time
	c2dCount     int
	lastActivity atomic.Int64 // UnixNano, 0 = never
	dirty        atomic.Bool  // in Registry.dirty: something awaits a write
	stateDirty   atomic.Bool  // the connection state changed (written on the next tick)
	deleted      atomic.Bool
}

type snapshot struct {
	dev Device // identity fields; runtime fields are filled from the entry
	id  *Identity
}

// Open opens (creating if needed) the registry file at path. On first open it creates the
// default shared access policies with fresh keys.
func Open(path string, log *zap.Logger, opts Options) (*Registry, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if opts.FlushInterval <= 0 {
		opts.FlushInterval = 2 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("registry: %s is locked (is another hubsim using this state directory?)", path)
	}
	if err != nil {
		return nil, fmt.Errorf("registry: open %s: %w", path, err)
	}
	r := &Registry{
		db: db, log: log, opts: opts,
		devices:  map[string]*entry{},
		cas:      map[string]CACertificate{},
		policies: map[string]*Policy{},
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	if err := r.load(); err != nil {
		_ = db.Close()
		return nil, err
	}
	go r.flusher()
	return r, nil
}

func (r *Registry) load() error {
	now := r.opts.Now()
	return r.db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketDevices, bucketPolicies, bucketCAs, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return fmt.Errorf("registry: %w", err)
			}
		}
		pb := tx.Bucket(bucketPolicies)
		if pb.Stats().KeyN == 0 {
			for _, dp := range defaultPolicies {
				p := Policy{KeyName: dp.name, Rights: dp.rights, PrimaryKey: GenerateKey(), SecondaryKey: GenerateKey()}
				b, _ := json.Marshal(p)
				if err := pb.Put([]byte(p.KeyName), b); err != nil {
					return fmt.Errorf("registry: %w", err)
				}
			}
		}
		if err := pb.ForEach(func(k, v []byte) error {
			p := new(Policy)
			if err := json.Unmarshal(v, p); err != nil {
				return fmt.Errorf("registry: policy %q: %w", k, err)
			}
			if err := p.parseKeys(); err != nil {
				return fmt.Errorf("registry: %w", err)
			}
			r.policies[p.KeyName] = p
			return nil
		}); err != nil {
			return err
		}
		db := tx.Bucket(bucketDevices)
		var fix []Device
		if err := db.ForEach(func(k, v []byte) error {
			var d Device
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("registry: device %q: %w", k, err)
			}
			if d.ConnectionState == Connected {
				d.ConnectionState, d.ConnectionStateUpdatedTime = Disconnected, now
				fix = append(fix, d)
			}
			if d.ConnectionState == "" {
				d.ConnectionState = Disconnected
			}
			d.CloudToDeviceMessageCount = 0
			r.devices[d.DeviceID] = newEntry(d)
			if g, err := strconv.ParseInt(d.GenerationID, 10, 64); err == nil && g > r.lastGen {
				r.lastGen = g
			}
			return nil
		}); err != nil {
			return err
		}
		for _, d := range fix {
			b, _ := json.Marshal(d)
			if err := db.Put([]byte(d.DeviceID), b); err != nil {
				return fmt.Errorf("registry: %w", err)
			}
		}
		if err := tx.Bucket(bucketCAs).ForEach(func(k, v []byte) error {
			var c CACertificate
			if err := json.Unmarshal(v, &c); err != nil {
				return fmt.Errorf("registry: CA %q: %w", k, err)
			}
			if _, err := pki.ParseCert([]byte(c.Certificate)); err != nil {
				return fmt.Errorf("registry: CA %q: %w", k, err)
			}
			r.cas[c.Name] = c
			return nil
		}); err != nil {
			return err
		}
		r.rebuildCAPool()
		return nil
	})
}

func newEntry(d Device) *entry {
	e := &entry{connState: d.ConnectionState, connUpdated: d.ConnectionStateUpdatedTime}
	if e.connState == "" {
		e.connState = Disconnected
	}
	if !d.LastActivityTime.IsZero() {
		e.lastActivity.Store(d.LastActivityTime.UnixNano())
	}
	e.setSnapshot(d)
	return e
}

func (e *entry) setSnapshot(d Device) {
	d.ConnectionState, d.ConnectionStateUpdatedTime, d.LastActivityTime, d.CloudToDeviceMessageCount = "", time.Time{}, time.Time{}, 0
	e.snap.Store(&snapshot{dev: d, id: newIdentity(&d)})
}

// device composes the identity snapshot and the runtime fields.
func (e *entry) device() Device {
	d := e.snap.Load().dev
	e.rmu.Lock()
	d.ConnectionState, d.ConnectionStateUpdatedTime, d.CloudToDeviceMessageCount = e.connState, e.connUpdated, e.c2dCount
	e.rmu.Unlock()
	if n := e.lastActivity.Load(); n != 0 {
		d.LastActivityTime = time.Unix(0, n).UTC()
	}
	return d
}

// Close stops the flusher, writes pending runtime fields and closes the file.
func (r *Registry) Close() error {
	var err error
	r.closeOnce.Do(func() {
		close(r.stop)
		<-r.done
		err = r.db.Close()
	})
	return err
}

// Watch registers fn to be called after every committed device change, synchronously, outside
// the registry's locks. fn must not block for long.
func (r *Registry) Watch(fn func(Change)) {
	r.watchMu.Lock()
	r.watchers = append(r.watchers, fn)
	r.watchMu.Unlock()
}

func (r *Registry) notify(c Change) {
	r.watchMu.Lock()
	ws := slices.Clone(r.watchers)
	r.watchMu.Unlock()
	for _, w := range ws {
		w(c)
	}
}

// nextGeneration returns a generation ID in the shape IoT Hub uses (a decimal count of 100 ns
// ticks since year 1), strictly increasing. Call with wmu held.
func (r *Registry) nextGeneration() string {
	g := r.opts.Now().UnixNano()/100 + 621355968000000000
	if g <= r.lastGen {
		g = r.lastGen + 1
	}
	r.lastGen = g
	return strconv.FormatInt(g, 10)
}

// newETag returns an opaque, never repeated etag (base64 of a decimal sequence number, as IoT Hub
// etags look).
func newETag(tx *bolt.Tx) (string, error) {
	n, err := tx.Bucket(bucketMeta).NextSequence()
	if err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString([]byte(strconv.FormatUint(n, 10))), nil
}

// storeWithNewETag gives d a fresh etag and writes it, in one transaction.
func (r *Registry) storeWithNewETag(d *Device) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		var err error
		if d.ETag, err = newETag(tx); err != nil {
			return err
		}
		return putDevice(tx, *d)
	})
}

func putDevice(tx *bolt.Tx, d Device) error {
	b, err := json.Marshal(d)
	if err != nil {
		return err
	}
	return tx.Bucket(bucketDevices).Put([]byte(d.DeviceID), b)
}

func internal(err error) error {
	return wire.ErrServerError.WithText("registry storage: %v", err)
}

// Create adds a device. Empty symmetric keys are generated (32 random bytes, base64). It fails
// with DeviceAlreadyExists when the ID is taken.
func (r *Registry) Create(d Device) (Device, error) {
	if err := normalize(&d); err != nil {
		return Device{}, err
	}
	if d.Authentication.Type == AuthSAS {
		fillKeys(&d.Authentication.SymmetricKey)
	}
	r.wmu.Lock()
	r.mu.RLock()
	_, exists := r.devices[d.DeviceID]
	r.mu.RUnlock()
	if exists {
		r.wmu.Unlock()
		return Device{}, wire.ErrDeviceAlreadyExists.WithText("A device with ID '%s' is already registered.", d.DeviceID)
	}
	now := r.opts.Now()
	d.GenerationID = r.nextGeneration()
	d.ConnectionState, d.ConnectionStateUpdatedTime, d.LastActivityTime = Disconnected, time.Time{}, time.Time{}
	d.StatusUpdatedTime, d.CloudToDeviceMessageCount = time.Time{}, 0
	if d.Status == StatusDisabled {
		d.StatusUpdatedTime = now
	}
	if err := r.storeWithNewETag(&d); err != nil {
		r.wmu.Unlock()
		return Device{}, internal(err)
	}
	r.mu.Lock()
	r.devices[d.DeviceID] = newEntry(d)
	r.mu.Unlock()
	r.wmu.Unlock()
	r.notify(Change{DeviceID: d.DeviceID, New: &d})
	return d, nil
}

func fillKeys(k *SymmetricKey) {
	if k.PrimaryKey == "" {
		k.PrimaryKey = GenerateKey()
	}
	if k.SecondaryKey == "" {
		k.SecondaryKey = GenerateKey()
	}
}

// Update replaces a device's identity fields (status, statusReason, authentication,
// capabilities). ifMatch is an If-Match value: "" or "*" (quoted or not) matches any etag,
// anything else must equal the current etag after one pair of quotes is stripped, or the update
// fails with PreconditionFailed. A SAS update with both keys empty keeps the current keys (or
// generates them if the device was not SAS before).
func (r *Registry) Update(d Device, ifMatch string) (Device, error) {
	if err := normalize(&d); err != nil {
		return Device{}, err
	}
	r.wmu.Lock()
	r.mu.RLock()
	e, ok := r.devices[d.DeviceID]
	r.mu.RUnlock()
	if !ok {
		r.wmu.Unlock()
		return Device{}, wire.ErrDeviceNotFound.WithText("Device %s not registered", d.DeviceID)
	}
	cur := e.device()
	if ifMatch != "" && !ETagMatches(ifMatch, cur.ETag) {
		r.wmu.Unlock()
		return Device{}, wire.ErrPreconditionFailed.WithText("Precondition failed: Device %s etag does not match", d.DeviceID)
	}
	if d.Authentication.Type == AuthSAS {
		if d.Authentication.SymmetricKey == (SymmetricKey{}) && cur.Authentication.Type == AuthSAS {
			d.Authentication.SymmetricKey = cur.Authentication.SymmetricKey
		}
		fillKeys(&d.Authentication.SymmetricKey)
	}
	now := r.opts.Now()
	d.GenerationID = cur.GenerationID
	d.ConnectionState, d.ConnectionStateUpdatedTime = cur.ConnectionState, cur.ConnectionStateUpdatedTime
	d.LastActivityTime, d.CloudToDeviceMessageCount = cur.LastActivityTime, cur.CloudToDeviceMessageCount
	d.StatusUpdatedTime = cur.StatusUpdatedTime
	if d.Status != cur.Status {
		d.StatusUpdatedTime = now
	}
	if err := r.storeWithNewETag(&d); err != nil {
		r.wmu.Unlock()
		return Device{}, internal(err)
	}
	e.setSnapshot(d)
	r.wmu.Unlock()
	r.notify(Change{DeviceID: d.DeviceID, Old: &cur, New: &d})
	return d, nil
}

// Delete removes a device; ifMatch follows Update's rule.
func (r *Registry) Delete(id, ifMatch string) error {
	r.wmu.Lock()
	r.mu.RLock()
	e, ok := r.devices[id]
	r.mu.RUnlock()
	if !ok {
		r.wmu.Unlock()
		return wire.ErrDeviceNotFound.WithText("Device %s not registered", id)
	}
	cur := e.device()
	if ifMatch != "" && !ETagMatches(ifMatch, cur.ETag) {
		r.wmu.Unlock()
		return wire.ErrPreconditionFailed.WithText("Precondition failed: Device %s etag does not match", id)
	}
	if err := r.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketDevices).Delete([]byte(id))
	}); err != nil {
		r.wmu.Unlock()
		return internal(err)
	}
	e.deleted.Store(true)
	r.mu.Lock()
	delete(r.devices, id)
	r.mu.Unlock()
	r.wmu.Unlock()
	r.notify(Change{DeviceID: id, Old: &cur})
	return nil
}

// Get returns a device, or DeviceNotFound.
func (r *Registry) Get(id string) (Device, error) {
	r.mu.RLock()
	e, ok := r.devices[id]
	r.mu.RUnlock()
	if !ok {
		return Device{}, wire.ErrDeviceNotFound.WithText("Device %s not registered", id)
	}
	return e.device(), nil
}

// Identity returns the precomputed authentication data of a device. It is the connect path's
// lookup: a map read under a read lock, no allocation.
func (r *Registry) Identity(id string) (*Identity, bool) {
	r.mu.RLock()
	e, ok := r.devices[id]
	r.mu.RUnlock()
	if !ok {
		return nil, false
	}
	return e.snap.Load().id, true
}

// List returns up to top devices (all when top <= 0), ordered by device ID.
func (r *Registry) List(top int) []Device {
	r.mu.RLock()
	ids := make([]string, 0, len(r.devices))
	for id := range r.devices {
		ids = append(ids, id)
	}
	r.mu.RUnlock()
	slices.Sort(ids)
	if top > 0 && len(ids) > top {
		ids = ids[:top]
	}
	out := make([]Device, 0, len(ids))
	for _, id := range ids {
		if d, err := r.Get(id); err == nil {
			out = append(out, d)
		}
	}
	return out
}

// Stats are the registry statistics the service API reports.
type Stats = hubapi.RegistryStatistics

// Stats counts devices.
func (r *Registry) Stats() Stats {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var s Stats
	for _, e := range r.devices {
		s.TotalDeviceCount++
		if e.snap.Load().dev.Status == StatusDisabled {
			s.DisabledDeviceCount++
		} else {
			s.EnabledDeviceCount++
		}
	}
	return s
}

// ConnectedCount is the number of devices whose connectionState is Connected.
func (r *Registry) ConnectedCount() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	n := 0
	for _, e := range r.devices {
		e.rmu.Lock()
		if e.connState == Connected {
			n++
		}
		e.rmu.Unlock()
	}
	return n
}

// live returns the entry for id if it still exists with the given generation.
func (r *Registry) live(id, generationID string) *entry {
	r.mu.RLock()
	e, ok := r.devices[id]
	r.mu.RUnlock()
	if !ok || e.snap.Load().dev.GenerationID != generationID {
		return nil
	}
	return e
}

func (r *Registry) markDirty(e *entry) {
	if e.dirty.Swap(true) {
		return
	}
	r.dirtyMu.Lock()
	r.dirty = append(r.dirty, e)
	r.dirtyMu.Unlock()
}

// SetConnectionState records a connection or disconnection of the device generation
// generationID (a device deleted and re-created in between is left alone). Connecting also
// counts as activity. It is memory-only; the flusher persists it.
func (r *Registry) SetConnectionState(id, generationID string, connected bool, at time.Time) {
	e := r.live(id, generationID)
	if e == nil {
		return
	}
	st := Disconnected
	if connected {
		st = Connected
		e.lastActivity.Store(at.UnixNano())
	}
	e.rmu.Lock()
	e.connState, e.connUpdated = st, at
	e.rmu.Unlock()
	e.stateDirty.Store(true)
	r.markDirty(e)
}

// RecordActivity stamps lastActivityTime (memory only; the flusher persists it).
func (r *Registry) RecordActivity(id, generationID string, at time.Time) {
	e := r.live(id, generationID)
	if e == nil {
		return
	}
	e.lastActivity.Store(at.UnixNano())
	r.markDirty(e)
}

// SetCloudToDeviceMessageCount sets the number of queued cloud-to-device messages shown on the
// device (memory only).
func (r *Registry) SetCloudToDeviceMessageCount(id, generationID string, n int) {
	e := r.live(id, generationID)
	if e == nil {
		return
	}
	e.rmu.Lock()
	e.c2dCount = n
	e.rmu.Unlock()
}

// activityEvery is how many flush ticks pass between writes of lastActivityTime alone;
// connection state changes are written on every tick.
const activityEvery = 15

func (r *Registry) flusher() {
	defer close(r.done)
	t := time.NewTicker(r.opts.FlushInterval)
	defer t.Stop()
	for tick := 1; ; tick++ {
		select {
		case <-r.stop:
			if err := r.Flush(); err != nil {
				r.log.Error("final flush of device runtime state failed", zap.Error(err))
			}
			return
		case <-t.C:
			if err := r.flush(tick%activityEvery == 0); err != nil {
				r.log.Warn("flush of device runtime state failed", zap.Error(err))
			}
		}
	}
}

// Flush writes every pending runtime field (connection state, last activity) in one
// transaction. The flusher calls it at Close; in between it writes connection state changes
// every FlushInterval and lastActivityTime alone every 15 intervals.
func (r *Registry) Flush() error { return r.flush(true) }

func (r *Registry) flush(all bool) error {
	r.dirtyMu.Lock()
	batch := r.dirty
	r.dirty = nil
	r.dirtyMu.Unlock()
	if !all {
		var keep []*entry
		n := 0
		for _, e := range batch {
			if e.stateDirty.Load() {
				batch[n] = e
				n++
			} else {
				keep = append(keep, e)
			}
		}
		batch = batch[:n]
		if len(keep) > 0 {
			r.dirtyMu.Lock()
			r.dirty = append(r.dirty, keep...)
			r.dirtyMu.Unlock()
		}
	}
	if len(batch) == 0 {
		return nil
	}
	r.wmu.Lock()
	defer r.wmu.Unlock()
	err := r.db.Update(func(tx *bolt.Tx) error {
		for _, e := range batch {
			e.dirty.Store(false)
			e.stateDirty.Store(false)
			if e.deleted.Load() {
				continue
			}
			d := e.device()
			d.CloudToDeviceMessageCount = 0
			if err := putDevice(tx, d); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		for _, e := range batch {
			e.stateDirty.Store(true)
			r.markDirty(e)
		}
	}
	return err
}

// Policy returns a shared access policy by name.
func (r *Registry) Policy(name string) (*Policy, bool) {
	p, ok := r.policies[name]
	return p, ok
}

// Policies returns every shared access policy, ordered by name.
func (r *Registry) Policies() []Policy {
	out := make([]Policy, 0, len(r.policies))
	for _, p := range r.policies {
		out = append(out, *p)
	}
	slices.SortFunc(out, func(a, b Policy) int { return strings.Compare(a.KeyName, b.KeyName) })
	return out
}

// CACertificate is a CA certificate registered for certificateAuthority devices. Azure registers
// these through its resource manager; hubsim offers it as an addition (the certificate counts as
// verified at once).
type CACertificate struct {
	Name        string    `json:"name"`
	Certificate string    `json:"certificate"` // PEM
	Subject     string    `json:"subject"`
	Thumbprint  string    `json:"thumbprint"` // SHA-256, upper-case hex
	Expiry      time.Time `json:"expiry"`
	Created     time.Time `json:"created"`
	IsVerified  bool      `json:"isVerified"`
}

// AddCACertificate registers (or replaces, by name) a CA certificate. pemText must hold exactly
// one certificate. An empty name is derived from the certificate's common name.
func (r *Registry) AddCACertificate(name string, pemText []byte) (CACertificate, error) {
	certs, err := pki.ParseCerts(pemText)
	if err != nil {
		return CACertificate{}, wire.ErrArgumentInvalid.WithText("certificate: %v", err)
	}
	if len(certs) != 1 {
		return CACertificate{}, wire.ErrArgumentInvalid.WithText("certificate: expected one PEM certificate, got %d", len(certs))
	}
	c := certs[0]
	if name == "" {
		name = sanitizeName(c.Subject.CommonName)
	}
	if !validCAName(name) {
		return CACertificate{}, wire.ErrArgumentInvalid.WithText("certificate name must be 1 to 128 letters, digits, '-', '.' or '_'")
	}
	ca := CACertificate{
		Name: name, Certificate: string(pki.EncodeCert(c)), Subject: c.Subject.String(),
		Thumbprint: pki.ThumbprintSHA256(c), Expiry: c.NotAfter.UTC(), Created: r.opts.Now().UTC(), IsVerified: true,
	}
	b, _ := json.Marshal(ca)
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if err := r.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketCAs).Put([]byte(name), b) }); err != nil {
		return CACertificate{}, internal(err)
	}
	r.mu.Lock()
	r.cas[name] = ca
	r.rebuildCAPoolLocked()
	r.mu.Unlock()
	return ca, nil
}

// DeleteCACertificate removes a registered CA certificate.
func (r *Registry) DeleteCACertificate(name string) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	r.mu.RLock()
	_, ok := r.cas[name]
	r.mu.RUnlock()
	if !ok {
		return wire.ServiceError{Status: 404, Code: "CertificateNotFound", Number: 404001}.WithText("certificate %q not registered", name)
	}
	if err := r.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketCAs).Delete([]byte(name)) }); err != nil {
		return internal(err)
	}
	r.mu.Lock()
	delete(r.cas, name)
	r.rebuildCAPoolLocked()
	r.mu.Unlock()
	return nil
}

// CACertificates lists the registered CA certificates, ordered by name.
func (r *Registry) CACertificates() []CACertificate {
	r.mu.RLock()
	out := make([]CACertificate, 0, len(r.cas))
	for _, c := range r.cas {
		out = append(out, c)
	}
	r.mu.RUnlock()
	slices.SortFunc(out, func(a, b CACertificate) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// CAPool returns the registered CA certificates as a pool (never nil).
func (r *Registry) CAPool() *x509.CertPool { return r.caPool.Load() }

func (r *Registry) rebuildCAPool() {
	r.mu.Lock()
	r.rebuildCAPoolLocked()
	r.mu.Unlock()
}

func (r *Registry) rebuildCAPoolLocked() {
	p := x509.NewCertPool()
	for _, c := range r.cas {
		if cert, err := pki.ParseCert([]byte(c.Certificate)); err == nil {
			p.AddCert(cert)
		}
	}
	r.caPool.Store(p)
}

func validCAName(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}

func sanitizeName(cn string) string {
	b := []byte(cn)
	for i, c := range b {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_') {
			b[i] = '-'
		}
	}
	if len(b) > 128 {
		b = b[:128]
	}
	if len(b) == 0 {
		return "ca"
	}
	return string(b)
}
