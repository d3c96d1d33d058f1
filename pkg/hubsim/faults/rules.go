package faults

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"
)

// Admin actions (POST /hubsim/faults). Every rule but drop and token-expire lasts DurationSecs;
// every random draw comes from the rule's own generator, seeded with Seed, so the same seed and
// the same sequence of events inject the same faults.
const (
	// ActionDrop closes the named device's connection (every device's, without deviceId) now.
	ActionDrop = "drop"
	// ActionRefuseConnect refuses CONNECTs with the given CONNACK return code for the duration,
	// each with the given probability drawn from a generator seeded with seed (reproducible).
	ActionRefuseConnect = "refuse-connect"
	// ActionPubackDelay holds the PUBACK of each telemetry publish (drawn with the probability)
	// for DelaySecs; the message is recorded at once.
	ActionPubackDelay = "puback-delay"
	// ActionPubackDrop never acknowledges a telemetry publish (drawn with the probability): the
	// publish is discarded unrecorded, as if it had not reached the hub, so the device must send
	// it again (after a reconnect).
	ActionPubackDrop = "puback-drop"
	// ActionRESTError answers service REST requests (optionally only those under PathPrefix or
	// with Method) with Code (429, 500 or 503), a Retry-After header and Azure's error body.
	ActionRESTError = "rest-error"
	// ActionRESTDelay holds service REST requests for DelaySecs before serving them.
	ActionRESTDelay = "rest-delay"
	// ActionDPSError answers DPS device registration requests (register and operation status,
	// over MQTT and HTTPS) with Code (429, 500 or 503) and a retry-after.
	ActionDPSError = "dps-error"
	// ActionDPSDelay holds DPS device registration requests for DelaySecs.
	ActionDPSDelay = "dps-delay"
	// ActionTokenExpire treats the device's SAS token as expiring DelaySecs from now: its
	// connection is then closed as at token expiry.
	ActionTokenExpire = "token-expire"
	// ActionStall stops reading from and writing to the device's open connection(s) for
	// DurationSecs; the connection stays open (a half-dead peer).
	ActionStall = "stall"
	// ActionC2DDuplicate delivers the next Count cloud-to-device messages to the device twice
	// (same message ID, a new packet ID).
	ActionC2DDuplicate = "c2d-duplicate"
)

// ReasonTokenExpire is the close reason of a connection ended by token-expire: the reason of a
// SAS token's own expiry, marked as injected. The fault log records it.
const ReasonTokenExpire = "SAS token expired (fault injected: token-expire)"

// Actions lists every admin action, in the order the docs describe them.
var actions = []string{ActionDrop, ActionRefuseConnect, ActionPubackDelay, ActionPubackDrop, ActionRESTError,
	ActionRESTDelay, ActionDPSError, ActionDPSDelay, ActionTokenExpire, ActionStall, ActionC2DDuplicate}

// Actions returns every admin action name.
func Actions() []string { return append([]string(nil), actions...) }

// RuleRequest is the body of POST /hubsim/faults.
type RuleRequest struct {
	Action string `json:"action"`
	// DeviceID limits the fault to one device (for dps-*, the registration ID); empty: every
	// device.
	DeviceID string `json:"deviceId,omitempty"`
	// Code is the CONNACK return code of refuse-connect (1 to 5; default 3, server unavailable)
	// or the HTTP status of rest-error and dps-error (429, 500 or 503; default 503).
	Code int `json:"code,omitempty"`
	// DurationSecs is how long the rule lasts (at most 3600; required but for drop and
	// token-expire; c2d-duplicate defaults to 3600).
	DurationSecs float64 `json:"durationSecs,omitempty"`
	// DelaySecs is the delay of puback-delay, rest-delay and dps-delay (required, at most 3600),
	// and when token-expire closes the connection (0 to 3600; default 0, now).
	DelaySecs float64 `json:"delaySecs,omitempty"`
	// RetryAfterSecs is the Retry-After of rest-error and dps-error (0 to 3600; default 1).
	RetryAfterSecs *int `json:"retryAfterSecs,omitempty"`
	// Probability that an event is faulted (0 < p ≤ 1; default 1).
	Probability float64 `json:"probability,omitempty"`
	// Seed of the rule's random generator (default 1).
	Seed uint64 `json:"seed,omitempty"`
	// PathPrefix limits rest-error and rest-delay to request paths starting with it.
	PathPrefix string `json:"pathPrefix,omitempty"`
	// Method limits rest-error and rest-delay to one HTTP method (GET, PUT, POST, PATCH, DELETE).
	Method string `json:"method,omitempty"`
	// Count is how many deliveries c2d-duplicate duplicates (1 to 1000; default 1).
	Count int `json:"count,omitempty"`
}

