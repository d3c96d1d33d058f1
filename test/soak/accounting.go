package soak

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"
)

// LogTime parses a JSON log line's "ts". The binaries log with zap's ISO8601 encoder
// (internal/logging): milliseconds, and a zone of "Z" in UTC but "+hhmm" elsewhere, which RFC 3339
// does not accept.
func LogTime(s string) (time.Time, error) { return time.Parse("2006-01-02T15:04:05.000Z0700", s) }

// MsgID is a telemetry message id as the agent builds it: {deviceID}-{runID}-{seq}, runID being
// fresh for every start of the agent process and seq counting from 1 within it.
type MsgID struct {
	Device string
	Run    string
	Seq    uint64
}

func (m MsgID) String() string { return fmt.Sprintf("%s-%s-%d", m.Device, m.Run, m.Seq) }

// ParseMsgID splits an agent message id. Device ids may contain '-', run ids do not.
func ParseMsgID(s string) (MsgID, error) {
	i := strings.LastIndexByte(s, '-')
	if i <= 0 {
		return MsgID{}, fmt.Errorf("message id %q: no sequence number", s)
	}
	seq, err := strconv.ParseUint(s[i+1:], 10, 64)
	if err != nil || seq == 0 {
		return MsgID{}, fmt.Errorf("message id %q: bad sequence number", s)
	}
	j := strings.LastIndexByte(s[:i], '-')
	if j <= 0 || j+1 == i {
		return MsgID{}, fmt.Errorf("message id %q: no run id", s)
	}
	return MsgID{Device: s[:j], Run: s[j+1 : i], Seq: seq}, nil
}

type runKey struct{ device, run string }

// Ledger accounts for telemetry: what the agents accepted, what hubsim recorded, what the agents
// reported failed. Not safe for concurrent use.
type Ledger struct {
	maxSeq  map[runKey]uint64 // highest seq known to have been accepted or refused, per run
	refused map[MsgID]bool
	failed  map[MsgID]string // reason
	acked   map[MsgID]time.Time
	records map[MsgID]map[string]bool // distinct records per id (hubsim instance + enqueued time)
	excused []window                  // hubsim lifetimes' unobserved tails (polled, then SIGKILLed)
	badIDs  []string
	devices map[string]bool
}

type window struct{ from, to time.Time }

// NewLedger returns an empty ledger.
func NewLedger() *Ledger {
	return &Ledger{maxSeq: map[runKey]uint64{}, refused: map[MsgID]bool{}, failed: map[MsgID]string{},
		acked: map[MsgID]time.Time{}, records: map[MsgID]map[string]bool{}, devices: map[string]bool{}}
}

func (l *Ledger) see(id MsgID) {
	k := runKey{id.Device, id.Run}
	if id.Seq > l.maxSeq[k] {
		l.maxSeq[k] = id.Seq
	}
	l.devices[id.Device] = true
}

// Handed notes that an agent process (device, run) had handed seq messages to its queue: every
// seq below it has been accepted or refused. (The last one may still be inside Enqueue.)
func (l *Ledger) Handed(device, run string, seq uint64) {
	if seq > 1 {
		l.see(MsgID{device, run, seq - 1})
	}
}

// Refused notes a message the agent refused at once (queue full, too large): never accepted.
func (l *Ledger) Refused(mid string) {
	if id, ok := l.parse(mid); ok {
		l.see(id)
		l.refused[id] = true
	}
}

// Failed notes a message the agent reported failed, with the reason it gave.
func (l *Ledger) Failed(mid, reason string) {
	if id, ok := l.parse(mid); ok {
		l.see(id)
		l.failed[id] = reason
	}
}

// Acked notes the agent's report that the hub acknowledged a message (PUBACK) at time at.
func (l *Ledger) Acked(mid string, at time.Time) {
	if id, ok := l.parse(mid); ok {
		l.see(id)
		if _, dup := l.acked[id]; !dup {
			l.acked[id] = at
		}
	}
}

// Seen notes any other mention of a message id by the agent (e.g. kept on disk at shutdown).
func (l *Ledger) Seen(mid string) {
	if id, ok := l.parse(mid); ok {
		l.see(id)
	}
}

// Record notes a message hubsim recorded; key tells records apart (the hubsim instance and the
// enqueued time), so the same record read by two polls counts once and a resend counts twice.
func (l *Ledger) Record(mid, key string) {
	id, ok := l.parse(mid)
	if !ok {
		return
	}
	l.see(id)
	m := l.records[id]
	if m == nil {
		m = map[string]bool{}
		l.records[id] = m
	}
	m[key] = true
}

// Unobserved marks [from, to] as a time when hubsim could acknowledge messages that no poll of
// its (in-memory) record saw: from its last poll to its SIGKILL. A message the agent saw
// acknowledged then is counted as delivered-but-unrecorded, not as lost.
func (l *Ledger) Unobserved(from, to time.Time) { l.excused = append(l.excused, window{from, to}) }

func (l *Ledger) parse(mid string) (MsgID, bool) {
	id, err := ParseMsgID(mid)
	if err != nil {
		l.badIDs = append(l.badIDs, mid)
		return MsgID{}, false
	}
	return id, true
}

