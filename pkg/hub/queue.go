package hub

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/spool"
)

// queue is the session's telemetry queue: bounded, ordered, at-least-once. Callers push
// (Send, Enqueue) and cancel; everything else belongs to the supervisor goroutine, which moves
// pushed messages in, publishes them with up to maxInFlight awaiting PUBACK, reaps PUBACKs in
// order, expires messages past their deadline and requeues what a lost connection left
// unacknowledged.
//
// With a spool (Config.Spool) every pushed message is appended to it before it is accepted, and
// removed (acknowledged in the spool) only once it completes for a reason of its own: PUBACK,
// expiry, cancellation or drop. Messages failed because the session stops stay on disk for the
// next session. Pushes are serialised by pushMu, so the spool's order is the queue's; the
// supervisor never waits for pushMu, and no lock is held across the spool's fsync.
type queue struct {
	capacity    int
	maxInFlight int
	stats       *stats
	spool       *spool.Spool
	maxBytes    int64 // bound on the spool's bytes; 0: none
	dropOldest  bool
	log         *zap.Logger

	pushMu sync.Mutex // serialises spooled pushes

	n             atomic.Int64 // messages held: pushed and not completed
	cancelPending atomic.Bool  // a caller withdrew a message

	mu       sync.Mutex
	incoming []*outMsg
	refusal  error // once set, push refuses with it

	// Supervisor-owned.
	out        []*outMsg // head: in flight on the current connection (inflight of them)
	inflight   int
	nextExpiry time.Time
}

type outMsg struct {
	topic    string
	body     []byte
	deadline time.Time
	done     func(error)
	canceled atomic.Bool
	seq      uint64 // the spool's sequence number; 0: not spooled
	// Supervisor-owned.
	tok    paho.Token
	sentAt time.Time
}

func (q *queue) init(cfg *Config, st *stats) {
	q.capacity, q.maxInFlight, q.stats = cfg.QueueCapacity, cfg.MaxInFlight, st
	q.spool, q.maxBytes, q.dropOldest = cfg.Spool, cfg.QueueMaxBytes, cfg.WhenFull == WhenFullDropOldest
	q.log = cfg.Logger
}

// full reports whether the queue is at its bounds: QueueCapacity messages, or (with a spool)
// QueueMaxBytes on disk once extra more bytes are added.
func (q *queue) full(n int64, extra int64) bool {
	if n >= int64(q.capacity) {
		return true
	}
	return q.spool != nil && q.maxBytes > 0 && q.spool.Bytes()+extra > q.maxBytes
}

// over reports whether the queue is beyond its bounds.
func (q *queue) over() bool {
	return q.n.Load() > int64(q.capacity) || q.spool != nil && q.maxBytes > 0 && q.spool.Bytes() > q.maxBytes
}

// push accepts m, or refuses it when the queue is full (and the policy is to refuse) or no
// longer takes messages. With WhenFullDropOldest a full queue still accepts up to twice its
// bounds; the supervisor drops the oldest messages not in flight to get back within them.
func (q *queue) push(m *outMsg) error {
	var rec []byte
	if q.spool != nil {
		rec = encodeSpooled(m.topic, m.body)
		q.pushMu.Lock()
		defer q.pushMu.Unlock()
	}
	extra := int64(len(rec)) + 16 // the spool's record header
	q.mu.Lock()
	err := q.refusal
	if err == nil {
		n := q.n.Load()
		switch {
		case !q.full(n, extra):
		case !q.dropOldest:
			err = q.fullErr()
		case n >= 2*int64(q.capacity) || q.spool != nil && q.maxBytes > 0 && q.spool.Bytes()+extra > 2*q.maxBytes:
			err = q.fullErr()
		}
	}
	if err != nil || q.spool == nil {
		defer q.mu.Unlock()
		if err != nil {
			q.stats.rejected.Add(1)
			return err
		}
		q.n.Add(1)
		q.incoming = append(q.incoming, m)
		return nil
	}
	q.mu.Unlock()
	// Disk I/O (and with fsync always, an fsync) without q.mu: the supervisor never waits on it.
	seq, err := q.spool.Append(rec)
	if err != nil {
		q.stats.rejected.Add(1)
		return fmt.Errorf("hub: queue spool: %w", err)
	}
	m.seq = seq
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.refusal != nil { // the session stopped taking messages meanwhile
		q.spool.Ack(seq)
		q.stats.rejected.Add(1)
		return q.refusal
	}
	q.n.Add(1)
	q.incoming = append(q.incoming, m)
	return nil
}

func (q *queue) fullErr() error {
	if q.spool != nil && q.maxBytes > 0 {
		return fmt.Errorf("%w (%d messages, %d of %d bytes on disk)", ErrQueueFull, q.n.Load(), q.spool.Bytes(), q.maxBytes)
	}
	return fmt.Errorf("%w (%d messages)", ErrQueueFull, q.capacity)
}