// Rule is an admin fault in force (or, for drop, the record of one done).
type Rule struct {
	ID       int    `json:"id"`
	Action   string `json:"action"`
	DeviceID string `json:"deviceId,omitempty"`
	// Code: CONNACK return code, HTTP status, or for drop the number of connections closed.
	Code  int       `json:"code,omitempty"`
	Until time.Time `json:"until"`
	// Probability and Seed of the rule's draws.
	Probability    float64 `json:"probability"`
	Seed           uint64  `json:"seed"`
	DelaySecs      float64 `json:"delaySecs,omitempty"`
	RetryAfterSecs int     `json:"retryAfterSecs,omitempty"`
	PathPrefix     string  `json:"pathPrefix,omitempty"`
	Method         string  `json:"method,omitempty"`
	// Count: deliveries c2d-duplicate still duplicates; connections stall stalled.
	Count int `json:"count,omitempty"`

	rng     *rand.Rand
	release chan struct{} // stall: closed when the stall ends
}

// ErrBadRule is returned for an invalid RuleRequest.
var ErrBadRule = errors.New("invalid fault request")

// Conns is what admin faults do to device connections (the device endpoint implements it).
// Each function acts on deviceID's connection, or on every connection for "", and returns how
// many connections it acted on.
type Conns interface {
	// Drop closes the connection now.
	Drop(deviceID string) int
	// ExpireToken closes the connection as the hub does when its SAS token expires.
	ExpireToken(deviceID string) int
	// Stall stops reading from and writing to the connection until release is closed.
	Stall(deviceID string, release <-chan struct{}) int
}

// dropOnly adapts a drop function to Conns.
type dropOnly func(string) int

func (d dropOnly) Drop(id string) int              { return d(id) }
func (dropOnly) ExpireToken(string) int            { return 0 }
func (dropOnly) Stall(string, <-chan struct{}) int { return 0 }

// SetConns gives the Injector what acts on connections. Call it before serving the admin API.
func (in *Injector) SetConns(c Conns) {
	in.mu.Lock()
	in.conns = c
	in.mu.Unlock()
}

// SetDropper is SetConns for a device endpoint that can only drop connections.
func (in *Injector) SetDropper(drop func(deviceID string) int) { in.SetConns(dropOnly(drop)) }

func secs(f float64) time.Duration { return time.Duration(f * float64(time.Second)) }

func badf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrBadRule}, args...)...)
}

