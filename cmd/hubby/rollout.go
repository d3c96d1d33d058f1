package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// A canary rollout sets desired properties on a fleet in steps, and goes on only while the
// devices acknowledge them.
//
// State in the hub (nothing on the machine running hubby, so that any hubby can resume):
//
//   - The rollout's record is the twin of a device identity of its own, hubby-rollout-<name>
//     (created disabled, so nothing connects as it), in tags.hubbyRollout: the spec (query,
//     patch, steps, threshold, timeout, revert), the state (running, completed, stopped,
//     reverted), the step in progress and when it started, and each finished step's counts.
//   - Each device in the rollout carries tags.hubbyRollouts.<name> = {step, prev, v}: the step
//     that patched it, its desired values before (a JSON string, for --revert) and the desired
//     $version the patch produced (what the device's Plug and Play ack must carry as av).
//
// A device succeeds when, for every patched property, reported.<path> is {"ac":200,"av":>=v}
// with the desired value (or, with --expect, when reported.<path> equals the expected value);
// it fails when it acknowledges with ac >= 400, or when the step's --ack-timeout passes first.
// After each step the failure rate over every device patched so far is compared with
// --max-failure; above it the rollout stops (and with --revert puts back the previous values).
// A rollout killed at any point resumes with `hubby rollout resume NAME`: devices already
// patched are not patched again, the step's deadline is kept from the record.

const (
	recordPrefix = "hubby-rollout-"
	recordTag    = "hubbyRollout"
	deviceTag    = "hubbyRollouts"
)

