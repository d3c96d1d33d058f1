package fleet

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"runtime/metrics"
	"strings"
	"sync"
	"text/template"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/iothubby/iothubby/internal/rlimit"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/connstr"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
)

// Options are the run-time choices of a fleet beyond its file.
type Options struct {
	// ShardIndex and ShardCount select this process's part of the index range (Shard);
	// ShardCount 0 means 1.
	ShardIndex, ShardCount int
	// Logger is shared by every device (each line carries a device field); sampled here.
	Logger *zap.Logger
	// Observer also receives every device event (e.g. Prometheus metrics); optional.
	Observer agent.Observer
	// Clock drives the connect-rate limiter; default the real clock.
	Clock clock.Clock
	// NoFileLimit is the open-file limit to check the shard against; 0: read and raise
	// RLIMIT_NOFILE.
	NoFileLimit uint64
	// ConnectSlots is how many hub connection attempts may be in flight at once; 0 means
	// DefaultConnectSlots.
	ConnectSlots int
}

// Curves returns the TLS key exchanges a fleet's devices offer, X25519 first: Go's default leads
// with the hybrid post-quantum X25519MLKEM768, whose ML-KEM key generation (client) and
// encapsulation (hub) were a seventh of the CPU of a fleet's connect on both sides; a simulated
// device's traffic needs no protection against a future quantum computer. A hub without X25519
// asks for P-256 or P-384 (a TLS 1.3 HelloRetryRequest).
func Curves() []tls.CurveID { return []tls.CurveID{tls.X25519, tls.CurveP256, tls.CurveP384} }

// Device is one prepared member of the fleet.
type Device struct {
	Index   int
	ID      string
	Profile string
	dev     *agent.Device
}

// Fleet is a prepared fleet: every device checked and created, none started.
type Fleet struct {
	cfg     Config
	log     *zap.Logger
	devices []Device
	stats   *counters
	limiter *Limiter
	// live is the one Liveness of every device's loops (one per device cost two maps each).
	live   *agent.Liveness
	lo, hi int
}

// filesPerDevice is the open files a device may hold at once: its hub connection, and with a
// DPS identity a DPS connection while provisioning. rlimit.Reserve covers the process's own.
func filesPerDevice(c *Config) uint64 {
	if c.ConnectionStringsFile != "" || c.Registry.ConnectionStringFile != "" {
		return 1
	}
	return 2
}