// validate checks req for its action and fills in defaults.
func validate(req *RuleRequest) error {
	a := req.Action
	if !containsString(actions, a) {
		return badf("action %q (want one of %s)", a, strings.Join(actions, ", "))
	}
	inRange := func(v float64, lo float64, loOpen bool) bool {
		if math.IsNaN(v) || v > maxSeconds {
			return false
		}
		if loOpen {
			return v > lo
		}
		return v >= lo
	}
	is := func(names ...string) bool { return containsString(names, a) }
	// Fields that do not apply to the action are refused, so a typo'd intent fails loudly.
	if req.Code != 0 && !is(ActionRefuseConnect, ActionRESTError, ActionDPSError) {
		return badf("code does not apply to %s", a)
	}
	if req.DelaySecs != 0 && !is(ActionPubackDelay, ActionRESTDelay, ActionDPSDelay, ActionTokenExpire) {
		return badf("delaySecs does not apply to %s", a)
	}
	if req.RetryAfterSecs != nil && !is(ActionRESTError, ActionDPSError) {
		return badf("retryAfterSecs does not apply to %s", a)
	}
	if (req.PathPrefix != "" || req.Method != "") && !is(ActionRESTError, ActionRESTDelay) {
		return badf("pathPrefix and method apply to rest-error and rest-delay only")
	}
	if req.Count != 0 && a != ActionC2DDuplicate {
		return badf("count does not apply to %s", a)
	}
	if req.DurationSecs != 0 && is(ActionDrop, ActionTokenExpire) {
		return badf("durationSecs does not apply to %s", a)
	}
	if (req.Probability != 0 || req.Seed != 0) && is(ActionDrop, ActionTokenExpire, ActionStall) {
		return badf("probability and seed do not apply to %s", a)
	}
	switch a {
	case ActionDrop, ActionTokenExpire:
	case ActionC2DDuplicate:
		if req.DurationSecs == 0 {
			req.DurationSecs = maxSeconds
		}
		fallthrough
	default:
		if !inRange(req.DurationSecs, 0, true) {
			return badf("durationSecs must be in (0, %d]", maxSeconds)
		}
	}
	switch a {
	case ActionRefuseConnect:
		if req.Code == 0 {
			req.Code = 3
		}
		if req.Code < 1 || req.Code > 5 {
			return badf("code %d: CONNACK return codes are 1 to 5", req.Code)
		}
	case ActionRESTError, ActionDPSError:
		if req.Code == 0 {
			req.Code = http.StatusServiceUnavailable
		}
		if req.Code != http.StatusTooManyRequests && req.Code != http.StatusInternalServerError && req.Code != http.StatusServiceUnavailable {
			return badf("code %d: want 429, 500 or 503", req.Code)
		}
		if req.RetryAfterSecs == nil {
			one := 1
			req.RetryAfterSecs = &one
		}
		if ra := *req.RetryAfterSecs; ra < 0 || ra > maxSeconds {
			return badf("retryAfterSecs %d: want 0 to %d", ra, maxSeconds)
		}
	case ActionPubackDelay, ActionRESTDelay, ActionDPSDelay:
		if !inRange(req.DelaySecs, 0, true) {
			return badf("delaySecs must be in (0, %d]", maxSeconds)
		}
	case ActionTokenExpire:
		if !inRange(req.DelaySecs, 0, false) {
			return badf("delaySecs must be in [0, %d]", maxSeconds)
		}
	case ActionC2DDuplicate:
		if req.Count == 0 {
			req.Count = 1
		}
		if req.Count < 1 || req.Count > 1000 {
			return badf("count %d: want 1 to 1000", req.Count)
		}
	}
	if req.PathPrefix != "" && !strings.HasPrefix(req.PathPrefix, "/") {
		return badf("pathPrefix %q must start with /", req.PathPrefix)
	}
	if req.Method != "" {
		req.Method = strings.ToUpper(req.Method)
		switch req.Method {
		case http.MethodGet, http.MethodPut, http.MethodPost, http.MethodPatch, http.MethodDelete:
		default:
			return badf("method %q: want GET, PUT, POST, PATCH or DELETE", req.Method)
		}
	}
	if !is(ActionDrop, ActionTokenExpire, ActionStall) {
		if req.Probability == 0 {
			req.Probability = 1
		}
		if !(req.Probability > 0 && req.Probability <= 1) {
			return badf("probability must be in (0, 1]")
		}
		if req.Seed == 0 {
			req.Seed = 1
		}
	}
	if len(req.DeviceID) > 128 {
		return badf("deviceId is longer than 128 characters")
	}
	return nil
}

