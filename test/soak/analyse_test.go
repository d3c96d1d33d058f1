//go:build soak

package soak

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"time"
)

// flushLag is how late the spool's flusher may run behind its fsyncInterval under load (its
// timer restarts after a flush, which fsyncs): the last cursor written before a SIGKILL is at
// most fsyncInterval+flushLag old.
const flushLag = time.Second

// killAllowance sums KillAllowance over the agent's SIGKILLed processes.
func (a *agent) killAllowance() int {
	a.mu.Lock()
	procs := slices.Clone(a.procs)
	killedAt := make([]time.Time, len(procs)) // written under a.mu by killAgent
	for i, p := range procs {
		killedAt[i] = p.killedAt
	}
	a.mu.Unlock()
	// loaded is what a process read back from the spool at its start (-1: unknown, it did not
	// log opening its spool).
	loaded := func(p *agentProc) int {
		opened, n := false, 0
		for _, l := range p.snapshot() {
			switch l.msg() {
			case "queue spool opened":
				opened = true
			case "queue spool: resending messages kept on disk":
				n += int(l.num("messages"))
			}
		}
		if !opened {
			return -1
		}
		return n
	}
	n := 0
	for i, p := range procs {
		if killedAt[i].IsZero() {
			continue
		}
		var ds []Delivery
		for _, l := range p.snapshot() {
			if l.msg() == "telemetry delivered" {
				if id, err := ParseMsgID(l.str("message_id")); err == nil {
					ds = append(ds, Delivery{ID: id, At: l.logged()})
				}
			}
		}
		reloaded := -1
		if i+1 < len(procs) {
			reloaded = loaded(procs[i+1])
		}
		n += KillAllowance(ownRun(p.proc), max(loaded(p), 0), ds, killedAt[i].Add(-fsyncInterval-flushLag), reloaded)
	}
	return n
}

// allLines returns an agent's kept log lines over all its processes, in order, with the index
// of the process each came from.
func (a *agent) allLines() ([]line, []int) {
	a.mu.Lock()
	procs := append([]*agentProc(nil), a.procs...)
	a.mu.Unlock()
	var ls []line
	var pi []int
	for i, p := range procs {
		for _, l := range p.snapshot() {
			ls = append(ls, l)
			pi = append(pi, i)
		}
	}
	return ls, pi
}

// ownRun is the run id of the messages an agent process created itself: the run it mentions
// most (resent messages of earlier processes carry theirs).
func ownRun(p *proc) string {
	counts := map[string]int{}
	for _, l := range p.snapshot() {
		if mid := l.str("message_id"); mid != "" {
			if id, err := ParseMsgID(mid); err == nil {
				counts[id.Run]++
			}
		}
	}
	best, n := "", 0
	for r, c := range counts {
		if c > n || (c == n && r < best) {
			best, n = r, c
		}
	}
	return best
}

