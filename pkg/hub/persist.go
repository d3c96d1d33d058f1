package hub

import (
	"encoding/binary"
	"errors"
	"fmt"

	"go.uber.org/zap"
)

// Queue-full policies (Config.WhenFull).
const (
	// WhenFullRefuseNewest refuses a new message while the queue is full (ErrQueueFull).
	WhenFullRefuseNewest = "refuseNewest"
	// WhenFullDropOldest accepts a new message and drops the oldest one not in flight, which
	// fails with ErrDropped.
	WhenFullDropOldest = "dropOldest"
)

// ErrDropped is the outcome of a message dropped to make room for a newer one
// (WhenFullDropOldest).
var ErrDropped = errors.New("hub: message dropped from a full queue")

// A spooled message is [4-byte topic length, little endian][topic][body]: the topic already
// carries the message's properties, including $.mid.

func encodeSpooled(topic string, body []byte) []byte {
	b := make([]byte, 4, 4+len(topic)+len(body))
	binary.LittleEndian.PutUint32(b, uint32(len(topic)))
	b = append(b, topic...)
	return append(b, body...)
}

func decodeSpooled(b []byte) (topic string, body []byte, err error) {
	if len(b) < 4 {
		return "", nil, fmt.Errorf("spooled message of %d bytes", len(b))
	}
	n := binary.LittleEndian.Uint32(b)
	if uint64(n) > uint64(len(b)-4) {
		return "", nil, fmt.Errorf("spooled message: topic of %d bytes in %d", n, len(b)-4)
	}
	if n == 0 {
		return "", nil, errors.New("spooled message without a topic")
	}
	return string(b[4 : 4+n]), b[4+n:], nil
}

// loadSpool queues the messages a previous session or process left in the spool, ahead of any
// new one. A record that does not decode is logged, counted as failed and removed.
func (s *Session) loadSpool() error {
	sp := s.cfg.Spool
	if sp == nil {
		return nil
	}
	recs, err := sp.Pending()
	if err != nil {
		return fmt.Errorf("hub: queue spool: %w", err)
	}
	for _, r := range recs {
		topic, body, err := decodeSpooled(r.Data)
		if err != nil {
			s.log.Error("queue spool: dropping an undecodable record", zap.Uint64("seq", r.Seq), zap.Error(err))
			s.stats.failed.Add(1)
			sp.Ack(r.Seq)
			continue
		}
		s.q.n.Add(1)
		s.q.incoming = append(s.q.incoming, &outMsg{topic: topic, body: body, seq: r.Seq})
	}
	if len(recs) > 0 {
		s.log.Info("queue spool: resending messages kept on disk", zap.Int("messages", len(recs)),
			zap.Int64("bytes", sp.Bytes()))
	}
	return nil
}
