// Package twins is hubsim's device twin store: tags, desired and reported properties per
// device, with IoT Hub's versions, etags and $metadata, its document rules (pkg/twin) and an
// optional twin rate limit. It answers devices over MQTT (it implements broker.TwinHandler),
// serves the service REST API's /twins/{id}, and pushes desired-property notifications to the
// device's connection through a Notifier.
//
// Twins are kept in memory and written to the registry's database (bucket "twins") by a
// flusher every FlushInterval and at Close, so no device request waits for a disk write. A
// hubsim killed without a clean stop loses at most the changes of the last interval.
package twins

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/twin"
	"github.com/iothubby/iothubby/pkg/wire"
)

const bucket = "twins"

// Notifier delivers a desired-properties patch to a device's current connection, if it is
// subscribed to desired notifications; it must not block.
type Notifier interface {
	NotifyDesired(deviceID string, version int64, body []byte) bool
}

// Options tune a Store. The zero value is usable.
type Options struct {
	// FlushInterval is how often changed twins are written to disk. Default 100 ms.
	FlushInterval time.Duration
	// RateLimit, when positive, limits device twin operations (GET and reported PATCH) to this
	// many per second across the hub (IoT Hub S1: 100 reads and 50 updates per second);
	// requests over it are answered 429. Burst: one second's worth. Default 0: unlimited.
	RateLimit float64
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Store holds every device's twin. Its methods are safe for concurrent use.
type Store struct {
	reg  *registry.Registry
	log  *zap.Logger
	opts Options

	notifier Notifier
	nmu      sync.RWMutex

	mu    sync.Mutex // guards twins, dirty and deleted
	twins map[string]*devTwin
	dirty map[string]bool

	flushMu sync.Mutex // one flush at a time, so an older snapshot never overwrites a newer one

	limMu  sync.Mutex
	tokens float64
	last   time.Time

	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

// devTwin is one device's twin, persisted as JSON.
type devTwin struct {
	mu sync.Mutex `json:"-"`

	GenerationID    string         `json:"generationId"`
	Version         int64          `json:"version"`
	Tags            map[string]any `json:"tags"`
	Desired         map[string]any `json:"desired"`
	Reported        map[string]any `json:"reported"`
	DesiredVersion  int64          `json:"desiredVersion"`
	ReportedVersion int64          `json:"reportedVersion"`
	DesiredMeta     map[string]any `json:"desiredMeta"`
	ReportedMeta    map[string]any `json:"reportedMeta"`
}

// Open loads the twins persisted in reg and starts the flusher. Close stops it.
func Open(reg *registry.Registry, log *zap.Logger, opts Options) (*Store, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if opts.FlushInterval <= 0 {
		opts.FlushInterval = 100 * time.Millisecond
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &Store{
		reg: reg, log: log, opts: opts,
		twins: map[string]*devTwin{}, dirty: map[string]bool{},
		stop: make(chan struct{}), done: make(chan struct{}),
		tokens: opts.RateLimit, last: opts.Now(),
	}
	blobs, err := reg.LoadBlobs(bucket)
	if err != nil {
		return nil, err
	}
	for id, b := range blobs {
		var t devTwin
		if err := json.Unmarshal(b, &t); err != nil {
			log.Warn("twin record unreadable; starting that twin afresh", zap.String("device", id), zap.Error(err))
			continue
		}
		// numbers must stay json.Number, as Decode leaves them
		t.Tags, t.Desired, t.Reported = renumber(t.Tags), renumber(t.Desired), renumber(t.Reported)
		t.DesiredMeta, t.ReportedMeta = renumber(t.DesiredMeta), renumber(t.ReportedMeta)
		s.twins[id] = &t
	}
	reg.Watch(s.onRegistryChange)
	go s.flusher()
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

// SetNotifier sets where desired notifications go (the broker, once it has started).
func (s *Store) SetNotifier(n Notifier) {
	s.nmu.Lock()
	s.notifier = n
	s.nmu.Unlock()
}

func (s *Store) onRegistryChange(c registry.Change) {
	if c.New != nil && (c.Old == nil || c.Old.GenerationID == c.New.GenerationID) {
		return
	}
	s.mu.Lock()
	delete(s.twins, c.DeviceID)
	s.dirty[c.DeviceID] = true // written as a delete
	s.mu.Unlock()
}

// Close writes every changed twin and stops the flusher.
func (s *Store) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.stop)
		<-s.done
		err = s.flush()
	})
	return err
}

func (s *Store) flusher() {
	defer close(s.done)
	t := time.NewTicker(s.opts.FlushInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			if err := s.flush(); err != nil {
				s.log.Error("writing twins failed; will retry", zap.Error(err))
			}
		}
	}
}

// Flush writes every changed twin now.
func (s *Store) Flush() error { return s.flush() }