func containsString(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Apply carries out an admin fault request: a drop happens now, a token-expire is scheduled,
// a stall starts now and every other rule is kept for its duration. It returns the rule (for a
// drop, with Code the number of connections closed).
func (in *Injector) Apply(req RuleRequest) (Rule, error) {
	if err := validate(&req); err != nil {
		return Rule{}, err
	}
	in.mu.Lock()
	if in.closed {
		in.mu.Unlock()
		return Rule{}, errors.New("hubsim is shutting down")
	}
	conns := in.conns
	in.nextID++
	now := in.clk.Now()
	r := &Rule{ID: in.nextID, Action: req.Action, DeviceID: req.DeviceID, Code: req.Code,
		Until: now.Add(secs(req.DurationSecs)).UTC(), Probability: req.Probability, Seed: req.Seed,
		DelaySecs: req.DelaySecs, PathPrefix: req.PathPrefix, Method: req.Method, Count: req.Count}
	if req.RetryAfterSecs != nil {
		r.RetryAfterSecs = *req.RetryAfterSecs
	}
	if req.Seed != 0 {
		r.rng = rand.New(rand.NewPCG(req.Seed, uint64(r.ID)))
	}
	switch req.Action {
	case ActionDrop:
		in.mu.Unlock()
		n := 0
		if conns != nil {
			n = conns.Drop(req.DeviceID)
		}
		in.Note(orAll(req.DeviceID), adminSpec(ActionDrop), fmt.Sprintf("dropped %d", n))
		r.Code, r.Until = n, now.UTC()
		return *r, nil
	case ActionTokenExpire:
		r.Until = now.Add(secs(req.DelaySecs)).UTC()
		in.rules = append(in.rules, r)
		in.counters[adminType(req.Action)+"/added"]++
		in.mu.Unlock()
		in.after(secs(req.DelaySecs), func() {
			if !in.removeRule(r) {
				return // cleared before it fired
			}
			// Noted before the connections close, so that whoever sees a close sees its record.
			in.Note(orAll(req.DeviceID), Spec{Type: adminType(ActionTokenExpire), Kind: KindAdmin, CloseReason: ReasonTokenExpire}, "token-expired")
			if conns != nil {
				conns.ExpireToken(req.DeviceID)
			}
		})
		return r.public(), nil
	case ActionStall:
		r.release = make(chan struct{})
		in.rules = append(in.rules, r)
		in.counters[adminType(req.Action)+"/added"]++
		in.mu.Unlock()
		n := 0
		if conns != nil {
			n = conns.Stall(req.DeviceID, r.release)
		}
		in.mu.Lock()
		r.Count = n
		in.mu.Unlock()
		in.Note(orAll(req.DeviceID), adminSpec(ActionStall), fmt.Sprintf("stalled %d", n))
		in.after(secs(req.DurationSecs), func() {
			if in.removeRule(r) {
				in.Note(orAll(req.DeviceID), adminSpec(ActionStall), fmt.Sprintf("released %d", n))
			}
		})
		return r.public(), nil
	}
	in.rules = append(in.rules, r)
	in.counters[adminType(req.Action)+"/added"]++
	out := r.public()
	in.mu.Unlock()
	return out, nil
}

// public is a copy of r without its private state. Call with in.mu held (Count changes).
func (r *Rule) public() Rule {
	c := *r
	c.rng, c.release = nil, nil
	return c
}

func adminType(action string) string { return "admin:" + action }

func adminSpec(action string) Spec { return Spec{Type: adminType(action), Kind: KindAdmin} }

// removeRule takes r out of the rules in force (a stall is released) and reports whether it was
// still there.
func (in *Injector) removeRule(r *Rule) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	for i, x := range in.rules {
		if x == r {
			in.rules = append(in.rules[:i], in.rules[i+1:]...)
			r.end()
			return true
		}
	}
	return false
}