// Prepare checks cfg and creates the shard's devices without starting any: every error here is
// a configuration error (agent.ErrConfig) except failures of the registry's bulk creation.
func Prepare(ctx context.Context, cfg Config, o Options) (*Fleet, error) {
	c, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if o.ShardCount == 0 {
		o.ShardCount = 1
	}
	if o.ShardCount < 1 || o.ShardIndex < 0 || o.ShardIndex >= o.ShardCount {
		return nil, fmt.Errorf("%w: shard index %d is not in [0, %d)", ErrConfig, o.ShardIndex, o.ShardCount)
	}
	log := o.Logger
	if log == nil {
		log = zap.NewNop()
	}
	// Ten thousand devices logging "connected" at once would flood a terminal: per message,
	// the first 20 each second are logged, then every 200th.
	// The devices' fields (device, module) are kept apart and encoded only into the lines
	// written (fieldsCore): zap's cores encode them at once into a clone of the encoder, about
	// 1 KiB per device for lines that mostly never come.
	log = log.WithOptions(zap.WrapCore(func(core zapcore.Core) zapcore.Core {
		return &fieldsCore{Core: zapcore.NewSamplerWithOptions(core, time.Second, 20, 200)}
	}))

	var lines []string
	if c.ConnectionStringsFile != "" {
		b, err := attest.ReadSecretFile(c.ConnectionStringsFile, attest.FileOptions{})
		if err != nil {
			return nil, fmt.Errorf("%w: connectionStringsFile: %w", ErrConfig, err)
		}
		for _, l := range strings.Split(string(b), "\n") {
			if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
				lines = append(lines, l)
			}
		}
		if c.Count == 0 {
			c.Count = len(lines)
		}
		if c.Count <= 0 || c.Count > len(lines) {
			return nil, fmt.Errorf("%w: count %d but connectionStringsFile has %d connection strings", ErrConfig, c.Count, len(lines))
		}
	}
	lo, hi := Shard(c.Count, o.ShardIndex, o.ShardCount)
	n := hi - lo
	if n <= 0 {
		return nil, fmt.Errorf("%w: shard %d of %d has no devices (count %d)", ErrConfig, o.ShardIndex, o.ShardCount, c.Count)
	}
	limit := o.NoFileLimit
	if limit == 0 {
		// Logs a failure itself; limit is then the unchanged soft limit, or 0 if unreadable.
		limit, _ = rlimit.RaiseNoFile(log)
	}
	if need := uint64(n)*filesPerDevice(&c) + rlimit.Reserve; limit > 0 && need > limit {
		return nil, fmt.Errorf("%w: %d devices need about %d open files but the open-file limit (RLIMIT_NOFILE) is %d: lower count, split the fleet into shards, or raise the hard limit (ulimit -Hn, LimitNOFILE=)", ErrConfig, n, need, limit)
	}

	// IDs of the whole shard, checked before anything starts.
	ids := make([]string, n)
	seen := make(map[string]int, n)
	idT, err := c.idTemplate()
	if err != nil {
		return nil, err
	}
	for k := range n {
		i := lo + k
		var id string
		if lines != nil {
			cs, err := connstr.Parse(lines[i])
			if err != nil || cs.IsService() || cs.DeviceID == "" {
				return nil, fmt.Errorf("%w: connectionStringsFile line %d is not a device connection string", ErrConfig, i+1)
			}
			id = cs.DeviceID
		} else if id, err = deviceID(idT, i); err != nil {
			return nil, err
		}
		if strings.ContainsAny(id, "/\\") || id == "." || id == ".." {
			return nil, fmt.Errorf("%w: device ID %q (index %d) cannot name a state directory", ErrConfig, id, i)
		}
		if j, dup := seen[id]; dup {
			return nil, fmt.Errorf("%w: idPattern gives the same ID %q to indexes %d and %d: include .Index so every ID is distinct", ErrConfig, id, j, i)
		}
		seen[id] = i
		ids[k] = id
	}

	// Shared across devices: root CAs, TLS session cache, templates, limiter, counters.
	var roots *x509.CertPool
	if c.TLS.CAFile != "" {
		pem, err := os.ReadFile(c.TLS.CAFile)
		if err != nil {
			return nil, fmt.Errorf("%w: tls.caFile: %w", ErrConfig, err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%w: tls.caFile %s: no PEM certificates", ErrConfig, c.TLS.CAFile)
		}
	}
	tmpls := make([]*template.Template, len(c.Profiles))
	weights := make([]int, len(c.Profiles))
	for i := range c.Profiles {
		p := &c.Profiles[i]
		if p.Telemetry.Template == "" {
			p.Telemetry.Template = agent.DefaultTemplate
		}
		if p.Telemetry.ContentType == "" {
			p.Telemetry.ContentType = "application/json"
		}
		if p.Telemetry.ContentEncoding == "" {
			p.Telemetry.ContentEncoding = "utf-8"
		}
		if tmpls[i], err = agent.ParseTemplate(p.Telemetry.Template); err != nil {
			return nil, fmt.Errorf("profiles[%d] (%s): %w", i, p.Name, err)
		}
		weights[i] = p.Weight
	}
	id, err := newIdentities(ctx, &c, log)
	if err != nil {
		return nil, err
	}
	if o.ConnectSlots <= 0 {
		o.ConnectSlots = DefaultConnectSlots
	}
	slots := newConnectSlots(o.ConnectSlots, n)
	// With a DPS identity a device's first connection is its registration (unless cached),
	// which takes a connect-rate token but no slot: it waits mostly on DPS's polling, not on
	// the CPU, and would hold a slot for seconds.
	dpsIdentity := lines == nil && (id.groupKey != "" || id.ca != nil)
	f := &Fleet{cfg: c, log: log, lo: lo, hi: hi,
		stats:   newCounters(ids, o.Observer, slots, dpsIdentity),
		live:    agent.NewLiveness(o.Clock),
		limiter: NewLimiter(o.Clock, c.ConnectRate, c.ConnectBurst),
	}
	if err := id.prepare(ctx, ids); err != nil {
		return nil, err
	}
	// One TLS session cache for the fleet: the hub connections resume one another's sessions
	// (the cache holds one ticket per server name). Only where the TLS session carries no
	// identity: a session resumed from another device's ticket would present that device's
	// client certificate, so X.509 devices make full handshakes.
	var cache tls.ClientSessionCache
	if id.ca == nil {
		cache = tls.NewLRUClientSessionCache(64)
	}
	curves, tlsConfigs := Curves(), new(hub.TLSConfigs)
	host := agent.ReadHostFacts()
	ok := false
	defer func() {
		if !ok {
			f.Close()
		}
	}()
	for k, devID := range ids {
		i := lo + k
		pi := AssignProfile(c.Seed, i, weights)
		p := c.Profiles[pi]
		ac := agent.Default()
		ac.Transport = c.Transport
		ac.TLS = c.TLS
		ac.StateDir = filepath.Join(c.StateDir, devID)
		ac.ShutdownTimeout = c.ShutdownTimeout
		ac.ModelID = p.ModelID
		ac.Telemetry = p.Telemetry
		ac.Twin = p.Twin
		ac.Methods = p.Methods
		ac.MethodTimeout = p.MethodTimeout
		ac.MaxConcurrentMethods = p.MaxConcurrentMethods
		ac.Reboot = p.Reboot
		ac.Firmware = p.Firmware
		ac.Connection = p.Connection
		ac.Queue = p.Queue
		if lines != nil {
			ac.ConnectionString = lines[i]
		} else if err := id.configure(&ac, devID); err != nil {
			return nil, err
		}
		ac.Shared = agent.Shared{Index: i, Profile: p.Name, Observer: f.stats, Liveness: f.live,
			BeforeConnect: f.beforeConnect(k), RootCAs: roots, TLSSessionCache: cache, TLSConfigs: tlsConfigs, CurvePreferences: curves,
			LeanMQTT: true, Template: tmpls[pi], Host: &host}
		if err := os.MkdirAll(ac.StateDir, 0o700); err != nil {
			return nil, fmt.Errorf("%w: stateDir: %w", ErrConfig, err)
		}
		d, err := agent.New(ac, log)
		if err != nil {
			return nil, fmt.Errorf("device %s (index %d, profile %s): %w", devID, i, p.Name, err)
		}
		f.devices = append(f.devices, Device{Index: i, ID: devID, Profile: p.Name, dev: d})
	}
	ok = true
	return f, nil
}