// dropOverflow drops the oldest messages not in flight while the queue is beyond its bounds
// (WhenFullDropOldest).
func (q *queue) dropOverflow() {
	if !q.dropOldest {
		return
	}
	dropped := 0
	for q.inflight < len(q.out) && q.over() {
		m := q.out[q.inflight]
		q.out = append(q.out[:q.inflight], q.out[q.inflight+1:]...)
		q.stats.dropped.Add(1)
		q.complete(m, ErrDropped)
		dropped++
	}
	if dropped > 0 && q.log != nil {
		q.log.Warn("telemetry queue full: dropped the oldest messages", zap.Int("dropped", dropped),
			zap.Uint64("dropped_total", q.stats.dropped.Load()), zap.Int("held", q.len()))
	}
}

// refuse makes push fail with err from now on; the first refusal stays.
func (q *queue) refuse(err error) {
	q.mu.Lock()
	if q.refusal == nil {
		q.refusal = err
	}
	q.mu.Unlock()
}

// len returns the number of messages held (queued or in flight).
func (q *queue) len() int { return int(q.n.Load()) }

// cancel marks m withdrawn; the supervisor completes it with ErrCanceled unless it is in flight.
func (q *queue) cancel(m *outMsg) {
	m.canceled.Store(true)
	q.cancelPending.Store(true)
}

// pull moves pushed messages to the tail of the supervisor's queue.
func (q *queue) pull() {
	q.mu.Lock()
	in := q.incoming
	q.incoming = nil
	q.mu.Unlock()
	for _, m := range in {
		q.noteDeadline(m)
	}
	q.out = append(q.out, in...)
	q.dropOverflow()
}

func (q *queue) noteDeadline(m *outMsg) {
	if !m.deadline.IsZero() && (q.nextExpiry.IsZero() || m.deadline.Before(q.nextExpiry)) {
		q.nextExpiry = m.deadline
	}
}

// expire fails messages that are not in flight and whose deadline has passed, withdraws
// canceled ones, and recomputes nextExpiry.
func (q *queue) expire(now time.Time) {
	canceled := q.cancelPending.Swap(false)
	if !canceled && (q.nextExpiry.IsZero() || now.Before(q.nextExpiry)) {
		return
	}
	q.nextExpiry = time.Time{}
	kept := q.out[:q.inflight]
	for _, m := range q.out[q.inflight:] {
		switch {
		case m.canceled.Load():
			q.complete(m, ErrCanceled)
		case !m.deadline.IsZero() && !now.Before(m.deadline):
			q.complete(m, fmt.Errorf("%w (deadline %s)", ErrMessageExpired, m.deadline.Format(time.RFC3339Nano)))
		default:
			kept = append(kept, m)
			q.noteDeadline(m)
		}
	}
	clear(q.out[len(kept):])
	q.out = kept
}

// publishMore publishes queued messages on client until maxInFlight await PUBACK.
func (q *queue) publishMore(client mqttClient, now time.Time) {
	for q.inflight < len(q.out) && q.inflight < q.maxInFlight {
		m := q.out[q.inflight]
		if m.canceled.Load() {
			q.out = append(q.out[:q.inflight], q.out[q.inflight+1:]...)
			q.complete(m, ErrCanceled)
			continue
		}
		m.tok = client.Publish(m.topic, 1, false, m.body)
		m.sentAt = now
		q.inflight++
	}
}

// reapAcks completes messages at the head whose PUBACK has arrived, in order; an error means
// the connection failed a publish.
func (q *queue) reapAcks() error {
	defer func() {
		if len(q.out) == 0 {
			q.nextExpiry = time.Time{} // nothing left to expire: no wake-up for a message gone
		}
	}()
	for q.inflight > 0 {
		m := q.out[0]
		select {
		case <-m.tok.Done():
		default:
			return nil
		}
		if err := m.tok.Error(); err != nil {
			return fmt.Errorf("hub: publish: %w", err)
		}
		q.out[0] = nil
		q.out = q.out[1:]
		q.inflight--
		q.complete(m, nil)
	}
	return nil
}

// head returns the oldest message awaiting PUBACK, or nil.
func (q *queue) head() *outMsg {
	if q.inflight == 0 {
		return nil
	}
	return q.out[0]
}

// requeue puts the messages in flight on a connection that ended back at the head (they are
// re-sent on the next connection: at-least-once).
func (q *queue) requeue() {
	for _, m := range q.out[:q.inflight] {
		m.tok = nil
	}
	q.inflight = 0
	// Messages that were in flight may have passed their deadline meanwhile.
	for _, m := range q.out {
		q.noteDeadline(m)
	}
}

// failAll refuses new messages with refusal and fails every held message with reason; it
// returns how many failed.
func (q *queue) failAll(refusal, reason error) int {
	q.mu.Lock()
	q.refusal = refusal
	in := q.incoming
	q.incoming = nil
	q.mu.Unlock()
	q.out = append(q.out, in...)
	n := len(q.out)
	for _, m := range q.out {
		m.seq = 0 // a spooled message stays on disk for the next session
		q.complete(m, reason)
	}
	q.out, q.inflight = nil, 0
	return n
}

// complete reports a message's outcome.
func (q *queue) complete(m *outMsg, err error) {
	q.n.Add(-1)
	if m.seq != 0 {
		q.spool.Ack(m.seq)
	}
	if err == nil {
		q.stats.sent.Add(1)
	} else {
		q.stats.failed.Add(1)
	}
	if m.done != nil {
		m.done(err)
	}
}