func (s *Store) flush() error {
	s.flushMu.Lock()
	defer s.flushMu.Unlock()
	s.mu.Lock()
	if len(s.dirty) == 0 {
		s.mu.Unlock()
		return nil
	}
	ids := s.dirty
	s.dirty = map[string]bool{}
	twins := make(map[string]*devTwin, len(ids))
	for id := range ids {
		twins[id] = s.twins[id]
	}
	s.mu.Unlock()
	put := map[string][]byte{}
	var del []string
	for id, t := range twins {
		if t == nil {
			del = append(del, id)
			continue
		}
		t.mu.Lock()
		b, err := json.Marshal(t)
		t.mu.Unlock()
		if err != nil {
			return err
		}
		put[id] = b
	}
	if err := s.reg.StoreBlobs(bucket, put, del); err != nil {
		s.mu.Lock()
		for id := range ids {
			s.dirty[id] = true
		}
		s.mu.Unlock()
		return err
	}
	return nil
}

func (s *Store) markDirty(id string) {
	s.mu.Lock()
	s.dirty[id] = true
	s.mu.Unlock()
}

// get returns the device's twin, creating it (version 1 everywhere) when the device has none or
// only one from an earlier device with the same ID. The twin is returned locked.
func (s *Store) get(id string) (*devTwin, error) {
	ident, ok := s.reg.Identity(id)
	if !ok {
		return nil, wire.ErrDeviceNotFound.WithText("Device %s not registered", id)
	}
	s.mu.Lock()
	t := s.twins[id]
	if t == nil || t.GenerationID != ident.GenerationID {
		now := s.opts.Now()
		t = &devTwin{
			GenerationID: ident.GenerationID, Version: 1, DesiredVersion: 1, ReportedVersion: 1,
			Tags: map[string]any{}, Desired: map[string]any{}, Reported: map[string]any{},
			DesiredMeta:  map[string]any{"$lastUpdated": stamp(now), "$lastUpdatedVersion": json.Number("1")},
			ReportedMeta: map[string]any{"$lastUpdated": stamp(now)},
		}
		s.twins[id] = t
		s.dirty[id] = true
	}
	s.mu.Unlock()
	t.mu.Lock()
	return t, nil
}

func stamp(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.0000000Z") }

// allow takes one token from the rate limiter.
func (s *Store) allow() bool {
	if s.opts.RateLimit <= 0 {
		return true
	}
	s.limMu.Lock()
	defer s.limMu.Unlock()
	now := s.opts.Now()
	s.tokens = min(s.opts.RateLimit, s.tokens+now.Sub(s.last).Seconds()*s.opts.RateLimit)
	s.last = now
	if s.tokens < 1 {
		return false
	}
	s.tokens--
	return true
}

func deviceError(status, code int, msg string) broker.TwinResponse {
	b, _ := json.Marshal(wire.DeviceError{Code: code, Message: msg})
	return broker.TwinResponse{Status: status, Version: -1, Body: b}
}

func throttled() broker.TwinResponse {
	return deviceError(429, 429001, "ThrottlingException: twin operations over the hub's rate limit; retry later")
}

// GetTwin answers a device's GET: {"desired":{...,"$version":n},"reported":{...,"$version":m}},
// without $metadata.
func (s *Store) GetTwin(c broker.Caller) broker.TwinResponse {
	if !s.allow() {
		return throttled()
	}
	t, err := s.get(c.DeviceID)
	if err != nil {
		return deviceError(404, 404001, err.Error())
	}
	body, err := json.Marshal(map[string]any{
		"desired":  withVersion(t.Desired, t.DesiredVersion, nil),
		"reported": withVersion(t.Reported, t.ReportedVersion, nil),
	})
	t.mu.Unlock()
	if err != nil {
		return deviceError(500, 500001, "encoding the twin: "+err.Error())
	}
	return broker.TwinResponse{Status: 200, Version: -1, Body: body}
}

// withVersion returns a shallow copy of a section with $version (and $metadata when meta is
// not nil) added.
func withVersion(doc map[string]any, v int64, meta map[string]any) map[string]any {
	out := make(map[string]any, len(doc)+2)
	for k, x := range doc {
		out[k] = x
	}
	if meta != nil {
		out["$metadata"] = meta
	}
	out["$version"] = v
	return out
}

// PatchReported applies a device's reported PATCH and answers 204 with the new $version, or 400
// with {"errorCode","message"} when the patch is not a JSON object or breaks a limit.
func (s *Store) PatchReported(c broker.Caller, body []byte) broker.TwinResponse {
	if !s.allow() {
		return throttled()
	}
	patch, err := twin.Decode(body)
	if err != nil {
		return deviceError(400, 400004, "ArgumentInvalid: "+err.Error())
	}
	t, err := s.get(c.DeviceID)
	if err != nil {
		return deviceError(404, 404001, err.Error())
	}
	next, err := twin.Apply(twin.Reported, t.Reported, patch)
	if err != nil {
		t.mu.Unlock()
		return deviceError(400, 400004, "ArgumentInvalid: "+err.Error())
	}
	now := stamp(s.opts.Now())
	t.Reported = next
	t.ReportedVersion++
	t.Version++
	updateMeta(t.ReportedMeta, patch, now, nil)
	v := t.ReportedVersion
	t.mu.Unlock()
	s.markDirty(c.DeviceID)
	return broker.TwinResponse{Status: 204, Version: v}
}

// updateMeta mirrors a merge patch into a $metadata tree: every changed node gets $lastUpdated
// (and $lastUpdatedVersion when version is not nil), deleted keys lose their metadata.
func updateMeta(meta map[string]any, patch map[string]any, now string, version any) {
	meta["$lastUpdated"] = now
	if version != nil {
		meta["$lastUpdatedVersion"] = version
	}
	for k, v := range patch {
		switch pv := v.(type) {
		case nil:
			delete(meta, k)
		case map[string]any:
			node, ok := meta[k].(map[string]any)
			if !ok {
				node = map[string]any{}
				meta[k] = node
			}
			updateMeta(node, pv, now, version)
		default:
			leaf := map[string]any{"$lastUpdated": now}
			if version != nil {
				leaf["$lastUpdatedVersion"] = version
			}
			meta[k] = leaf
		}
	}
}

// Twin is the service view of a device twin, Azure's JSON shape (hubapi.Twin, shared with the
// service client).
type Twin = hubapi.Twin

// ETag renders a twin version as IoT Hub's etags look: base64 of a big-endian 8-byte counter.
func ETag(version int64) string {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(version))
	return base64.StdEncoding.EncodeToString(b[:])
}

