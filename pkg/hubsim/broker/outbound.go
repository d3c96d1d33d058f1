package broker

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/zap"
)

// Hub-to-device writes (twin responses, desired notifications, method requests, cloud-to-device
// messages) never happen on the caller's goroutine: the caller may hold a store lock (the twin
// store notifies under its lock) or answer a REST request (a method call must get its 504 at its
// timeout whatever the device does). Each session has a bounded outbound queue, drained by a
// writer goroutine that runs only while the queue is not empty. Every write to the network has
// a deadline (devConn.Write). A device that does not read is disconnected, as IoT Hub does: when
// its queue passes OutboundBytes, or when one write does not complete within WriteTimeout.

const (
	// DefaultOutboundBytes bounds what may wait in one connection's outbound queue.
	DefaultOutboundBytes = 4 << 20
	// DefaultWriteTimeout bounds one write to a device's connection.
	DefaultWriteTimeout = 10 * time.Second
)

// ReasonNotReading starts the close reason of a device disconnected because it does not read
// what the hub sends it.
const ReasonNotReading = "device is not reading"

// ErrOutboundFull means a packet was refused because the device's outbound queue is full; the
// connection is being closed.
var ErrOutboundFull = errors.New("broker: device's outbound queue is full")

// errSessionEnded means the connection ended before the packet could be queued.
var errSessionEnded = errors.New("broker: connection has ended")

type outbound struct {
	mu      sync.Mutex
	q       []packets.Packet
	bytes   int
	writing bool // a writer goroutine is draining q
	ended   bool
}

// packetCost approximates a packet's encoded size for the queue bound.
func packetCost(pk *packets.Packet) int { return len(pk.TopicName) + len(pk.Payload) + 16 }

// send queues pk for the device. It never blocks on the network.
func (s *session) send(pk packets.Packet) error {
	cost := packetCost(&pk)
	o := &s.out
	o.mu.Lock()
	if o.ended {
		o.mu.Unlock()
		return errSessionEnded
	}
	if limit := s.b.cfg.OutboundBytes; o.bytes+cost > limit {
		pending := o.bytes
		o.ended, o.q = true, nil
		o.mu.Unlock()
		s.close(fmt.Sprintf("%s: %d bytes of hub-to-device packets pending, a %d-byte packet would pass the %d-byte limit", ReasonNotReading, pending, cost, limit))
		return ErrOutboundFull
	}
	o.q = append(o.q, pk)
	o.bytes += cost
	start := !o.writing
	o.writing = true
	o.mu.Unlock()
	if start && !s.b.grp.Go(s.writeLoop) {
		s.endOutbound() // the broker is closing
		return errSessionEnded
	}
	return nil
}

// writeLoop writes queued packets in order until the queue is empty or the connection ends.
func (s *session) writeLoop() {
	o := &s.out
	for {
		o.mu.Lock()
		if o.ended || len(o.q) == 0 {
			o.writing = false
			o.mu.Unlock()
			return
		}
		pk := o.q[0]
		o.q[0] = packets.Packet{}
		o.q = o.q[1:]
		o.mu.Unlock()

		err := s.cl.WritePacket(pk)

		o.mu.Lock()
		o.bytes -= packetCost(&pk)
		o.mu.Unlock()
		if err != nil {
			s.endOutbound()
			reason := fmt.Sprintf("writing to the device failed: %v", err)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				reason = fmt.Sprintf("%s: a write did not complete within %s", ReasonNotReading, s.b.cfg.WriteTimeout)
			}
			s.log.Debug("hub-to-device write failed", zap.String("topic", maskTopic(pk.TopicName)), zap.Error(err))
			s.close(reason)
			return
		}
	}
}

// endOutbound drops what is queued and refuses more; the writer, if running, stops.
func (s *session) endOutbound() {
	o := &s.out
	o.mu.Lock()
	o.ended, o.q = true, nil
	o.mu.Unlock()
}