// end releases what a rule holds (a stall's connections). Call with in.mu held, once.
func (r *Rule) end() {
	if r.release != nil {
		close(r.release)
	}
}

// after runs f after d on the Injector's clock, on a goroutine the Injector owns; f does not
// run once the Injector is closed.
func (in *Injector) after(d time.Duration, f func()) {
	in.mu.Lock()
	if in.closed {
		in.mu.Unlock()
		return
	}
	in.wg.Add(1)
	in.mu.Unlock()
	t := in.clk.NewTimer(d)
	go func() {
		defer in.wg.Done()
		defer t.Stop()
		select {
		case <-in.ctx.Done():
		case <-t.C():
			f()
		}
	}()
}

// Sleep waits d on the Injector's clock. It returns early with an error when ctx is done or the
// Injector closes (hubsim is stopping).
func (in *Injector) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := in.clk.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C():
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-in.ctx.Done():
		return errors.New("hubsim is shutting down")
	}
}

func orAll(id string) string {
	if id == "" {
		return "*"
	}
	return id
}

// ClearRules ends every admin rule (stalls are released, pending token expiries cancelled) and
// every open fault window.
func (in *Injector) ClearRules() int {
	in.mu.Lock()
	defer in.mu.Unlock()
	n := len(in.rules) + len(in.windows)
	for _, r := range in.rules {
		r.end()
	}
	in.rules = nil
	clear(in.windows)
	return n
}

// draw returns the first rule in force of one of the actions that applies (match) and whose
// draw hits, dropping expired rules. Every applicable rule draws, in order, until one hits, so
// the same events draw the same numbers. Call with in.mu held.
func (in *Injector) drawLocked(match func(*Rule) bool, actions ...string) *Rule {
	now := in.clk.Now()
	kept := in.rules[:0]
	var hit *Rule
	for _, r := range in.rules {
		if !now.Before(r.Until) && r.Action != ActionTokenExpire {
			r.end()
			continue
		}
		kept = append(kept, r)
		if hit != nil || !containsString(actions, r.Action) || !match(r) {
			continue
		}
		if r.rng == nil || r.rng.Float64() < r.Probability {
			hit = r
		}
	}
	clear(in.rules[len(kept):])
	in.rules = kept
	return hit
}

func forDevice(deviceID string) func(*Rule) bool {
	return func(r *Rule) bool { return r.DeviceID == "" || r.DeviceID == deviceID }
}

// ConnectRefusal decides whether deviceID's CONNECT is refused by a fault: an open
// InvokeAuthError window (code 5) or a refuse-connect rule that draws this CONNECT. The
// refusal is logged and counted.
func (in *Injector) ConnectRefusal(deviceID string) (code int, reason string, refused bool) {
	if spec, ok := in.ActiveFor(deviceID, KindAuth); ok {
		in.Note(deviceID, spec, "connect-refused")
		return 5, "fault injected: " + spec.Type, true
	}
	in.mu.Lock()
	hit := in.drawLocked(forDevice(deviceID), ActionRefuseConnect)
	var id int
	if hit != nil {
		code, id = hit.Code, hit.ID
	}
	in.mu.Unlock()
	if hit == nil {
		return 0, "", false
	}
	in.Note(deviceID, adminSpec(ActionRefuseConnect), fmt.Sprintf("connect-refused %d", code))
	return code, fmt.Sprintf("fault injected: refuse-connect rule %d", id), true
}