// DeviceTally is the telemetry accounting of one device.
type DeviceTally struct {
	Device           string
	Runs             int      // agent processes that sent telemetry
	Accepted         int      // messages accepted (handed and not refused)
	Refused          int      // refused at once (not accepted)
	Received         int      // distinct accepted ids hubsim recorded
	Failed           int      // reported failed by the agent, with a reason
	AckedUnrecorded  int      // acknowledged to the agent just before a hubsim SIGKILL, after its last poll
	Missing          []string // accepted, neither recorded nor failed nor excused (sorted, at most 20)
	MissingCount     int
	Duplicates       int      // records beyond the first, per id
	FailedReasons    []string // distinct reasons
	UnknownRecorded  int      // recorded ids above every known accepted seq (should be 0)
	BadIDs           int
	DuplicateAllowed int // set by the caller: the bound on Duplicates
}

// Tally computes the per-device accounting, sorted by device.
func (l *Ledger) Tally() []DeviceTally {
	byDev := map[string]*DeviceTally{}
	get := func(d string) *DeviceTally {
		t := byDev[d]
		if t == nil {
			t = &DeviceTally{Device: d}
			byDev[d] = t
		}
		return t
	}
	for d := range l.devices {
		get(d)
	}
	reasons := map[string]map[string]bool{}
	for k, max := range l.maxSeq {
		t := get(k.device)
		t.Runs++
		for s := uint64(1); s <= max; s++ {
			id := MsgID{k.device, k.run, s}
			if l.refused[id] {
				t.Refused++
				continue
			}
			t.Accepted++
			recs := len(l.records[id])
			switch {
			case recs > 0:
				t.Received++
				t.Duplicates += recs - 1
			case l.failed[id] != "":
				t.Failed++
				if reasons[k.device] == nil {
					reasons[k.device] = map[string]bool{}
				}
				reasons[k.device][l.failed[id]] = true
			case l.excusedAck(id):
				t.AckedUnrecorded++
			default:
				t.MissingCount++
				t.Missing = append(t.Missing, id.String())
			}
		}
	}
	out := make([]DeviceTally, 0, len(byDev))
	for d, t := range byDev {
		for r := range reasons[d] {
			t.FailedReasons = append(t.FailedReasons, r)
		}
		sort.Strings(t.FailedReasons)
		sort.Slice(t.Missing, func(i, j int) bool { return t.Missing[i] < t.Missing[j] })
		if len(t.Missing) > 20 {
			t.Missing = t.Missing[:20]
		}
		out = append(out, *t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Device < out[j].Device })
	return out
}

func (l *Ledger) excusedAck(id MsgID) bool {
	at, ok := l.acked[id]
	if !ok {
		return false
	}
	for _, w := range l.excused {
		if !at.Before(w.from) && !at.After(w.to) {
			return true
		}
	}
	return false
}

// Missing returns how many accepted messages are neither recorded, failed nor excused.
func (l *Ledger) Missing() int {
	n := 0
	for _, t := range l.Tally() {
		n += t.MissingCount
	}
	return n
}

// BadIDs returns the message ids that did not parse.
func (l *Ledger) BadIDs() []string { return l.badIDs }

// Delivery is one "telemetry delivered" line of an agent process: the message and when the agent
// logged it.
type Delivery struct {
	ID MsgID
	At time.Time
}

// KillAllowance bounds the duplicates one SIGKILL of an agent process can add beyond the resend
// of its in-flight window (the restarted process's first connection accounts for that).
//
// The agent's spool keeps acknowledgements in memory and writes its cursor, the sequence below
// which every record is done, at each flush (every fsyncInterval). After the kill the next
// process sends again every record from the first one not done at the last flush, and those the
// killed process had acknowledged are the duplicates. A record still waiting for its PUBACK (one
// hubsim dropped, say) keeps every later acknowledgement out of the cursor, and a backlog drained
// after a reconnect is acknowledged far faster than telemetry is produced: so the bound is not a
// rate times the interval but every message the killed process acknowledged at or after the first
// one it had not acknowledged by t0, which must be at or before its last flush.
//
// own is the killed process's run id and delivered its "telemetry delivered" lines, which exist
// for its own messages only. resent is how many records it loaded from the spool at its start
// (earlier runs' messages, queued ahead of its own): the agent logs no acknowledgement for those,
// so when there were any, the first record not done may be among them and every acknowledgement
// counts, plus a second resend of each. reloaded is how many records the next process loaded
// (its "resending messages kept on disk"), or -1 if unknown: the kill cannot cause more
// duplicates than the records resent after it.
func KillAllowance(own string, resent int, delivered []Delivery, t0 time.Time, reloaded int) int {
	seen := map[uint64]bool{}
	by := map[uint64]bool{}
	for _, d := range delivered {
		if d.ID.Run != own {
			continue
		}
		seen[d.ID.Seq] = true
		if !d.At.After(t0) {
			by[d.ID.Seq] = true
		}
	}
	n := 0
	if resent > 0 {
		n = resent + len(seen)
	} else {
		hole := uint64(1)
		for by[hole] {
			hole++
		}
		for s := range seen {
			if s >= hole {
				n++
			}
		}
	}
	if reloaded >= 0 {
		n = min(n, reloaded)
	}
	return n
}
