// Package throttle holds IoT Hub's per-tier operation throttles as token buckets on an injected
// clock: Limits gives the documented rates of a tier and unit count (protocol-amqp.md §9,
// performance.md §2.1, from the IoT Hub quotas and throttling page), and a Limiter answers whether
// one more operation of a kind is allowed now, counting the refusals. The hooks live where the
// operations are served (pkg/hubsim/broker/throttle.go, pkg/hubsim/rest/throttle.go).
package throttle

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iothubby/iothubby/pkg/clock"
)

// Op is a throttled kind of operation.
type Op string

// The throttled operations.
const (
	Connect      Op = "connect"       // new device connections
	D2C          Op = "d2c"           // device-to-cloud sends
	Registry     Op = "registry"      // identity registry create/get/list/update/delete
	TwinRead     Op = "twin-read"     // twin reads, device and service side
	TwinUpdate   Op = "twin-update"   // twin updates, device and service side
	Method       Op = "method"        // direct-method calls, counted as 4 KB meters
	JobOp        Op = "job"           // jobs create/update/list/delete
	JobDeviceOps Op = "job-device-op" // twin updates and method calls made by jobs
	Query        Op = "query"         // registry queries (POST /devices/query)
)

// Ops lists every operation, in a fixed order for views.
var Ops = []Op{Connect, D2C, Registry, TwinRead, TwinUpdate, Method, JobOp, JobDeviceOps, Query}

// Limits gives, per operation, the allowed rate in operations per second.
type Limits map[Op]float64

// ForTier returns the documented throttles of tier (F1, S1, S2, S3; B1-B3 as S1-S3) with units
// units. Direct methods are given in 4 KB calls per second (160 KB/s/unit on S1 = 40 calls/s).
func ForTier(tier string, units int) (Limits, error) {
	if units < 1 {
		return nil, fmt.Errorf("units must be at least 1, got %d", units)
	}
	u := float64(units)
	perMin := func(n float64) float64 { return n / 60 }
	switch strings.ToUpper(tier) {
	case "F1":
		if units != 1 {
			return nil, fmt.Errorf("tier F1 has exactly 1 unit, got %d", units)
		}
		fallthrough
	case "S1", "B1":
		return Limits{
			Connect: max(100, 12*u), D2C: max(100, 12*u), Registry: perMin(100) * u,
			TwinRead: 100, TwinUpdate: 50, Method: 40 * u, JobOp: perMin(100) * u, JobDeviceOps: 10,
			Query: perMin(20) * u,
		}, nil
	case "S2", "B2":
		return Limits{
			Connect: 120 * u, D2C: 120 * u, Registry: perMin(100) * u,
			TwinRead: max(100, 10*u), TwinUpdate: max(50, 5*u), Method: 120 * u, JobOp: perMin(100) * u, JobDeviceOps: max(10, u),
			Query: perMin(20) * u,
		}, nil
	case "S3", "B3":
		return Limits{
			Connect: 6000 * u, D2C: 6000 * u, Registry: perMin(5000) * u,
			TwinRead: 500 * u, TwinUpdate: 250 * u, Method: 6000 * u, JobOp: perMin(5000) * u, JobDeviceOps: 50 * u,
			Query: perMin(1000) * u,
		}, nil
	}
	return nil, fmt.Errorf("unknown tier %q (want F1, S1, S2 or S3)", tier)
}

// bucket is a token bucket holding at most one second's worth (at least one token).
type bucket struct {
	rate, size, tokens float64
	last               time.Time
}

// Limiter applies Limits on a clock. Safe for concurrent use. A Limiter that is off (Off, or
// SetTier("")) allows everything at the cost of one atomic load and counts nothing.
type Limiter struct {
	on      atomic.Bool
	clk     clock.Clock
	mu      sync.Mutex
	tier    string
	units   int
	buckets map[Op]*bucket
	allowed map[Op]uint64
	refused map[Op]uint64
}

// New returns a Limiter for limits; operations absent from limits are never throttled.
func New(limits Limits, clk clock.Clock) *Limiter {
	l := &Limiter{clk: clk}
	l.set(limits, "", 0)
	return l
}

// Off returns a Limiter that throttles nothing until SetTier.
func Off(clk clock.Clock) *Limiter { return &Limiter{clk: clk} }

// NewTier returns a Limiter with the throttles of tier and units (ForTier), which Status names.
func NewTier(tier string, units int, clk clock.Clock) (*Limiter, error) {
	l := Off(clk)
	if err := l.SetTier(tier, units); err != nil {
		return nil, err
	}
	return l, nil
}

// SetTier replaces the throttles with those of tier and units, with full buckets and counters
// from zero; tier "" turns throttling off. An unknown tier or unit count changes nothing.
func (l *Limiter) SetTier(tier string, units int) error {
	return l.Set(Request{Tier: tier, Units: units})
}

// Set applies a Request: the tier's throttles with r.Limits replacing the rates of the operations
// it names (say, connect at 1/s to rehearse a reconnect storm with a handful of devices). Tier ""
// turns throttling off. An invalid request changes nothing.
func (l *Limiter) Set(r Request) error {
	tier, units := r.Tier, r.Units
	if tier == "" {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.on.Store(false)
		l.tier, l.units, l.buckets, l.allowed, l.refused = "", 0, nil, nil, nil
		return nil
	}
	limits, err := ForTier(tier, units)
	if err != nil {
		return err
	}
	if err := checkOverrides(r.Limits); err != nil {
		return err
	}
	for op, rate := range r.Limits {
		limits[op] = rate
	}
	l.set(limits, strings.ToUpper(tier), units)
	return nil
}