// PubackFault decides what happens to the PUBACK of a telemetry publish from deviceID: drop
// (never sent, the message discarded) or a delay (0: none). A fault is logged and counted.
func (in *Injector) PubackFault(deviceID string) (delay time.Duration, drop bool) {
	in.mu.Lock()
	hit := in.drawLocked(forDevice(deviceID), ActionPubackDrop, ActionPubackDelay)
	if hit != nil {
		delay = secs(hit.DelaySecs)
		drop = hit.Action == ActionPubackDrop
	}
	in.mu.Unlock()
	switch {
	case hit == nil:
	case drop:
		in.Note(deviceID, adminSpec(ActionPubackDrop), "puback-dropped")
	default:
		in.Note(deviceID, adminSpec(ActionPubackDelay), "puback-delayed")
	}
	return delay, drop
}

// HTTPFault is an error or delay to inject into a request.
type HTTPFault struct {
	// Status is the error status to answer (0: no error); RetryAfter its Retry-After seconds.
	Status, RetryAfter int
	// Delay is how long to hold the request first.
	Delay time.Duration
}

// RESTFault decides the fault of a service REST request (method, escaped path, and the device
// ID it addresses, "" if none). A fault is logged and counted.
func (in *Injector) RESTFault(method, path, deviceID string) (f HTTPFault) {
	match := func(r *Rule) bool {
		return (r.DeviceID == "" || r.DeviceID == deviceID) &&
			(r.Method == "" || r.Method == method) && strings.HasPrefix(path, r.PathPrefix)
	}
	return in.httpFault(match, orAll(deviceID), ActionRESTDelay, ActionRESTError)
}

// DPSFault decides the fault of a DPS device registration request (register or operation
// status) for registrationID. A fault is logged and counted.
func (in *Injector) DPSFault(registrationID string) HTTPFault {
	return in.httpFault(forDevice(registrationID), registrationID, ActionDPSDelay, ActionDPSError)
}

func (in *Injector) httpFault(match func(*Rule) bool, who, delayAction, errorAction string) (f HTTPFault) {
	in.mu.Lock()
	d := in.drawLocked(match, delayAction)
	e := in.drawLocked(match, errorAction)
	if d != nil {
		f.Delay = secs(d.DelaySecs)
	}
	if e != nil {
		f.Status, f.RetryAfter = e.Code, e.RetryAfterSecs
	}
	in.mu.Unlock()
	if d != nil {
		in.Note(who, adminSpec(delayAction), "delayed")
	}
	if e != nil {
		in.Note(who, adminSpec(errorAction), fmt.Sprintf("answered %d", f.Status))
	}
	return f
}

// C2DDuplicate reports whether the cloud-to-device delivery about to be made to deviceID is to
// be made twice. It takes one from the first c2d-duplicate rule that draws it.
func (in *Injector) C2DDuplicate(deviceID, messageID string) bool {
	in.mu.Lock()
	hit := in.drawLocked(func(r *Rule) bool { return forDevice(deviceID)(r) && r.Count > 0 }, ActionC2DDuplicate)
	if hit != nil {
		hit.Count--
		if hit.Count == 0 {
			in.removeLocked(hit)
		}
	}
	in.mu.Unlock()
	if hit == nil {
		return false
	}
	in.Note(deviceID, Spec{Type: adminType(ActionC2DDuplicate), Kind: KindAdmin, CloseReason: "message-id " + messageID}, "duplicated")
	return true
}

func (in *Injector) removeLocked(r *Rule) {
	for i, x := range in.rules {
		if x == r {
			in.rules = append(in.rules[:i], in.rules[i+1:]...)
			r.end()
			return
		}
	}
}

// rulesLocked lists the rules in force.
func (in *Injector) rulesLocked(now time.Time) []Rule {
	out := []Rule{}
	for _, r := range in.rules {
		if now.Before(r.Until) || r.Action == ActionTokenExpire {
			out = append(out, r.public())
		}
	}
	return out
}

// AfterDelay runs f after d on the Injector's clock, on a goroutine the Injector owns (a
// delayed PUBACK); f does not run once the Injector is closed.
func (in *Injector) AfterDelay(d time.Duration, f func()) { in.after(d, f) }
