package hub

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// queue is the session's telemetry queue: bounded, ordered, at-least-once. Callers push
// (Send, Enqueue) and cancel; everything else belongs to the supervisor goroutine, which moves
// pushed messages in, publishes them with up to maxInFlight awaiting PUBACK, reaps PUBACKs in
// order, expires messages past their deadline and requeues what a lost connection left
// unacknowledged.
type queue struct {
	capacity    int
	maxInFlight int
	stats       *stats

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
	// Supervisor-owned.
	tok    paho.Token
	sentAt time.Time
}

func (q *queue) init(capacity, maxInFlight int, st *stats) {
	q.capacity, q.maxInFlight, q.stats = capacity, maxInFlight, st
}

// push accepts m, or refuses it when the queue is full or no longer takes messages.
func (q *queue) push(m *outMsg) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	switch {
	case q.refusal != nil:
		q.stats.rejected.Add(1)
		return q.refusal
	case q.n.Load() >= int64(q.capacity):
		q.stats.rejected.Add(1)
		return fmt.Errorf("%w (%d messages)", ErrQueueFull, q.capacity)
	}
	q.n.Add(1)
	q.incoming = append(q.incoming, m)
	return nil
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
func (q *queue) publishMore(client paho.Client, now time.Time) {
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
		q.complete(m, reason)
	}
	q.out, q.inflight = nil, 0
	return n
}

// complete reports a message's outcome.
func (q *queue) complete(m *outMsg, err error) {
	q.n.Add(-1)
	if err == nil {
		q.stats.sent.Add(1)
	} else {
		q.stats.failed.Add(1)
	}
	if m.done != nil {
		m.done(err)
	}
}
