// Package faults is hubsim's fault injection: IoT Hub's own mechanism, a device-to-cloud
// message carrying the AzIoTHub_FaultOperationType application property (as Microsoft's SDK
// end-to-end tests send it), turned into a scheduled action on the device's connection.
//
// The Injector owns the timers (on an injected clock.Clock), the windows during which a fault
// keeps acting (Invoke* faults: CONNECTs are refused for their duration), a bounded log of every
// fault applied and per-type counters. The device endpoint decides what a fault does to a
// connection; the Injector decides when.
package faults

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/clock"
)

// Application property names of a fault message (case-sensitive, as IoT Hub reads them).
const (
	PropType        = "AzIoTHub_FaultOperationType"
	PropCloseReason = "AzIoTHub_FaultOperationCloseReason"
	PropDelay       = "AzIoTHub_FaultOperationDelayInSecs"
	PropDuration    = "AzIoTHub_FaultOperationDurationInSecs"
)

// Kind is what a fault does to an MQTT device connection.
type Kind int

const (
	// KindKill drops the TCP connection abruptly (no TLS close_notify): KillTcp and every
	// Kill* AMQP type (an MQTT connection has no sessions or links to kill separately).
	KindKill Kind = iota + 1
	// KindShutdown closes the connection gracefully (ShutDownMqtt, ShutDownAmqp).
	KindShutdown
	// KindThrottle, KindQuota and KindAuth are the Invoke* faults. Over MQTT IoT Hub drops the
	// connection (the SDKs reconnect); hubsim additionally refuses CONNECTs with CONNACK 5
	// during the duration of an InvokeAuthError.
	KindThrottle
	KindQuota
	KindAuth
	// KindAdmin marks the records of admin faults (POST /hubsim/faults).
	KindAdmin Kind = 100
)

func (k Kind) String() string {
	switch k {
	case KindKill:
		return "kill"
	case KindShutdown:
		return "shutdown"
	case KindThrottle:
		return "throttle"
	case KindQuota:
		return "quota"
	case KindAuth:
		return "auth"
	case KindAdmin:
		return "admin"
	}
	return "unknown"
}

// maxSeconds bounds a delay or duration a device may ask for (one hour).
const maxSeconds = 3600

// Spec is one parsed fault request.
type Spec struct {
	// Type is the fault type as the device sent it (matched case-insensitively).
	Type        string
	Kind        Kind
	CloseReason string
	Delay       time.Duration
	Duration    time.Duration
}

// ErrUnknownType is returned by Parse for a fault type hubsim does not know.
var ErrUnknownType = errors.New("unknown fault operation type")

// kindOf classifies a fault type, case-insensitively.
func kindOf(t string) (Kind, bool) {
	l := strings.ToLower(t)
	switch {
	case l == "shutdownmqtt" || l == "shutdownamqp":
		return KindShutdown, true
	case l == "killtcp" || strings.HasPrefix(l, "killamqp"):
		return KindKill, true
	case l == "invokethrottling" || l == "throttlingerror":
		return KindThrottle, true
	case l == "invokemaxmessagequota" || l == "quotaexceeded":
		return KindQuota, true
	case l == "invokeautherror" || l == "autherror":
		return KindAuth, true
	}
	return 0, false
}

// Parse reads the fault properties through get (an application property lookup). ok is false
// when the message carries no fault type; an error names the property that is malformed.
// Delay and duration may be written as integers or decimals ("2", "1.5").
func Parse(get func(key string) (string, bool)) (s Spec, ok bool, err error) {
	t, has := get(PropType)
	if !has {
		return Spec{}, false, nil
	}
	t = strings.TrimSpace(t)
	k, known := kindOf(t)
	if !known {
		return Spec{Type: t}, true, fmt.Errorf("%w %q", ErrUnknownType, t)
	}
	s = Spec{Type: t, Kind: k}
	s.CloseReason, _ = get(PropCloseReason)
	if s.Delay, err = seconds(get, PropDelay); err != nil {
		return s, true, err
	}
	if s.Duration, err = seconds(get, PropDuration); err != nil {
		return s, true, err
	}
	return s, true, nil
}