// beforeConnect is device k's (index lo+k) Shared.BeforeConnect: a connect-rate token, then a
// slot (connectSlots) for a hub connection attempt.
func (f *Fleet) beforeConnect(k int) func(context.Context) error {
	return func(ctx context.Context) error {
		if err := f.limiter.Wait(ctx); err != nil {
			return err
		}
		if f.stats.provisioned != nil && !f.stats.provisioned[k].Load() {
			return nil // a DPS registration
		}
		return f.stats.slots.acquire(ctx, k)
	}
}

// Devices lists the shard's devices in index order.
func (f *Fleet) Devices() []Device { return f.devices }

// Summary snapshots the fleet's counters.
func (f *Fleet) Summary() Summary { return f.stats.summary() }

// Close releases every device (after Run, or instead of it).
func (f *Fleet) Close() {
	for _, d := range f.devices {
		d.dev.Close()
	}
}

// Progress is a point-in-time view for a status line.
type Progress struct {
	Target, Connected, EverConnected int
	Connects, ConnectFailures        uint64
}

// Progress returns the fleet's current state.
func (f *Fleet) Progress() Progress {
	now, ever := f.stats.connectedNow()
	return Progress{Target: len(f.devices), Connected: now, EverConnected: ever,
		Connects: f.stats.connects.Load(), ConnectFailures: f.stats.connFailed.Load()}
}

// Run starts every device (each first takes a token of the connect-rate limiter, so DPS
// registrations are paced too) and runs them until ctx ends or Duration passes; every device
// then drains within ShutdownTimeout. It returns nil after such a shutdown, and an error when
// every device stopped by itself with an error, or devices did not drain in time.
func (f *Fleet) Run(ctx context.Context) error {
	if f.cfg.Duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, f.cfg.Duration)
		defer cancel()
	}
	f.log.Info("fleet starting", zap.Int("devices", len(f.devices)), zap.Int("first_index", f.lo),
		zap.Int("last_index", f.hi-1), zap.Float64("connect_rate", f.cfg.ConnectRate))
	var wg sync.WaitGroup
	tally := &runTally{failed: map[string]int{}, n: len(f.devices), allFailed: make(chan struct{})}
	for _, d := range f.devices {
		wg.Add(1)
		// The goroutine lives only until the device has started: a running device holds no
		// goroutine of its own while it waits (agent.Device.Start). The connect-rate limiter
		// is taken by each connection itself (hub connects and DPS registrations, through
		// Shared.BeforeConnect), not here: a token here too made every device's first
		// connection cost two, halving the ramp's rate.
		go func() {
			d.dev.Start(ctx, func(err error) {
				defer wg.Done()
				if err != nil {
					tally.stopped(f.log, d.ID, err)
				}
			})
		}()
	}
	allFailed := tally.allFailed
	rampCtx, endRamp := context.WithCancel(ctx)
	rampDone := make(chan struct{})
	go func() {
		defer close(rampDone)
		f.afterRamp(rampCtx)
	}()
	select {
	case <-ctx.Done():
	case <-allFailed:
	}
	endRamp()
	<-rampDone
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	t := time.NewTimer(f.cfg.ShutdownTimeout + 5*time.Second)
	defer t.Stop()
	var err error
	select {
	case <-done:
	case <-t.C:
		err = fmt.Errorf("fleet: devices did not stop within shutdownTimeout (%v)", f.cfg.ShutdownTimeout)
	}
	tally.mu.Lock()
	f.stats.mu.Lock()
	f.stats.devErrs = tally.failed
	f.stats.mu.Unlock()
	nerr := tally.nerr
	if err == nil && nerr == len(f.devices) {
		err = fmt.Errorf("fleet: every device stopped with an error (e.g. %s)", firstKey(tally.failed))
	}
	tally.mu.Unlock()
	f.log.Info("fleet stopped", zap.Int("devices_failed", nerr))
	return err
}