func (s *soak) report(lastEnd time.Time, converged time.Duration, convErr error, stopErrs map[string]error) *Report {
	s.mu.Lock()
	defer s.mu.Unlock()
	rep := &Report{Seed: s.seed, Duration: time.Since(s.start), Agents: len(s.agents), Faults: map[string]int{},
		Skipped: s.skipped, SkipWhy: s.unsuppor, Methods: s.methods, Converged: converged}
	add := func(name string, ok bool, format string, args ...any) {
		rep.Invariants = append(rep.Invariants, Invariant{Name: name, OK: ok, Detail: fmt.Sprintf(format, args...)})
	}
	for _, f := range s.faults {
		rep.Faults[f.kind]++
	}

	// Telemetry: accepted = handed and not refused; each received, failed with a reason, or
	// acknowledged just before a hubsim SIGKILL after its last poll.
	led := NewLedger()
	for _, w := range s.unobserved {
		led.Unobserved(w.from, w.to)
	}
	for _, r := range s.records {
		led.Record(r.mid, r.key)
	}
	runs := map[*proc]string{}
	for _, h := range s.handed {
		run, ok := runs[h.p]
		if !ok {
			run = ownRun(h.p)
			runs[h.p] = run
		}
		if run != "" {
			led.Handed(s.agents[h.agent].id, run, h.sent)
		}
	}
	stoppedFailed := 0
	for _, a := range s.agents {
		ls, _ := a.allLines()
		for _, l := range ls {
			mid := l.str("message_id")
			switch l.msg() {
			case "telemetry delivered":
				led.Acked(mid, l.at)
			case "telemetry message failed":
				led.Failed(mid, l.str("error"))
			case "telemetry message refused":
				led.Refused(mid)
			case "telemetry kept on disk for the next start":
				led.Seen(mid)
			case "stopped":
				stoppedFailed += int(l.num("failed"))
			}
		}
	}
	rep.Telemetry = led.Tally()
	missing, accepted, dups, dupBad, failed := 0, 0, 0, []string{}, 0
	var missDetail []string
	for i := range rep.Telemetry {
		tl := &rep.Telemetry[i]
		var a *agent
		for _, x := range s.agents {
			if x.id == tl.Device {
				a = x
			}
		}
		if a == nil {
			// A fleet device: it reconnects after a drop of every device and a hubsim restart.
			mass := 0
			for _, f := range s.faults {
				if f.kind == "drop-all" || f.kind == "hubsim-kill" {
					mass++
				}
			}
			tl.DuplicateAllowed = maxInFlight * mass
		} else {
			connects := 0
			ls, _ := a.allLines()
			for _, l := range ls {
				if l.msg() == "connected" {
					connects++
				}
			}
			// Each reconnect may resend the in-flight window (a restarted process's first
			// connection included); each SIGKILL also what the killed process had acknowledged
			// beyond the spool's last written cursor (KillAllowance, from its own log).
			tl.DuplicateAllowed = maxInFlight*max(connects-1, 0) + a.killAllowance()
			// Agents' gaps only: the fleet devices' are judged in fleetChecks.
			accepted += tl.Accepted
			missing += tl.MissingCount
			if tl.MissingCount > 0 {
				missDetail = append(missDetail, fmt.Sprintf("%s: %d, e.g. %s", tl.Device, tl.MissingCount, strings.Join(tl.Missing[:min(5, len(tl.Missing))], " ")))
			}
		}
		dups += tl.Duplicates
		failed += tl.Failed
		if tl.Duplicates > tl.DuplicateAllowed {
			dupBad = append(dupBad, fmt.Sprintf("%s: %d > %d", tl.Device, tl.Duplicates, tl.DuplicateAllowed))
		}
	}
	add("telemetry (agents): every accepted message received or failed with a reason", missing == 0 && accepted > 0,
		"%d accepted, %d missing %s; %d failed with a reason", accepted, missing, strings.Join(missDetail, "; "), failed)
	add("telemetry: duplicates within the in-flight window per reconnect", len(dupBad) == 0,
		"%d duplicates %s", dups, strings.Join(dupBad, "; "))
	if bad := led.BadIDs(); len(bad) > 0 {
		add("telemetry: message ids well-formed", false, "%d unparsable, e.g. %q", len(bad), bad[0])
	}

	// The fleet: its clean stop drained everything; hubsim recorded what it acknowledged.
	if s.fleet != nil {
		s.fleetChecks(rep, add)
	}

	// One row for the fleet's devices in the table.
	if s.fleet != nil {
		var rows []DeviceTally
		agg := DeviceTally{Device: fmt.Sprintf("fleet (%d devices)", len(s.fleet.ids))}
		for _, tl := range rep.Telemetry {
			if !strings.HasPrefix(tl.Device, "soak-fleet-") {
				rows = append(rows, tl)
				continue
			}
			agg.Runs += tl.Runs
			agg.Accepted += tl.Accepted
			agg.Refused += tl.Refused
			agg.Received += tl.Received
			agg.Failed += tl.Failed
			agg.AckedUnrecorded += tl.AckedUnrecorded
			agg.MissingCount += tl.MissingCount
			agg.Missing = append(agg.Missing, tl.Missing...)
			agg.Duplicates += tl.Duplicates
			agg.DuplicateAllowed += tl.DuplicateAllowed
		}
		rep.Telemetry = append(rows, agg)
	}

	// Desired versions applied in order; reported state converged.
	var orderErrs []string
	applied := 0
	for _, a := range s.agents {
		ls, pi := a.allLines()
		var evs []DesiredEvent
		last := 0
		for i, l := range ls {
			if pi[i] != last {
				evs = append(evs, DesiredEvent{Kind: Restart})
				last = pi[i]
			}
			switch l.msg() {
			case "desired version applied":
				evs = append(evs, DesiredEvent{Kind: Applied, Version: l.num("version")})
			case "desired version went back; applying the hub's twin":
				evs = append(evs, DesiredEvent{Kind: WentBack})
			}
		}
		n, err := CheckDesiredOrder(evs)
		applied += n
		if err != nil {
			orderErrs = append(orderErrs, fmt.Sprintf("%s: %v", a.id, err))
		}
	}
	add("desired versions applied in order", len(orderErrs) == 0 && applied > 0,
		"%d applications (%d desired PATCHes: %v; %d acknowledged versions lost to hubsim SIGKILLs) %s",
		applied, s.patchErrs["ok"], s.patchErrs, s.lostDesired, strings.Join(orderErrs, "; "))
	if convErr != nil {
		add("reported state converged within 30s of the last fault", false, "%v", convErr)
	} else {
		add("reported state converged within 30s of the last fault", converged <= convergeBound, "after %v", converged.Round(time.Millisecond))
	}

	// One answer per method call: the driver saw one outcome per call (tallied); 200s carried
	// their own call's payload (checked as they came); the agents answered each request once.
	// Request ids are hubsim's, counted per hubsim process: an answer belongs to the instance
	// that was serving when it was logged.
	var twice []string
	instance := func(at time.Time) int {
		i := 0
		for j, h := range s.hubs {
			if !h.up.After(at) {
				i = j
			}
		}
		return i
	}
	for _, a := range s.agents {
		seen := map[string]int{}
		ls, _ := a.allLines()
		for _, l := range ls {
			if l.msg() == "direct method answered" {
				seen[fmt.Sprintf("%d/%s", instance(l.at), l.str("rid"))]++
			}
		}
		for rid, c := range seen {
			if c > 1 {
				twice = append(twice, fmt.Sprintf("%s rid %s answered %d times", a.id, rid, c))
			}
		}
	}
	calls := 0
	for _, c := range s.methods {
		calls += c
	}
	add("methods: exactly one answer per call", len(twice) == 0 && s.methods["200"] > 0,
		"%d calls, %d answered 200 with their own payload %s", calls, s.methods["200"], strings.Join(twice, "; "))

	// Resources over the second half of the run.
	half := s.dur / 2
	var growthBad []string
	fit := func(process, name string, ss []sample) {
		var ts []time.Duration
		var vs []float64
		for _, x := range ss {
			if x.at >= half {
				ts = append(ts, x.at)
				vs = append(vs, x.v)
			}
		}
		if len(ts) < 5 {
			growthBad = append(growthBad, fmt.Sprintf("%s %s: only %d samples in the second half", process, name, len(ts)))
			return
		}
		g := FitGrowth(process, name, ts, vs, growthBounds[name])
		rep.Growth = append(rep.Growth, g)
		if !g.OK() {
			growthBad = append(growthBad, fmt.Sprintf("%s %s grew %.1f > %.0f", process, name, g.Growth, g.Bound))
		}
	}
	for _, k := range []string{"agent/go_goroutines", "agent/process_open_fds", "agent/go_memstats_heap_inuse_bytes"} {
		fit(s.agents[0].id, k, s.samples[k])
	}
	lastHub := s.hubs[len(s.hubs)-1].proc
	for _, k := range []string{"hubsim/threads", "hubsim/open_fds", "hubsim/rss_kb"} {
		fit("hubsim", k, s.hubSamples[lastHub][k])
	}
	add("no growth of goroutines, open files, heap (second half, fitted)", len(growthBad) == 0, "%s", strings.Join(growthBad, "; "))

	// Recovery: fault end -> the agent's next "twin synced" after it lost its connection. A loss
	// counts for a fault when it comes before the next fault on the same agent and within 15 s
	// (1.5 keep-alives) of the fault's end: faults that never cost the connection (latency,
	// a short PUBACK delay) are not charged with a later fault's reconnect.
	unrecovered := 0
	for fi, f := range s.faults {
		for _, ai := range f.agents {
			lossBy := f.end.Add(15 * time.Second)
			for _, g := range s.faults[fi+1:] {
				if slices.Contains(g.agents, ai) {
					if g.start.Before(lossBy) {
						lossBy = g.start
					}
					break
				}
			}
			ls, pi := s.agents[ai].allLines()
			lost := false
			startProc := -1
			for i, l := range ls {
				if l.at.Before(f.start) {
					startProc = pi[i]
					continue
				}
				if !lost && l.at.After(lossBy) {
					break
				}
				if pi[i] != startProc || l.msg() == "disconnected, retrying" || l.msg() == "disconnected" {
					lost = true
				}
				if lost && l.msg() == "twin synced" {
					d := max(l.at.Sub(f.end), 0)
					rep.Recoveries = append(rep.Recoveries, d)
					if rep.RecoveryByKind == nil {
						rep.RecoveryByKind = map[string][]time.Duration{}
					}
					rep.RecoveryByKind[f.kind] = append(rep.RecoveryByKind[f.kind], d)
					break
				}
				if i == len(ls)-1 && lost {
					unrecovered++
				}
			}
		}
	}
	add("every disconnected agent recovered", unrecovered == 0, "%d recoveries measured, %d never synced again; %d syncs with a restarted hubsim logged before the soak saw it serve",
		len(rep.Recoveries), unrecovered, s.syncedBeforeSeen)

	var exits []string
	for id, err := range stopErrs {
		exits = append(exits, fmt.Sprintf("%s: %v", id, err))
	}
	sort.Strings(exits)
	add("agents stop cleanly (SIGTERM, exit 0)", len(exits) == 0, "%s", strings.Join(exits, "; "))
	add("no unexpected errors from the driver or hubsim's API", len(s.unexpected) == 0, "%d %s", len(s.unexpected),
		strings.Join(s.unexpected[:min(5, len(s.unexpected))], "; "))
	_ = stoppedFailed
	return rep
}