// nullable is s, or JSON null when s is empty, as the registry's identity fields read in a twin.
func nullable(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// view renders the service view; call with t.mu held. The identity fields are the registry
// device's, converted here (the one place) to the twin's shape.
func (s *Store) view(id string, t *devTwin) (Twin, error) {
	d, err := s.reg.Get(id)
	if err != nil {
		return Twin{}, err
	}
	v := Twin{
		DeviceID: id, ETag: ETag(t.Version), DeviceETag: d.ETag, Version: t.Version,
		Status: string(d.Status), StatusReason: nullable(d.StatusReason),
		StatusUpdateTime:          registry.FormatTime(d.StatusUpdatedTime),
		ConnectionState:           string(d.ConnectionState),
		LastActivityTime:          registry.FormatTime(d.LastActivityTime),
		CloudToDeviceMessageCount: d.CloudToDeviceMessageCount,
		AuthenticationType:        string(d.Authentication.Type),
		X509Thumbprint: map[string]any{
			"primaryThumbprint":   nullable(d.Authentication.X509Thumbprint.PrimaryThumbprint),
			"secondaryThumbprint": nullable(d.Authentication.X509Thumbprint.SecondaryThumbprint),
		},
		Capabilities: map[string]any{"iotEdge": d.Capabilities.IoTEdge},
		Tags:         twin.Clone(t.Tags).(map[string]any),
	}
	v.Properties.Desired = withVersion(twin.Clone(t.Desired).(map[string]any), t.DesiredVersion, twin.Clone(t.DesiredMeta).(map[string]any))
	v.Properties.Reported = withVersion(twin.Clone(t.Reported).(map[string]any), t.ReportedVersion, twin.Clone(t.ReportedMeta).(map[string]any))
	return v, nil
}

// Get returns the service view of a device's twin.
func (s *Store) Get(id string) (Twin, error) {
	t, err := s.get(id)
	if err != nil {
		return Twin{}, err
	}
	defer t.mu.Unlock()
	return s.view(id, t)
}

// Reported returns a copy of a device's reported properties (without $version) and their version.
func (s *Store) Reported(id string) (map[string]any, int64, error) {
	t, err := s.get(id)
	if err != nil {
		return nil, 0, err
	}
	defer t.mu.Unlock()
	return twin.Clone(t.Reported).(map[string]any), t.ReportedVersion, nil
}

// matchETag applies If-Match: empty, * and "*" match anything; otherwise one pair of quotes is
// stripped and the rest compared.
func matchETag(ifMatch, etag string) bool {
	m := strings.TrimSpace(ifMatch)
	if m == "" || m == "*" || m == `"*"` {
		return true
	}
	if len(m) >= 2 && m[0] == '"' && m[len(m)-1] == '"' {
		m = m[1 : len(m)-1]
	}
	return m == etag
}

// servicePatch picks tags and properties.desired out of a service request body.
func servicePatch(body []byte) (tags, desired map[string]any, err error) {
	doc, err := twin.Decode(body)
	if err != nil {
		return nil, nil, wire.ErrIotHubFormatError.WithText("twin body: %v", err)
	}
	section := func(v any, name string) (map[string]any, error) {
		switch m := v.(type) {
		case nil:
			return nil, nil
		case map[string]any:
			m = twin.Clone(m).(map[string]any)
			twin.StripReserved(m)
			return m, nil
		}
		return nil, wire.ErrArgumentInvalid.WithText("%s must be an object", name)
	}
	if tags, err = section(doc["tags"], "tags"); err != nil {
		return nil, nil, err
	}
	if props, ok := doc["properties"]; ok && props != nil {
		pm, ok := props.(map[string]any)
		if !ok {
			return nil, nil, wire.ErrArgumentInvalid.WithText("properties must be an object")
		}
		if desired, err = section(pm["desired"], "properties.desired"); err != nil {
			return nil, nil, err
		}
	}
	return tags, desired, nil
}

func limitError(err error) error {
	var te *twin.Error
	if errors.As(err, &te) {
		return wire.ErrArgumentInvalid.WithText("%v", te)
	}
	return err
}

// Update applies a service PATCH (tags and properties.desired merge; null deletes) when
// ifMatch matches, notifies the device of a desired change, and returns the updated view.
// Errors: DeviceNotFound, PreconditionFailed, IotHubFormatError, ArgumentInvalid (limits).
func (s *Store) Update(id, ifMatch string, body []byte) (Twin, error) {
	return s.change(id, ifMatch, body, false)
}

// Replace applies a service PUT: tags and desired are replaced wholesale.
func (s *Store) Replace(id, ifMatch string, body []byte) (Twin, error) {
	return s.change(id, ifMatch, body, true)
}

func (s *Store) change(id, ifMatch string, body []byte, replace bool) (Twin, error) {
	tags, desired, err := servicePatch(body)
	if err != nil {
		return Twin{}, err
	}
	t, err := s.get(id)
	if err != nil {
		return Twin{}, err
	}
	defer t.mu.Unlock()
	if !matchETag(ifMatch, ETag(t.Version)) {
		return Twin{}, wire.ErrPreconditionFailed.WithText("twin %s: etag does not match If-Match", id)
	}
	var newTags, newDesired, notify map[string]any
	if replace {
		if tags == nil {
			tags = map[string]any{}
		}
		if desired == nil {
			desired = map[string]any{}
		}
		for _, p := range []map[string]any{tags, desired} {
			if err := twin.CheckPatch(p); err != nil {
				return Twin{}, limitError(err)
			}
		}
		newTags, newDesired = dropNulls(tags), dropNulls(desired)
		if err := twin.CheckSize(twin.Tags, newTags); err != nil {
			return Twin{}, limitError(err)
		}
		if err := twin.CheckSize(twin.Desired, newDesired); err != nil {
			return Twin{}, limitError(err)
		}
		if !twin.Equal(newDesired, t.Desired) {
			notify = twin.Clone(newDesired).(map[string]any)
			for k := range t.Desired {
				if _, ok := newDesired[k]; !ok {
					notify[k] = nil
				}
			}
		}
	} else {
		newTags, newDesired = t.Tags, t.Desired
		if tags != nil {
			if newTags, err = twin.Apply(twin.Tags, t.Tags, tags); err != nil {
				return Twin{}, limitError(err)
			}
		}
		if len(desired) > 0 {
			if newDesired, err = twin.Apply(twin.Desired, t.Desired, desired); err != nil {
				return Twin{}, limitError(err)
			}
			notify = desired
		}
	}
	now := stamp(s.opts.Now())
	changed := !twin.Equal(newTags, t.Tags) || notify != nil
	t.Tags = newTags
	if notify != nil {
		t.Desired = newDesired
		t.DesiredVersion++
		dv := json.Number(jsonInt(t.DesiredVersion))
		if replace {
			t.DesiredMeta = map[string]any{}
			updateMeta(t.DesiredMeta, newDesired, now, dv)
		} else {
			updateMeta(t.DesiredMeta, notify, now, dv)
		}
	}
	if changed {
		t.Version++
		s.markDirty(id)
	}
	if notify != nil {
		b, err := json.Marshal(withVersion(notify, t.DesiredVersion, nil))
		if err == nil {
			s.nmu.RLock()
			n := s.notifier
			s.nmu.RUnlock()
			if n != nil {
				// under t.mu, so notifications leave in version order
				n.NotifyDesired(id, t.DesiredVersion, b)
			}
		}
	}
	return s.view(id, t)
}

func jsonInt(v int64) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func dropNulls(m map[string]any) map[string]any {
	return twin.Merge(nil, m)
}