// MsgRampMemoryReleased is logged once when every device has connected and the ramp's free
// heap memory went back to the OS.
const MsgRampMemoryReleased = "all devices connected: free heap memory returned to the OS"

// afterRamp waits until every device has connected once (or ctx ends), then returns to the
// operating system what the ramp's garbage left free in the heap: thousands of TLS handshakes,
// twin GETs and session set-ups allocate far more than the devices then hold, and the runtime
// would otherwise give those pages back only gradually (or keep them, below its scavenger's
// goal), so the process's RSS would stay at the ramp's peak.
func (f *Fleet) afterRamp(ctx context.Context) {
	select {
	case <-ctx.Done():
		return
	case <-f.stats.allEver:
	}
	start := time.Now()
	before := heapReleased()
	debug.FreeOSMemory()
	after := heapReleased()
	f.log.Info(MsgRampMemoryReleased,
		zap.Int("devices", len(f.devices)), zap.Uint64("released_bytes", after-min(before, after)),
		zap.Duration("took", time.Since(start)))
}

// heapReleased is the heap memory the runtime has returned to the OS and not reused.
func heapReleased() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/released:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64()
}

// runTally counts the devices that stopped with an error, by error.
type runTally struct {
	mu        sync.Mutex
	failed    map[string]int
	nerr, n   int
	allFailed chan struct{} // closed when all n devices failed
}

// stopped logs and counts one device's error.
func (t *runTally) stopped(log *zap.Logger, id string, err error) {
	log.Error("device stopped", zap.String("device", id), zap.Error(err))
	t.mu.Lock()
	defer t.mu.Unlock()
	t.failed[trimErr(err)]++
	t.nerr++
	if t.nerr == t.n {
		close(t.allFailed)
	}
}

func firstKey(m map[string]int) string {
	for k := range m {
		return k
	}
	return ""
}

// trimErr drops the "device <id>: " prefix so errors group across devices.
func trimErr(err error) string {
	s := err.Error()
	if strings.HasPrefix(s, "device ") {
		if i := strings.Index(s, ": "); i > 0 {
			s = s[i+2:]
		}
	}
	return s
}

// identities supplies each device's credential from the fleet's one identity source.
type identities struct {
	c        *Config
	log      *zap.Logger
	groupKey string
	ca       *pki.CA
	registry *registry
}