// rolloutName keeps names usable as a tag key inside a query path (no "-", which would parse as
// a minus).
var rolloutName = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]{0,63}$`)

// rolloutRecord is tags.hubbyRollout of the record's twin.
type rolloutRecord struct {
	Name       string `json:"name"`
	Query      string `json:"query"`
	Canary     string `json:"canary,omitempty"`
	Desired    string `json:"desired"`          // JSON object: path -> value
	Expect     string `json:"expect,omitempty"` // JSON object: reported path -> value
	Steps      string `json:"steps"`            // "1,10%,100%"
	MaxFailure string `json:"maxFailure"`       // "10%" or a count
	AckTimeout string `json:"ackTimeout"`       // Go duration
	Revert     bool   `json:"revert"`

	// State, Reason and StepStartedAt are always sent (a tag patch merges: an omitted field
	// would keep its old value).
	State         string                `json:"state"` // running, completed, stopped, reverted
	Reason        string                `json:"reason"`
	Step          int                   `json:"step"`
	StepStartedAt string                `json:"stepStartedAt"`
	Results       map[string]stepResult `json:"results,omitempty"` // by step index
	StartedAt     string                `json:"startedAt"`
	UpdatedAt     string                `json:"updatedAt"`
}

// stepResult counts a finished step's devices.
type stepResult struct {
	Devices   int `json:"devices"`
	Succeeded int `json:"succeeded"`
	Failed    int `json:"failed"`
	TimedOut  int `json:"timedOut"`
}

// deviceMark is tags.hubbyRollouts.<name> on a device.
type deviceMark struct {
	Step     int    `json:"step"`
	Prev     string `json:"prev"`
	V        int64  `json:"v,omitempty"`
	Reverted bool   `json:"reverted,omitempty"`
}

// rollout is a rollout being run or inspected.
type rollout struct {
	g   *globals
	c   *service.Client
	rec rolloutRecord

	desired map[string]any // path -> value
	expect  map[string]any // reported path -> value
	steps   []stepSize
	maxFail stepSize
	timeout time.Duration
	poll    time.Duration
	par     int
}

// stepSize is a count or a percentage.
type stepSize struct {
	n   int
	pct float64
}

func parseSize(s string) (stepSize, error) {
	s = strings.TrimSpace(s)
	if p, ok := strings.CutSuffix(s, "%"); ok {
		f, err := strconv.ParseFloat(p, 64)
		if err != nil || f < 0 || f > 100 || math.IsNaN(f) {
			return stepSize{}, fmt.Errorf("%q is not a percentage from 0%% to 100%%", s)
		}
		return stepSize{pct: f, n: -1}, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return stepSize{}, fmt.Errorf("%q is not a count or a percentage", s)
	}
	return stepSize{n: n}, nil
}

// of is the size applied to total (percentages round up).
func (z stepSize) of(total int) int {
	if z.n >= 0 {
		return min(z.n, total)
	}
	return min(int(math.Ceil(z.pct*float64(total)/100-1e-9)), total)
}

func (z stepSize) String() string {
	if z.n >= 0 {
		return strconv.Itoa(z.n)
	}
	return strconv.FormatFloat(z.pct, 'f', -1, 64) + "%"
}

// load parses the record's spec.
func (r *rollout) load() error {
	if err := json.Unmarshal([]byte(r.rec.Desired), &r.desired); err != nil || len(r.desired) == 0 {
		return fmt.Errorf("rollout %s: record's desired is not a JSON object of properties", r.rec.Name)
	}
	r.expect = nil
	if r.rec.Expect != "" {
		if err := json.Unmarshal([]byte(r.rec.Expect), &r.expect); err != nil {
			return fmt.Errorf("rollout %s: record's expect: %v", r.rec.Name, err)
		}
	}
	r.steps = nil
	prev := -1.0
	for _, s := range strings.Split(r.rec.Steps, ",") {
		z, err := parseSize(s)
		if err != nil {
			return usageError{fmt.Errorf("--steps: %v", err)}
		}
		// compare on a common scale when both are of the same kind
		cur := float64(z.n)
		if z.n < 0 {
			cur = z.pct + 1e6
		}
		if cur < prev {
			return usageError{fmt.Errorf("--steps must not shrink: %s", r.rec.Steps)}
		}
		prev = cur
		r.steps = append(r.steps, z)
	}
	mf, err := parseSize(r.rec.MaxFailure)
	if err != nil {
		return usageError{fmt.Errorf("--max-failure: %v", err)}
	}
	r.maxFail = mf
	if r.timeout, err = time.ParseDuration(r.rec.AckTimeout); err != nil || r.timeout <= 0 {
		return usageError{fmt.Errorf("--ack-timeout %q is not a positive duration", r.rec.AckTimeout)}
	}
	return nil
}

func recordID(name string) string { return recordPrefix + name }

// readRecord reads a rollout's record; found is false when there is none.
func readRecord(ctx context.Context, c *service.Client, name string) (rec rolloutRecord, found bool, err error) {
	tw, err := c.GetTwin(ctx, recordID(name))
	if errors.Is(err, wire.ErrDeviceNotFound) {
		return rec, false, nil
	}
	if err != nil {
		return rec, false, err
	}
	raw, ok := tw.Tags[recordTag]
	if !ok {
		return rec, false, fmt.Errorf("device %s exists but is not a rollout record (no tags.%s)", recordID(name), recordTag)
	}
	b, _ := json.Marshal(raw)
	if err := json.Unmarshal(b, &rec); err != nil {
		return rec, false, fmt.Errorf("rollout record %s: %v", recordID(name), err)
	}
	return rec, true, nil
}

// save writes the record (the whole tag, replacing the previous one).
func (r *rollout) save(ctx context.Context) error {
	r.rec.UpdatedAt = time.Now().UTC().Format(time.RFC3339)
	var tag map[string]any
	b, _ := json.Marshal(r.rec)
	_ = json.Unmarshal(b, &tag)
	rctx, cancel := r.g.reqCtx(ctx)
	defer cancel()
	// null first clears keys the new record no longer has (results merge otherwise)
	_, err := r.c.UpdateTwin(rctx, recordID(r.rec.Name), map[string]any{"tags": map[string]any{recordTag: tag}}, "*")
	return err
}

// member is a device in the rollout's target set.
type member struct {
	id     string
	mark   *deviceMark
	twin   map[string]any // the whole twin as decoded JSON
	canary bool
}

// members lists the devices the query selects (the record devices excluded), canary devices
// first, then by device ID, each with its mark if it has one.
func (r *rollout) members(ctx context.Context) ([]member, error) {
	byID := map[string]*member{}
	collect := func(cond string, canary bool) error {
		return r.collect(ctx, cond, func(m *member) {
			if old := byID[m.id]; old != nil {
				m.canary = m.canary || old.canary
			}
			m.canary = m.canary || canary
			byID[m.id] = m
		})
	}
	if err := collect(r.rec.Query, false); err != nil {
		return nil, fmt.Errorf("query %q: %w", r.rec.Query, err)
	}
	if r.rec.Canary != "" {
		q := r.rec.Canary
		if t := strings.TrimSpace(r.rec.Query); t != "" && t != "*" {
			q = "(" + r.rec.Query + ") AND (" + r.rec.Canary + ")"
		}
		if err := collect(q, true); err != nil {
			return nil, fmt.Errorf("canary query %q: %w", q, err)
		}
	}
	out := make([]member, 0, len(byID))
	for _, m := range byID {
		out = append(out, *m)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].canary != out[j].canary {
			return out[i].canary
		}
		return out[i].id < out[j].id
	})
	return out, nil
}

// stepMembers lists the devices step patched (one query on their mark).
func (r *rollout) stepMembers(ctx context.Context, step int) ([]member, error) {
	var out []member
	cond := fmt.Sprintf("tags.%s.%s.step = %d", deviceTag, r.rec.Name, step)
	err := r.collect(ctx, cond, func(m *member) {
		if m.mark != nil && m.mark.Step == step {
			out = append(out, *m)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("query %q: %w", cond, err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].id < out[j].id })
	return out, nil
}

// marked lists every device the rollout patched, whether or not the query still selects it.
func (r *rollout) marked(ctx context.Context) ([]member, error) {
	var out []member
	cond := fmt.Sprintf("IS_DEFINED(tags.%s.%s)", deviceTag, r.rec.Name)
	err := r.collect(ctx, cond, func(m *member) {
		if m.mark != nil {
			out = append(out, *m)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("query %q: %w", cond, err)
	}
	return out, nil
}

// collect runs SELECT * FROM devices [WHERE cond] and hands each device (records excluded) with
// its mark to fn.
func (r *rollout) collect(ctx context.Context, cond string, fn func(*member)) error {
	{
		q := "SELECT * FROM devices"
		if c := strings.TrimSpace(cond); c != "" && c != "*" {
			q += " WHERE " + c
		}
		return r.c.QueryAll(ctx, q, 100, func(raw json.RawMessage) error {
			var tw map[string]any
			if err := json.Unmarshal(raw, &tw); err != nil {
				return err
			}
			id, _ := tw["deviceId"].(string)
			tags, _ := tw["tags"].(map[string]any)
			if id == "" || tags[recordTag] != nil {
				return nil
			}
			m := &member{id: id, twin: tw}
			if all, ok := tags[deviceTag].(map[string]any); ok {
				if mine, ok := all[r.rec.Name]; ok {
					b, _ := json.Marshal(mine)
					var mk deviceMark
					if json.Unmarshal(b, &mk) == nil {
						m.mark = &mk
					}
				}
			}
			fn(m)
			return nil
		})
	}
}

// lookup finds a dotted path in a decoded JSON object.
func lookup(m map[string]any, path string) (any, bool) {
	var cur any = m
	for _, k := range strings.Split(path, ".") {
		mm, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = mm[k]; !ok {
			return nil, false
		}
	}
	return cur, true
}

func sameJSON(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	var xa, ya any
	_ = json.Unmarshal(x, &xa)
	_ = json.Unmarshal(y, &ya)
	x, _ = json.Marshal(xa)
	y, _ = json.Marshal(ya)
	return string(x) == string(y)
}

func num(v any) (float64, bool) {
	switch n := v.(type) {
	case float64:
		return n, true
	case json.Number:
		f, err := n.Float64()
		return f, err == nil
	}
	return 0, false
}

// verdict is a device's state in the rollout.
type verdict int

const (
	pending verdict = iota
	succeeded
	failed
)

// judge decides a patched device's state from its twin.
func (r *rollout) judge(tw map[string]any, mk *deviceMark) (verdict, string) {
	props, _ := tw["properties"].(map[string]any)
	desired, _ := props["desired"].(map[string]any)
	reported, _ := props["reported"].(map[string]any)
	v := mk.V
	if v == 0 { // hubby stopped between the patch and recording v: the current version bounds it
		v, _ = func() (int64, bool) { f, ok := num(desired["$version"]); return int64(f), ok }()
	}
	if r.expect != nil {
		for path, want := range r.expect {
			got, ok := lookup(reported, path)
			if !ok || !sameJSON(got, want) {
				return pending, ""
			}
		}
		return succeeded, ""
	}
	paths := make([]string, 0, len(r.desired))
	for p := range r.desired {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, path := range paths {
		if cur, ok := lookup(desired, path); !ok || !sameJSON(cur, r.desired[path]) {
			return failed, fmt.Sprintf("desired %s was changed by someone else", path)
		}
	}
	result := succeeded
	for _, path := range paths {
		a, ok := lookup(reported, path)
		ack, _ := a.(map[string]any)
		if !ok || ack == nil {
			result = pending
			continue
		}
		ac, _ := num(ack["ac"])
		av, _ := num(ack["av"])
		switch {
		case int64(av) < v:
			result = pending
		case ac >= 400:
			desc, _ := ack["ad"].(string)
			return failed, strings.TrimSpace(fmt.Sprintf("%s: ac %v %s", path, ac, desc))
		case ac != 200:
			result = pending
		default:
			if val, ok := ack["value"]; ok && !sameJSON(val, r.desired[path]) {
				result = pending
			}
		}
	}
	return result, ""
}

// say prints a progress line on stderr.
func (r *rollout) say(format string, a ...any) {
	fmt.Fprintf(r.g.stderr, "rollout %s: %s\n", r.rec.Name, fmt.Sprintf(format, a...))
}

// run drives the rollout from the record's step to the end, or until it stops.
func (r *rollout) run(ctx context.Context) error {
	for r.rec.State == "running" {
		ms, err := r.members(ctx)
		if err != nil {
			return err
		}
		i := r.rec.Step
		if i >= len(r.steps) {
			r.rec.State, r.rec.Reason = "completed", ""
			if err := r.save(ctx); err != nil {
				return err
			}
			r.say("completed")
			return nil
		}
		if r.rec.StepStartedAt == "" {
			r.rec.StepStartedAt = time.Now().UTC().Format(time.RFC3339Nano)
			if err := r.save(ctx); err != nil {
				return err
			}
		}
		started, err := time.Parse(time.RFC3339Nano, r.rec.StepStartedAt)
		if err != nil {
			return fmt.Errorf("rollout record: stepStartedAt %q: %v", r.rec.StepStartedAt, err)
		}
		want := r.steps[i].of(len(ms))
		if i == 0 && r.rec.Canary != "" {
			nc := 0
			for _, m := range ms {
				if m.canary {
					nc++
				}
			}
			want = max(want, nc)
		}
		enrolled := 0
		var fresh []member
		for _, m := range ms {
			if m.mark != nil {
				enrolled++
			}
		}
		for _, m := range ms {
			if m.mark == nil && enrolled+len(fresh) < want {
				fresh = append(fresh, m)
			}
		}
		r.say("step %d/%d (%s): %d device(s) to patch, %d already in the rollout", i+1, len(r.steps), r.steps[i], len(fresh), enrolled)
		if err := r.patch(ctx, fresh, i); err != nil {
			return err
		}
		known := make([]string, len(fresh))
		for k, m := range fresh {
			known[k] = m.id
		}
		res, stop, err := r.wait(ctx, i, started.Add(r.timeout), known)
		if err != nil {
			return err
		}
		if r.rec.Results == nil {
			r.rec.Results = map[string]stepResult{}
		}
		r.rec.Results[strconv.Itoa(i)] = res
		r.say("step %d/%d: %d succeeded, %d failed, %d timed out", i+1, len(r.steps), res.Succeeded, res.Failed, res.TimedOut)
		if stop != "" {
			r.rec.State, r.rec.Reason = "stopped", stop
			if err := r.save(ctx); err != nil {
				return err
			}
			r.say("stopped: %s", stop)
			if r.rec.Revert {
				if err := r.revert(ctx); err != nil {
					return err
				}
			}
			return partialError{what: fmt.Sprintf("rollout %s stopped: %s", r.rec.Name, stop)}
		}
		r.rec.Step, r.rec.StepStartedAt = i+1, ""
		if err := r.save(ctx); err != nil {
			return err
		}
	}
	switch r.rec.State {
	case "completed":
		return nil
	case "stopped", "reverted":
		return partialError{what: fmt.Sprintf("rollout %s is %s: %s", r.rec.Name, r.rec.State, r.rec.Reason)}
	}
	return fmt.Errorf("rollout %s is in an unknown state %q", r.rec.Name, r.rec.State)
}

// patch marks and patches fresh devices for step i.
func (r *rollout) patch(ctx context.Context, fresh []member, step int) error {
	var mu sync.Mutex
	var firstErr error
	t := &targetFlags{parallel: r.par, retries: 3}
	ids := make([]string, len(fresh))
	for i, m := range fresh {
		ids[i] = m.id
	}
	outs := r.g.forEach(ctx, t, fmt.Sprintf("rollout %s step %d: patch", r.rec.Name, step+1), ids, func(ctx context.Context, id string) outcome {
		rctx, cancel := r.g.reqCtx(ctx)
		defer cancel()
		if err := r.patchOne(rctx, id, step); err != nil {
			mu.Lock()
			if firstErr == nil {
				firstErr = fmt.Errorf("patch %s: %w", id, err)
			}
			mu.Unlock()
			return failure(err)
		}
		return outcome{OK: true}
	})
	if err := ctx.Err(); err != nil {
		return err
	}
	for _, o := range outs {
		if !o.OK {
			return firstErr // the rollout stays at this step; resume retries
		}
	}
	return nil
}

// patchOne reads the twin, records the previous values with the step, sets the desired values
// (one PATCH, guarded by the twin's etag), then records the desired $version it produced.
func (r *rollout) patchOne(ctx context.Context, id string, step int) error {
	for attempt := 0; ; attempt++ {
		tw, err := r.c.GetTwin(ctx, id)
		if err != nil {
			return err
		}
		// The twin is authoritative where a query may lag (a real hub's query results trail
		// writes): a device already in the rollout is not patched again.
		if all, ok := tw.Tags[deviceTag].(map[string]any); ok && all[r.rec.Name] != nil {
			return nil
		}
		prev := map[string]any{}
		for path := range r.desired {
			v, ok := lookup(tw.Properties.Desired, path)
			if !ok {
				v = nil
			}
			prev[path] = v
		}
		pb, _ := json.Marshal(prev)
		desired := map[string]any{}
		for path, v := range r.desired {
			setPath(desired, path, v)
		}
		body := map[string]any{
			"tags":       map[string]any{deviceTag: map[string]any{r.rec.Name: deviceMark{Step: step, Prev: string(pb)}}},
			"properties": map[string]any{"desired": desired},
		}
		out, err := r.c.UpdateTwin(ctx, id, body, tw.ETag)
		if errors.Is(err, wire.ErrPreconditionFailed) && attempt < 3 {
			continue // changed between our read and write: read again
		}
		if err != nil {
			return err
		}
		v, _ := num(out.Properties.Desired["$version"])
		_, err = r.c.UpdateTwin(ctx, id, map[string]any{"tags": map[string]any{deviceTag: map[string]any{r.rec.Name: map[string]any{"v": int64(v)}}}}, "*")
		return err
	}
}

func setPath(doc map[string]any, path string, v any) {
	parts := strings.Split(path, ".")
	m := doc
	for _, p := range parts[:len(parts)-1] {
		m = child(m, p)
	}
	m[parts[len(parts)-1]] = v
}

// wait polls step i's devices until each succeeded or failed, the deadline passes, or the
// failures already decide that the rollout stops. It returns the step's counts and, when the
// rollout must stop, why.
//
// known are devices this run patched in step: one the query does not return yet (a real hub's
// query results lag) is read by its twin instead of being left out.
func (r *rollout) wait(ctx context.Context, step int, deadline time.Time, known []string) (stepResult, string, error) {
	prevDevices, prevBad := 0, 0
	for k, res := range r.rec.Results {
		if n, _ := strconv.Atoi(k); n < step {
			prevDevices += res.Devices
			prevBad += res.Failed + res.TimedOut
		}
	}
	lastLine := ""
	for {
		ms, err := r.stepMembers(ctx, step)
		if err != nil {
			return stepResult{}, "", err
		}
		if ms, err = r.withKnown(ctx, ms, known, step); err != nil {
			return stepResult{}, "", err
		}
		var res stepResult
		var why []string
		for _, m := range ms {
			res.Devices++
			switch vd, reason := r.judge(m.twin, m.mark); vd {
			case succeeded:
				res.Succeeded++
			case failed:
				res.Failed++
				why = append(why, m.id+" "+reason)
			}
		}
		pendingN := res.Devices - res.Succeeded - res.Failed
		over := func(bad int) bool { return r.over(bad, prevDevices+res.Devices) }
		line := fmt.Sprintf("step %d/%d: %d/%d acknowledged, %d failed, %d pending", step+1, len(r.steps), res.Succeeded, res.Devices, res.Failed, pendingN)
		if line != lastLine {
			r.say("%s", line)
			lastLine = line
		}
		if over(prevBad + res.Failed) {
			return res, fmt.Sprintf("%d of %d device(s) failed, more than --max-failure %s (%s)", prevBad+res.Failed, prevDevices+res.Devices, r.maxFail, strings.Join(firstN(why, 5), "; ")), nil
		}
		if pendingN == 0 {
			return res, "", nil
		}
		if !time.Now().Before(deadline) {
			res.TimedOut = pendingN
			if over(prevBad + res.Failed + res.TimedOut) {
				return res, fmt.Sprintf("%d of %d device(s) failed or did not acknowledge within --ack-timeout %s, more than --max-failure %s", prevBad+res.Failed+res.TimedOut, prevDevices+res.Devices, r.timeout, r.maxFail), nil
			}
			return res, "", nil
		}
		d := min(r.poll, time.Until(deadline))
		tm := time.NewTimer(max(d, 0))
		select {
		case <-ctx.Done():
			tm.Stop()
			return stepResult{}, "", ctx.Err()
		case <-tm.C:
		}
	}
}

// withKnown adds to ms the known devices the query left out, read one by one.
func (r *rollout) withKnown(ctx context.Context, ms []member, known []string, step int) ([]member, error) {
	have := make(map[string]bool, len(ms))
	for _, m := range ms {
		have[m.id] = true
	}
	for _, id := range known {
		if have[id] {
			continue
		}
		rctx, cancel := r.g.reqCtx(ctx)
		tw, err := r.c.GetTwin(rctx, id)
		cancel()
		if errors.Is(err, wire.ErrDeviceNotFound) {
			continue // deleted since: no longer part of the rollout
		}
		if err != nil {
			return nil, err
		}
		var doc map[string]any
		b, _ := json.Marshal(tw)
		if err := json.Unmarshal(b, &doc); err != nil {
			return nil, err
		}
		m := member{id: id, twin: doc}
		if all, ok := tw.Tags[deviceTag].(map[string]any); ok {
			b, _ := json.Marshal(all[r.rec.Name])
			var mk deviceMark
			if json.Unmarshal(b, &mk) == nil && mk.Step == step {
				m.mark = &mk
			}
		}
		if m.mark != nil {
			ms = append(ms, m)
		}
	}
	return ms, nil
}

// over says whether bad failures among total devices pass --max-failure.
func (r *rollout) over(bad, total int) bool {
	if r.maxFail.n >= 0 {
		return bad > r.maxFail.n
	}
	return total > 0 && float64(bad) > r.maxFail.pct*float64(total)/100
}

func firstN(s []string, n int) []string {
	sort.Strings(s)
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("and %d more", len(s)-n))
	}
	return s
}

// revert puts back each patched device's previous desired values.
func (r *rollout) revert(ctx context.Context) error {
	ms, err := r.marked(ctx)
	if err != nil {
		return err
	}
	var todo []member
	for _, m := range ms {
		if m.mark != nil && !m.mark.Reverted {
			todo = append(todo, m)
		}
	}
	byID := map[string]member{}
	ids := make([]string, len(todo))
	for i, m := range todo {
		ids[i], byID[m.id] = m.id, m
	}
	t := &targetFlags{parallel: r.par, retries: 3}
	outs := r.g.forEach(ctx, t, fmt.Sprintf("rollout %s: revert", r.rec.Name), ids, func(ctx context.Context, id string) outcome {
		rctx, cancel := r.g.reqCtx(ctx)
		defer cancel()
		var prev map[string]any
		if err := json.Unmarshal([]byte(byID[id].mark.Prev), &prev); err != nil {
			return outcome{Error: "no previous values recorded"}
		}
		desired := map[string]any{}
		for path, v := range prev {
			setPath(desired, path, v)
		}
		body := map[string]any{
			"tags":       map[string]any{deviceTag: map[string]any{r.rec.Name: map[string]any{"reverted": true}}},
			"properties": map[string]any{"desired": desired},
		}
		if _, err := r.c.UpdateTwin(rctx, id, body, "*"); err != nil {
			return failure(err)
		}
		return outcome{OK: true}
	})
	if err := ctx.Err(); err != nil {
		return err
	}
	bad := 0
	for _, o := range outs {
		if !o.OK {
			bad++
		}
	}
	if bad > 0 {
		return fmt.Errorf("rollout %s: revert failed on %d of %d device(s); run hubby rollout revert %s again", r.rec.Name, bad, len(outs), r.rec.Name)
	}
	r.rec.State = "reverted"
	r.say("reverted %d device(s)", len(outs))
	return r.save(ctx)
}

func rolloutCommand(g *globals) *cobra.Command {
	ro := &cobra.Command{
		Use:   "rollout",
		Short: "Canary rollouts of desired properties, in steps, stopping on failed acknowledgements",
		Long: `A rollout sets desired properties (--desired PATH=JSON) on the devices a query selects, in
