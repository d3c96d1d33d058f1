package faults

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// Admin actions (POST /hubsim/faults).
const (
	// ActionDrop closes the named device's connection (every device's, without deviceId) now.
	ActionDrop = "drop"
	// ActionRefuseConnect refuses CONNECTs with the given CONNACK return code for the duration,
	// each with the given probability drawn from a generator seeded with seed (reproducible).
	ActionRefuseConnect = "refuse-connect"
)

// RuleRequest is the body of POST /hubsim/faults.
type RuleRequest struct {
	Action string `json:"action"`
	// DeviceID limits the fault to one device; empty: every device.
	DeviceID string `json:"deviceId,omitempty"`
	// Code is the CONNACK return code of refuse-connect (1 to 5; default 3, server unavailable).
	Code int `json:"code,omitempty"`
	// DurationSecs is how long a refuse-connect rule lasts (required, at most 3600).
	DurationSecs float64 `json:"durationSecs,omitempty"`
	// Probability that a CONNECT is refused (0 < p ≤ 1; default 1).
	Probability float64 `json:"probability,omitempty"`
	// Seed of the rule's random generator (default 1).
	Seed uint64 `json:"seed,omitempty"`
}

// Rule is an admin fault in force.
type Rule struct {
	ID          int       `json:"id"`
	Action      string    `json:"action"`
	DeviceID    string    `json:"deviceId,omitempty"`
	Code        int       `json:"code,omitempty"`
	Until       time.Time `json:"until"`
	Probability float64   `json:"probability"`
	Seed        uint64    `json:"seed"`

	rng *rand.Rand
}

// ErrBadRule is returned for an invalid RuleRequest.
var ErrBadRule = errors.New("invalid fault request")

// SetDropper gives the Injector the function that closes connections for ActionDrop: it
// closes deviceID's connection (every connection for "") and returns how many it closed.
// Call it before serving the admin API.
func (in *Injector) SetDropper(drop func(deviceID string) int) {
	in.mu.Lock()
	in.drop = drop
	in.mu.Unlock()
}

// Apply carries out an admin fault request: a drop happens now, a refuse-connect rule is
// kept for its duration. It returns the rule (for a drop, with Code the number dropped).
func (in *Injector) Apply(req RuleRequest) (Rule, error) {
	switch req.Action {
	case ActionDrop:
		in.mu.Lock()
		drop := in.drop
		in.nextID++
		id := in.nextID
		in.mu.Unlock()
		n := 0
		if drop != nil {
			n = drop(req.DeviceID)
		}
		in.Note(orAll(req.DeviceID), Spec{Type: "admin:" + ActionDrop}, fmt.Sprintf("dropped %d", n))
		return Rule{ID: id, Action: ActionDrop, DeviceID: req.DeviceID, Code: n, Until: in.clk.Now().UTC()}, nil
	case ActionRefuseConnect:
		if req.Code == 0 {
			req.Code = 3
		}
		if req.Code < 1 || req.Code > 5 {
			return Rule{}, fmt.Errorf("%w: code %d: CONNACK return codes are 1 to 5", ErrBadRule, req.Code)
		}
		if !(req.DurationSecs > 0 && req.DurationSecs <= maxSeconds) {
			return Rule{}, fmt.Errorf("%w: durationSecs must be in (0, %d]", ErrBadRule, maxSeconds)
		}
		if req.Probability == 0 {
			req.Probability = 1
		}
		if !(req.Probability > 0 && req.Probability <= 1) {
			return Rule{}, fmt.Errorf("%w: probability must be in (0, 1]", ErrBadRule)
		}
		if req.Seed == 0 {
			req.Seed = 1
		}
		in.mu.Lock()
		defer in.mu.Unlock()
		in.nextID++
		r := Rule{ID: in.nextID, Action: req.Action, DeviceID: req.DeviceID, Code: req.Code,
			Until:       in.clk.Now().Add(time.Duration(req.DurationSecs * float64(time.Second))).UTC(),
			Probability: req.Probability, Seed: req.Seed, rng: rand.New(rand.NewPCG(req.Seed, uint64(in.nextID)))}
		in.rules = append(in.rules, &r)
		in.counters["admin:"+ActionRefuseConnect+"/added"]++
		return r, nil
	}
	return Rule{}, fmt.Errorf("%w: action %q (want %q or %q)", ErrBadRule, req.Action, ActionDrop, ActionRefuseConnect)
}

func orAll(id string) string {
	if id == "" {
		return "*"
	}
	return id
}

// ClearRules ends every admin rule and every open fault window.
func (in *Injector) ClearRules() int {
	in.mu.Lock()
	defer in.mu.Unlock()
	n := len(in.rules) + len(in.windows)
	in.rules = nil
	clear(in.windows)
	return n
}

// ConnectRefusal decides whether deviceID's CONNECT is refused by a fault: an open
// InvokeAuthError window (code 5) or a refuse-connect rule that draws this CONNECT. The
// refusal is logged and counted.
func (in *Injector) ConnectRefusal(deviceID string) (code int, reason string, refused bool) {
	if spec, ok := in.ActiveFor(deviceID, KindAuth); ok {
		in.Note(deviceID, spec, "connect-refused")
		return 5, "fault injected: " + spec.Type, true
	}
	now := in.clk.Now()
	in.mu.Lock()
	kept := in.rules[:0]
	var hit *Rule
	for _, r := range in.rules {
		if !now.Before(r.Until) {
			continue
		}
		kept = append(kept, r)
		if hit == nil && (r.DeviceID == "" || r.DeviceID == deviceID) && r.rng.Float64() < r.Probability {
			hit = r
		}
	}
	clear(in.rules[len(kept):])
	in.rules = kept
	in.mu.Unlock()
	if hit == nil {
		return 0, "", false
	}
	in.Note(deviceID, Spec{Type: "admin:" + ActionRefuseConnect}, fmt.Sprintf("connect-refused %d", hit.Code))
	return hit.Code, fmt.Sprintf("fault injected: refuse-connect rule %d", hit.ID), true
}

// rulesLocked lists the rules in force.
func (in *Injector) rulesLocked(now time.Time) []Rule {
	out := []Rule{}
	for _, r := range in.rules {
		if now.Before(r.Until) {
			c := *r
			c.rng = nil
			out = append(out, c)
		}
	}
	return out
}