func newIdentities(ctx context.Context, c *Config, log *zap.Logger) (*identities, error) {
	id := &identities{c: c, log: log}
	opts := attest.FileOptions{AllowInsecureKeyFile: c.DPS.AllowInsecureKeyFile}
	switch {
	case c.DPS.GroupKeyFile != "":
		b, err := attest.ReadSecretFile(c.DPS.GroupKeyFile, opts)
		if err != nil {
			return nil, fmt.Errorf("%w: dps.groupKeyFile: %w", ErrConfig, err)
		}
		id.groupKey = strings.TrimSpace(string(b))
		if _, err := attest.FromGroupKey(id.groupKey, "check"); err != nil {
			return nil, fmt.Errorf("%w: dps.groupKeyFile: %w", ErrConfig, err)
		}
	case c.DPS.GroupKey != "":
		id.groupKey = c.DPS.GroupKey
		if _, err := attest.FromGroupKey(id.groupKey, "check"); err != nil {
			return nil, fmt.Errorf("%w: dps.groupKey: %w", ErrConfig, err)
		}
	case c.DPS.CACertFile != "":
		certPEM, err := os.ReadFile(c.DPS.CACertFile)
		if err != nil {
			return nil, fmt.Errorf("%w: dps.caCertFile: %w", ErrConfig, err)
		}
		cert, err := pki.ParseCert(certPEM)
		if err != nil {
			return nil, fmt.Errorf("%w: dps.caCertFile: %w", ErrConfig, err)
		}
		keyPEM, err := attest.ReadSecretFile(c.DPS.CAKeyFile, opts)
		if err != nil {
			return nil, fmt.Errorf("%w: dps.caKeyFile: %w", ErrConfig, err)
		}
		key, err := pki.ParseKey(keyPEM)
		if err != nil {
			return nil, fmt.Errorf("%w: dps.caKeyFile: %w", ErrConfig, err)
		}
		id.ca = &pki.CA{Cert: cert, Key: key}
	case c.Registry.ConnectionStringFile != "":
		r, err := newRegistry(c, log)
		if err != nil {
			return nil, err
		}
		id.registry = r
	}
	return id, nil
}

// prepare does the per-device work that must precede the devices: leaf certificates for an
// X.509 group, registry devices.
func (id *identities) prepare(ctx context.Context, ids []string) error {
	switch {
	case id.ca != nil:
		for _, d := range ids {
			if err := id.ensureLeaf(d); err != nil {
				return err
			}
		}
	case id.registry != nil:
		return id.registry.ensure(ctx, ids)
	}
	return nil
}

func (id *identities) dpsBase(devID string) agent.DPSConfig {
	d := id.c.DPS
	return agent.DPSConfig{IDScope: d.IDScope, GlobalEndpoint: d.GlobalEndpoint, ServerName: d.ServerName,
		Transport: d.Transport, HubAddress: d.HubAddress, RegistrationID: devID}
}

// configure sets one device's identity.
func (id *identities) configure(ac *agent.Config, devID string) error {
	switch {
	case id.groupKey != "":
		ac.DPS = id.dpsBase(devID)
		ac.DPS.GroupKey = id.groupKey
	case id.ca != nil:
		ac.DPS = id.dpsBase(devID)
		ac.DPS.Attestation = "x509"
		ac.Auth.CertFile, ac.Auth.KeyFile = id.leafFiles(devID)
	case id.registry != nil:
		key, ok := id.registry.keys[devID]
		if !ok {
			return fmt.Errorf("fleet: device %s: no key from the registry", devID)
		}
		ac.Host, ac.Address, ac.DeviceID = id.registry.host, id.c.Registry.HubAddress, devID
		ac.Auth.SymmetricKey = key
	default:
		return errors.New("fleet: no identity source")
	}
	return nil
}

func (id *identities) leafFiles(devID string) (cert, key string) {
	dir := filepath.Join(id.c.StateDir, devID)
	return filepath.Join(dir, "device-cert.pem"), filepath.Join(dir, "device-key.pem")
}

// ensureLeaf issues the device's certificate (CN = registration ID) unless a usable one is
// cached in its state directory; the key file is written 0600.
func (id *identities) ensureLeaf(devID string) error {
	certFile, keyFile := id.leafFiles(devID)
	if b, err := os.ReadFile(certFile); err == nil {
		if cert, err := pki.ParseCert(b); err == nil && cert.Subject.CommonName == devID &&
			time.Now().Before(cert.NotAfter) && cert.CheckSignatureFrom(id.ca.Cert) == nil {
			if _, err := os.Stat(keyFile); err == nil {
				return nil
			}
		}
	}
	leaf, err := id.ca.Issue(pki.LeafOptions{CommonName: devID, Client: true})
	if err != nil {
		return fmt.Errorf("fleet: issue certificate for %s: %w", devID, err)
	}
	key, ok := leaf.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return fmt.Errorf("fleet: issued key for %s is not ECDSA", devID)
	}
	keyPEM, err := pki.EncodeKey(key)
	if err != nil {
		return err
	}
	var certPEM []byte
	for _, der := range leaf.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return err
		}
		certPEM = append(certPEM, pki.EncodeCert(c)...)
	}
	if err := os.MkdirAll(filepath.Dir(certFile), 0o700); err != nil {
		return fmt.Errorf("%w: stateDir: %w", ErrConfig, err)
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		return fmt.Errorf("fleet: %w", err)
	}
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		return fmt.Errorf("fleet: %w", err)
	}
	return nil
}