steps (--steps, cumulative counts or percentages, e.g. 1,10%,100%). After each step it waits
until the step's devices acknowledge every property the Plug and Play way (reported
PATH = {"value", "ac": 200, "av": <the desired $version of the patch>}), or, with --expect
PATH=JSON, report that value; ac >= 400 is a failure, and so is no answer within --ack-timeout.
When the failures over all devices patched so far pass --max-failure, the rollout stops, and
with --revert puts the previous desired values back.

The rollout's state lives in the hub: the record is the twin of a disabled device identity
hubby-rollout-NAME (tags.hubbyRollout), and each patched device carries
tags.hubbyRollouts.NAME = {step, prev, v}. A hubby killed at any point loses nothing:
hubby rollout resume NAME goes on where it stopped, and hubby rollout status NAME shows it.
Exit status 3 when the rollout stops.`,
	}
	var pf struct {
		query, canary, steps, maxFail, expectS string
		desired, expect                        []string
		timeout, poll                          time.Duration
		revert, dryRun                         bool
		parallel                               int
	}
	start := &cobra.Command{
		Use:   "start NAME",
		Short: "Start a rollout",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if !rolloutName.MatchString(name) {
				return usageError{fmt.Errorf("rollout name %q: a letter, then up to 63 letters, digits and _", name)}
			}
			if pf.query == "" {
				return usageError{errors.New("--query (a WHERE condition, or * for every device) is required")}
			}
			if len(pf.desired) == 0 {
				return usageError{errors.New("--desired PATH=JSON is required (repeatable)")}
			}
			des, err := pathValues(pf.desired)
			if err != nil {
				return usageError{fmt.Errorf("--desired %v", err)}
			}
			var exp map[string]any
			if len(pf.expect) > 0 {
				if exp, err = pathValues(pf.expect); err != nil {
					return usageError{fmt.Errorf("--expect %v", err)}
				}
			}
			db, _ := json.Marshal(des)
			rec := rolloutRecord{Name: name, Query: pf.query, Canary: pf.canary, Desired: string(db), Steps: pf.steps,
				MaxFailure: pf.maxFail, AckTimeout: pf.timeout.String(), Revert: pf.revert, State: "running",
				StartedAt: time.Now().UTC().Format(time.RFC3339)}
			if exp != nil {
				eb, _ := json.Marshal(exp)
				rec.Expect = string(eb)
			}
			r := &rollout{g: g, rec: rec, poll: pf.poll, par: pf.parallel}
			if err := r.load(); err != nil {
				return err
			}
			return g.withLong(cmd, func(ctx context.Context, c *service.Client) error {
				r.c = c
				rctx, cancel := g.reqCtx(ctx)
				defer cancel()
				if old, found, err := readRecord(rctx, c, name); err != nil {
					return err
				} else if found {
					return fmt.Errorf("rollout %s already exists (%s): use hubby rollout resume or status, or another name", name, old.State)
				}
				if pf.dryRun {
					return r.printPlan(ctx)
				}
				_, err := c.CreateDevice(rctx, service.Device{DeviceID: recordID(name), Status: "disabled", StatusReason: "hubby rollout record"})
				if err != nil {
					return fmt.Errorf("create the rollout record %s: %w", recordID(name), err)
				}
				if err := r.save(ctx); err != nil {
					return err
				}
				return r.finish(r.run(ctx))
			})
		},
	}
	f := start.Flags()
	f.StringVarP(&pf.query, "query", "q", "", "WHERE condition choosing the devices (* for all)")
	f.StringVar(&pf.canary, "canary", "", "WHERE condition: these devices form the first step, whatever its size")
	f.StringArrayVar(&pf.desired, "desired", nil, "PATH=JSON desired property to set (dots for nesting; repeatable)")
	f.StringArrayVar(&pf.expect, "expect", nil, "PATH=JSON reported value that means success (instead of the ack; repeatable)")
	f.StringVar(&pf.steps, "steps", "1,10%,100%", "cumulative step sizes: counts or percentages of the devices")
	f.StringVar(&pf.maxFail, "max-failure", "10%", "stop when more devices than this (count or percentage of those patched) failed or timed out")
	f.DurationVar(&pf.timeout, "ack-timeout", 10*time.Minute, "how long a step waits for its devices")
	f.BoolVar(&pf.revert, "revert", false, "when the rollout stops, put back the previous desired values")
	f.BoolVar(&pf.dryRun, "dry-run", false, "list the devices of each step, change nothing")

	var rpoll time.Duration
	var rpar int
	resume := &cobra.Command{
		Use:   "resume NAME",
		Short: "Go on with a rollout from where it stopped (after hubby was killed, or after a stop with --force)",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.withLong(cmd, func(ctx context.Context, c *service.Client) error {
				r, err := g.openRollout(ctx, c, args[0])
				if err != nil {
					return err
				}
				r.poll, r.par = rpoll, rpar
				if r.rec.State != "running" {
					return r.finish(r.run(ctx))
				}
				r.say("resuming at step %d/%d", r.rec.Step+1, len(r.steps))
				return r.finish(r.run(ctx))
			})
		},
	}
	status := &cobra.Command{
		Use:   "status NAME",
		Short: "Show a rollout's state, its finished steps and the devices of the step in progress",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				r, err := g.openRollout(ctx, c, args[0])
				if err != nil {
					return err
				}
				return r.printStatus(ctx)
			})
		},
	}
	revert := &cobra.Command{
		Use:   "revert NAME",
		Short: "Stop a rollout and put back the previous desired values of every device it patched",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.withLong(cmd, func(ctx context.Context, c *service.Client) error {
				r, err := g.openRollout(ctx, c, args[0])
				if err != nil {
					return err
				}
				r.par = rpar
				if r.rec.State == "running" || r.rec.State == "completed" {
					r.rec.State, r.rec.Reason = "stopped", "reverted on request"
				}
				if err := r.revert(ctx); err != nil {
					return err
				}
				return r.printStatus(ctx)
			})
		},
	}
	for _, c := range []*cobra.Command{start, resume, revert} {
		if c == start {
			c.Flags().DurationVar(&pf.poll, "poll", 5*time.Second, "how often to read the step's twins")
			c.Flags().IntVar(&pf.parallel, "parallel", 8, "twin patches in flight at once")
			continue
		}
		c.Flags().DurationVar(&rpoll, "poll", 5*time.Second, "how often to read the step's twins")
		c.Flags().IntVar(&rpar, "parallel", 8, "twin patches in flight at once")
	}
	ro.AddCommand(start, resume, status, revert)
	return ro
}

// pathValues parses PATH=JSON pairs (a value that is not JSON is a string).
func pathValues(kvs []string) (map[string]any, error) {
	out := map[string]any{}
	for _, kv := range kvs {
		doc := map[string]any{}
		if err := setPaths(doc, nil, []string{kv}); err != nil {
			return nil, err
		}
		k, _, _ := strings.Cut(kv, "=")
		v, _ := lookup(doc, k)
		out[k] = v
	}
	return out, nil
}

func (g *globals) openRollout(ctx context.Context, c *service.Client, name string) (*rollout, error) {
	if !rolloutName.MatchString(name) {
		return nil, usageError{fmt.Errorf("rollout name %q: a letter, then up to 63 letters, digits and _", name)}
	}
	rctx, cancel := g.reqCtx(ctx)
	defer cancel()
	rec, found, err := readRecord(rctx, c, name)
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, fmt.Errorf("no rollout %s (no device %s)", name, recordID(name))
	}
	r := &rollout{g: g, c: c, rec: rec, poll: 5 * time.Second, par: 8}
	if err := r.load(); err != nil {
		return nil, err
	}
	return r, nil
}

// finish prints the final status after a run.
func (r *rollout) finish(err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.g.timeout)
	defer cancel()
	if perr := r.printStatus(ctx); perr != nil && err == nil {
		return perr
	}
	return err
}

// printPlan lists the devices each step of a new rollout would patch.
func (r *rollout) printPlan(ctx context.Context) error {
	ms, err := r.members(ctx)
	if err != nil {
		return err
	}
	type planStep struct {
		Step    int      `json:"step"`
		Size    string   `json:"size"`
		Devices []string `json:"devices"`
	}
	plan := make([]planStep, 0, len(r.steps))
	nc := 0
	for _, m := range ms {
		if m.canary {
			nc++
		}
	}
	done := 0
	for i, z := range r.steps {
		want := z.of(len(ms))
		if i == 0 {
			want = max(want, nc) // as run does: the canary devices all go first
		}
		ps := planStep{Step: i + 1, Size: z.String(), Devices: []string{}}
		for ; done < want; done++ {
			ps.Devices = append(ps.Devices, ms[done].id)
		}
		plan = append(plan, ps)
	}
	if r.g.output == "json" {
		return r.g.printJSON(struct {
			DryRun  bool       `json:"dryRun"`
			Targets int        `json:"targets"`
			Steps   []planStep `json:"steps"`
		}{true, len(ms), plan})
	}
	fmt.Fprintf(r.g.stdout, "dry run: rollout %s over %d device(s), %s\n", r.rec.Name, len(ms), r.rec.Desired)
	rows := make([][]string, 0, len(plan))
	for _, p := range plan {
		rows = append(rows, []string{strconv.Itoa(p.Step), p.Size, strconv.Itoa(len(p.Devices)), strings.Join(p.Devices, " ")})
	}
	return r.g.table([]string{"STEP", "SIZE", "NEW", "DEVICES"}, rows)
}

// printStatus shows the record and the live state of the step in progress.
func (r *rollout) printStatus(ctx context.Context) error {
	targets, err := r.members(ctx)
	if err != nil {
		return err
	}
	ms, err := r.marked(ctx)
	if err != nil {
		return err
	}
	type devState struct {
		DeviceID string `json:"deviceId"`
		Step     int    `json:"step"`
		State    string `json:"state"`
		Detail   string `json:"detail,omitempty"`
	}
	var devs []devState
	for _, m := range ms {
		if m.mark == nil {
			continue
		}
		st, detail := "pending", ""
		switch vd, why := r.judge(m.twin, m.mark); {
		case m.mark.Reverted:
			st = "reverted"
		case vd == succeeded:
			st = "succeeded"
		case vd == failed:
			st, detail = "failed", why
		case m.mark.Step < r.rec.Step || r.rec.State != "running":
			st = "timed out" // its step is over and it has not answered
		}
		devs = append(devs, devState{m.id, m.mark.Step + 1, st, detail})
	}
	sort.Slice(devs, func(i, j int) bool {
		if devs[i].Step != devs[j].Step {
			return devs[i].Step < devs[j].Step
		}
		return devs[i].DeviceID < devs[j].DeviceID
	})
	if r.g.output == "json" {
		if devs == nil {
			devs = []devState{}
		}
		return r.g.printJSON(struct {
			Rollout rolloutRecord `json:"rollout"`
			Targets int           `json:"targets"`
			Devices []devState    `json:"devices"`
		}{r.rec, len(targets), devs})
	}
	w := r.g.stdout
	fmt.Fprintf(w, "rollout:   %s\nstate:     %s", r.rec.Name, r.rec.State)
	if r.rec.Reason != "" {
		fmt.Fprintf(w, " (%s)", r.rec.Reason)
	}
	fmt.Fprintf(w, "\nquery:     %s\n", r.rec.Query)
	if r.rec.Canary != "" {
		fmt.Fprintf(w, "canary:    %s\n", r.rec.Canary)
	}
	fmt.Fprintf(w, "desired:   %s\n", r.rec.Desired)
	if r.rec.Expect != "" {
		fmt.Fprintf(w, "expect:    %s\n", r.rec.Expect)
	}
	fmt.Fprintf(w, "steps:     %s (now %d of %d), max failure %s, ack timeout %s, revert %v\ntargets:   %d device(s)\n",
		r.rec.Steps, min(r.rec.Step+1, len(r.steps)), len(r.steps), r.rec.MaxFailure, r.rec.AckTimeout, r.rec.Revert, len(targets))
	rows := make([][]string, 0, len(devs))
	for _, d := range devs {
		rows = append(rows, []string{strconv.Itoa(d.Step), d.DeviceID, d.State, d.Detail})
	}
	return r.g.table([]string{"STEP", "DEVICE", "STATE", "DETAIL"}, rows)
}
