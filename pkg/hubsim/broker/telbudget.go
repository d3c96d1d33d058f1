package broker

import "sync"

// DefaultTelemetryBytes bounds the recorded telemetry of all devices together (Config.
// TelemetryBytes): 1000 messages of 256 KB for each of many devices would otherwise grow hubsim
// without limit.
const DefaultTelemetryBytes = 256 << 20

// telemetryBudget keeps the recorded telemetry of all devices within Config.TelemetryBytes by
// dropping the oldest messages first, whatever their device. Records are queued here in the order
// they were added; a queued reference whose record a device already dropped (its own count
// limit, or the device deleted) is stale and skipped. Lock order: telemetryBudget.mu, then a
// deviceState's mu; record takes them one after the other, never nested the other way.
type telemetryBudget struct {
	mu    sync.Mutex
	refs  []telRef // oldest first, from head
	head  int
	bytes int64 // memory of the records still held by the rings
	held  int   // records still held by the rings
}

type telRef struct {
	ds   *deviceState
	seq  uint64
	size int
}

// record adds m to ds's recorded telemetry and keeps every device's record within the budget.
func (b *Broker) record(ds *deviceState, m Message) {
	ds.mu.Lock()
	seq, size, evicted := ds.telemetry.add(m)
	ds.mu.Unlock()
	if size == 0 {
		return
	}
	t := &b.tel
	t.mu.Lock()
	defer t.mu.Unlock()
	t.refs = append(t.refs, telRef{ds: ds, seq: seq, size: size})
	t.bytes += int64(size - evicted)
	if evicted == 0 {
		t.held++
	}
	for t.bytes > b.cfg.TelemetryBytes && t.head < len(t.refs) {
		r := t.refs[t.head]
		t.refs[t.head] = telRef{}
		t.head++
		r.ds.mu.Lock()
		freed := r.ds.telemetry.dropOldestUpTo(r.seq)
		r.ds.mu.Unlock()
		if freed > 0 {
			t.bytes -= int64(freed)
			t.held--
		}
	}
	t.compact()
}

// compact drops consumed and stale references once they outnumber the records held, so the
// queue stays proportional to what is recorded. Call with t.mu held.
func (t *telemetryBudget) compact() {
	if n := len(t.refs) - t.head; n < 1024 || n < 2*t.held {
		return
	}
	live := t.refs[:0]
	for _, r := range t.refs[t.head:] {
		r.ds.mu.Lock()
		ok := r.ds.telemetry.holds(r.seq)
		r.ds.mu.Unlock()
		if ok {
			live = append(live, r)
		}
	}
	clear(t.refs[len(live):])
	t.refs, t.head = live, 0
}

// release accounts for n records of freed bytes a device dropped as a whole (deleted).
func (t *telemetryBudget) release(freed, n int) {
	if n == 0 {
		return
	}
	t.mu.Lock()
	t.bytes -= int64(freed)
	t.held -= n
	t.mu.Unlock()
}

// TelemetryMemory reports the recorded telemetry's approximate memory and record count, for
// tests and the admin API.
func (b *Broker) TelemetryMemory() (bytes int64, records int) {
	b.tel.mu.Lock()
	defer b.tel.mu.Unlock()
	return b.tel.bytes, b.tel.held
}