// MaxOverride bounds a rate in Request.Limits.
const MaxOverride = 1e6

func checkOverrides(m Limits) error {
	for op, rate := range m {
		if !slices.Contains(Ops, op) {
			return fmt.Errorf("unknown operation %q in limits", op)
		}
		if !(rate > 0 && rate <= MaxOverride) { // also refuses NaN
			return fmt.Errorf("limit of %s must be above 0 and at most %g per second, got %v", op, float64(MaxOverride), rate)
		}
	}
	return nil
}

func (l *Limiter) set(limits Limits, tier string, units int) {
	buckets := map[Op]*bucket{}
	now := l.clk.Now()
	for op, rate := range limits {
		size := max(rate, 1)
		buckets[op] = &bucket{rate: rate, size: size, tokens: size, last: now}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.tier, l.units, l.buckets = tier, units, buckets
	l.allowed, l.refused = map[Op]uint64{}, map[Op]uint64{}
	l.on.Store(true)
}

// Allow takes one token for op and reports whether it was there; a refusal is counted.
// A nil Limiter allows everything.
func (l *Limiter) Allow(op Op) bool { return l.AllowN(op, 1) }

// MethodUnits is how many 4 KB meters a direct-method call of size bytes counts as (at least
// one: a 0-4 KB call is one, 4-8 KB two, ...).
func MethodUnits(size int64) int {
	if size <= 0 {
		return 1
	}
	return int((size + 4095) / 4096)
}

// AllowN takes n tokens for op (an operation that counts n times, such as a direct method of
// several 4 KB meters) and reports whether they were there; a refusal is counted once. n is
// capped at the bucket size, so that an operation the tier allows once a second is never
// refused for ever. A nil Limiter allows everything.
func (l *Limiter) AllowN(op Op, n int) bool {
	if l == nil || !l.on.Load() {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.allowed == nil {
		return true // turned off meanwhile
	}
	b := l.buckets[op]
	if b == nil {
		l.allowed[op]++
		return true
	}
	now := l.clk.Now()
	if el := now.Sub(b.last).Seconds(); el > 0 {
		b.tokens = min(b.size, b.tokens+el*b.rate)
		b.last = now
	}
	need := min(float64(max(n, 1)), b.size)
	if b.tokens < need {
		l.refused[op]++
		return false
	}
	b.tokens -= need
	l.allowed[op]++
	return true
}

// Rate is op's limit in operations per second (0: not throttled).
func (l *Limiter) Rate(op Op) float64 {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if b := l.buckets[op]; b != nil {
		return b.rate
	}
	return 0
}

// Counter is one operation's figures in a Snapshot.
type Counter struct {
	Op        Op      `json:"op"`
	PerSecond float64 `json:"perSecond"` // 0: not throttled
	Allowed   uint64  `json:"allowed"`
	Throttled uint64  `json:"throttled"`
}

// Snapshot returns the counters of every operation, in Ops order.
func (l *Limiter) Snapshot() []Counter {
	if l == nil {
		return []Counter{}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.snapshotLocked()
}

func (l *Limiter) snapshotLocked() []Counter {
	out := make([]Counter, 0, len(Ops))
	if l.allowed == nil {
		return out
	}
	for _, op := range Ops {
		c := Counter{Op: op, Allowed: l.allowed[op], Throttled: l.refused[op]}
		if b := l.buckets[op]; b != nil {
			c.PerSecond = b.rate
		}
		out = append(out, c)
	}
	return out
}

// Status is the counters view hubsim serves at GET /hubsim/throttle.
type Status struct {
	// Tier and Units are what hubsim was started with; Tier is "" when throttling is off.
	Tier  string `json:"tier"`
	Units int    `json:"units"`
	// Operations has one entry per operation (Ops order, then any the caller adds).
	Operations []Counter `json:"operations"`
}

// Status returns the tier, units and counters; a nil Limiter gives an empty Status (throttling
// off).
func (l *Limiter) Status() Status {
	if l == nil {
		return Status{Operations: []Counter{}}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return Status{Tier: l.tier, Units: l.units, Operations: l.snapshotLocked()}
}

// Request is the body of POST /hubsim/throttle: the tier and units to throttle as from now on,
// and optionally rates (per second) that replace the tier's for the operations named.
type Request struct {
	Tier   string `json:"tier"`
	Units  int    `json:"units"`
	Limits Limits `json:"limits,omitempty"`
}

// ParseRequest reads a POST /hubsim/throttle body: one JSON object with a known tier and a unit
// count it allows (units 0 or absent: 1). Unknown fields are refused, so a typo is not silently
// ignored.
func ParseRequest(b []byte) (Request, error) {
	var r Request
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return Request{}, fmt.Errorf("throttle request: %w", err)
	}
	if dec.More() {
		return Request{}, errors.New("throttle request: more than one JSON value")
	}
	if r.Units == 0 {
		r.Units = 1
	}
	if _, err := ForTier(r.Tier, r.Units); err != nil {
		return Request{}, fmt.Errorf("throttle request: %w", err)
	}
	if err := checkOverrides(r.Limits); err != nil {
		return Request{}, fmt.Errorf("throttle request: %w", err)
	}
	r.Tier = strings.ToUpper(r.Tier)
	return r, nil
}