func seconds(get func(string) (string, bool), key string) (time.Duration, error) {
	v, ok := get(key)
	v = strings.TrimSpace(v)
	if !ok || v == "" {
		return 0, nil
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || math.IsNaN(f) || f < 0 || f > maxSeconds {
		return 0, fmt.Errorf("%s %q: not a number of seconds between 0 and %d", key, v, maxSeconds)
	}
	return time.Duration(f * float64(time.Second)), nil
}

// Record is one applied (or refused) fault in the log.
type Record struct {
	Time     time.Time `json:"time"`
	DeviceID string    `json:"deviceId"`
	Type     string    `json:"type"`
	Kind     string    `json:"kind"`
	Action   string    `json:"action"`
	Reason   string    `json:"reason,omitempty"`
}

// Active is a fault window still open.
type Active struct {
	DeviceID string    `json:"deviceId"`
	Type     string    `json:"type"`
	Kind     string    `json:"kind"`
	Until    time.Time `json:"until"`
}

// Status is a snapshot: open windows, counters by fault type and action, and the recent log.
type Status struct {
	Active   []Active         `json:"active"`
	Rules    []Rule           `json:"rules"`
	Counters map[string]int64 `json:"counters"`
	Log      []Record         `json:"log"`
}

// logLimit bounds the records kept.
const logLimit = 512

type window struct {
	spec  Spec
	until time.Time
}

// Injector schedules and records faults. Its zero value is not usable: call New.
type Injector struct {
	clk clock.Clock
	log *zap.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	windows  map[string][]window
	counters map[string]int64
	records  []Record
	closed   bool
	rules    []*Rule
	nextID   int
	conns    Conns
}

// New returns an Injector on clk; Close stops its timers.
func New(clk clock.Clock, log *zap.Logger) *Injector {
	if clk == nil {
		clk = clock.Real()
	}
	if log == nil {
		log = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Injector{clk: clk, log: log, ctx: ctx, cancel: cancel,
		windows: make(map[string][]window), counters: make(map[string]int64)}
}

// Schedule applies spec to deviceID after spec.Delay: apply runs on the Injector's own
// goroutine (it must not block for long) and describes what it did; the fault is then logged
// and counted. For Invoke* faults a window of spec.Duration opens when the fault starts.
// Schedule does nothing after Close.
func (in *Injector) Schedule(deviceID string, spec Spec, apply func(Spec) (action string)) {
	in.mu.Lock()
	if in.closed {
		in.mu.Unlock()
		return
	}
	in.wg.Add(1)
	in.mu.Unlock()
	in.count(spec.Type, "requested")
	in.log.Info("fault requested", zap.String("device_id", deviceID), zap.String("type", spec.Type),
		zap.Duration("delay", spec.Delay), zap.Duration("duration", spec.Duration))
	t := in.clk.NewTimer(spec.Delay)
	go func() {
		defer in.wg.Done()
		defer t.Stop()
		select {
		case <-in.ctx.Done():
			return
		case <-t.C():
		}
		if spec.Duration > 0 && spec.Kind >= KindThrottle && spec.Kind <= KindAuth {
			in.mu.Lock()
			in.windows[deviceID] = append(in.windows[deviceID], window{spec: spec, until: in.clk.Now().Add(spec.Duration)})
			in.mu.Unlock()
		}
		action := apply(spec)
		in.Note(deviceID, spec, action)
	}()
}

// Note logs and counts a fault action taken for deviceID.
func (in *Injector) Note(deviceID string, spec Spec, action string) {
	r := Record{Time: in.clk.Now().UTC(), DeviceID: deviceID, Type: spec.Type, Kind: spec.Kind.String(), Action: action, Reason: spec.CloseReason}
	in.log.Info("fault injected", zap.String("device_id", deviceID), zap.String("type", spec.Type),
		zap.String("action", action), zap.String("close_reason", spec.CloseReason))
	in.mu.Lock()
	in.records = append(in.records, r)
	if len(in.records) > logLimit {
		in.records = append(in.records[:0:0], in.records[len(in.records)-logLimit:]...)
	}
	in.counters[spec.Type+"/"+action]++
	in.mu.Unlock()
}

func (in *Injector) count(typ, what string) {
	in.mu.Lock()
	in.counters[typ+"/"+what]++
	in.mu.Unlock()
}

// ActiveFor returns the open window of the given kind for deviceID, if any; expired windows
// are dropped.
func (in *Injector) ActiveFor(deviceID string, k Kind) (Spec, bool) {
	now := in.clk.Now()
	in.mu.Lock()
	defer in.mu.Unlock()
	ws := in.windows[deviceID]
	kept := ws[:0]
	var found Spec
	ok := false
	for _, w := range ws {
		if !now.Before(w.until) {
			continue
		}
		kept = append(kept, w)
		if w.spec.Kind == k && !ok {
			found, ok = w.spec, true
		}
	}
	if len(kept) == 0 {
		delete(in.windows, deviceID)
	} else {
		in.windows[deviceID] = kept
	}
	return found, ok
}

// Status returns a snapshot for GET /hubsim/faults.
func (in *Injector) Status() Status {
	now := in.clk.Now()
	in.mu.Lock()
	defer in.mu.Unlock()
	st := Status{Active: []Active{}, Rules: in.rulesLocked(now), Counters: make(map[string]int64, len(in.counters)), Log: append([]Record{}, in.records...)}
	for id, ws := range in.windows {
		for _, w := range ws {
			if now.Before(w.until) {
				st.Active = append(st.Active, Active{DeviceID: id, Type: w.spec.Type, Kind: w.spec.Kind.String(), Until: w.until.UTC()})
			}
		}
	}
	sort.Slice(st.Active, func(i, j int) bool {
		if st.Active[i].DeviceID != st.Active[j].DeviceID {
			return st.Active[i].DeviceID < st.Active[j].DeviceID
		}
		return st.Active[i].Until.Before(st.Active[j].Until)
	})
	for k, v := range in.counters {
		st.Counters[k] = v
	}
	return st
}

// Close stops pending faults and waits for their goroutines.
func (in *Injector) Close() {
	in.mu.Lock()
	in.closed = true
	for _, r := range in.rules {
		r.end() // stalled connections go on (to their close)
	}
	in.rules = nil
	in.mu.Unlock()
	in.cancel()
	in.wg.Wait()
}