// fleetChecks reads the fleet's --summary: after a clean stop nothing is pending, every message
// sent is acknowledged or failed, and hubsim recorded (at least) what was acknowledged, less at
// most one message per device per hubsim SIGKILL: acknowledged after the last poll of the
// killed instance, whose record lives in memory only. The agents log each acknowledgement, so
// theirs are told apart message by message; the fleet logs none, so its gaps (seen: the same
// seq on every fleet device, the second of a SIGKILL) are bounded by that slack instead.
func (s *soak) fleetChecks(rep *Report, add func(string, bool, string, ...any)) {
	b, err := os.ReadFile(s.fleet.summary)
	if err != nil {
		add("fleet: summary written at exit", false, "%v", err)
		return
	}
	var sum struct {
		Devices   int `json:"devices"`
		Telemetry struct {
			Sent, Acknowledged, Failed, Pending uint64
			FailedBy                            map[string]uint64 `json:"failedByReason"`
		} `json:"telemetry"`
		Reconnects   uint64         `json:"reconnects"`
		DeviceErrors map[string]int `json:"deviceErrors"`
	}
	if err := json.Unmarshal(b, &sum); err != nil {
		add("fleet: summary written at exit", false, "%v", err)
		return
	}
	fleet := map[string]bool{}
	for _, id := range s.fleet.ids {
		fleet[id] = true
	}
	recorded, missing := 0, 0
	for _, tl := range rep.Telemetry {
		if fleet[tl.Device] {
			recorded += tl.Received
			missing += tl.MissingCount
		}
	}
	kills := 0
	for _, f := range s.faults {
		if f.kind == "hubsim-kill" {
			kills++
		}
	}
	tel := sum.Telemetry
	slack := kills * len(s.fleet.ids)
	ok := sum.Devices == len(s.fleet.ids) && tel.Pending == 0 && tel.Sent == tel.Acknowledged+tel.Failed &&
		uint64(recorded+slack) >= tel.Acknowledged && missing <= slack && len(sum.DeviceErrors) == 0 && tel.Sent > 0
	add(fmt.Sprintf("fleet (%d devices): drained, acknowledged messages recorded, no gaps", len(s.fleet.ids)), ok,
		"sent %d = acknowledged %d + failed %d %v, pending %d; %d distinct recorded (slack %d for hubsim SIGKILLs); %d gaps; %d reconnects; device errors %v",
		tel.Sent, tel.Acknowledged, tel.Failed, tel.FailedBy, tel.Pending, recorded, slack, missing, sum.Reconnects, sum.DeviceErrors)
}
