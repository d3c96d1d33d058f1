package broker

import (
	"crypto/rand"
	"fmt"
	"slices"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/wire"
)

// Cloud-to-device limits and defaults, as IoT Hub's.
const (
	MaxC2DQueue = 50
	MaxC2DSize  = 64 * 1024
	// DefaultC2DTTL is how long a message sent without an expiry time waits for its device.
	DefaultC2DTTL = time.Hour
	// MaxC2DDeliveries is IoT Hub's default maxDeliveryCount: a message delivered this many times
	// without being completed (the connection dropped before the PUBACK) is dead-lettered with
	// DeliveryCountExceeded.
	MaxC2DDeliveries = 10
)

// C2DMessage is a cloud-to-device message to queue.
type C2DMessage struct {
	MessageID       string
	CorrelationID   string
	UserID          string
	ContentType     string
	ContentEncoding string
	// ExpiryTime, when set, drops the message if it has not been delivered by then.
	ExpiryTime time.Time
	// Ack is iothub-ack (none, positive, negative, full); empty leaves it out.
	Ack string
	// Properties are application properties.
	Properties wire.Properties
	Body       []byte
	// OnOutcome, when set, learns once what became of the message: FeedbackSuccess when the
	// device completed it, FeedbackExpired when it expired undelivered. It is called without
	// broker locks held and must not block.
	OnOutcome func(status string)
}

// Feedback status codes, as IoT Hub's feedback records spell them.
const (
	FeedbackSuccess               = "Success"
	FeedbackExpired               = "Expired"
	FeedbackDeliveryCountExceeded = "DeliveryCountExceeded"
	FeedbackRejected              = "Rejected"
	FeedbackPurged                = "Purged"
)

type c2dEntry struct {
	msg      C2DMessage
	enqueued time.Time
	// expires is the message's expiry time, or enqueued + DefaultC2DTTL when it has none.
	expires time.Time
	// deliveries counts the times the message was written to a connection.
	deliveries int
	// sess and pid are set while the message is in flight on a connection (sent, not acked).
	sess *session
	pid  uint16
}

// size counts the message as IoT Hub does for its 64 KB limit (body, property names and values).
func (m *C2DMessage) size() int {
	n := len(m.Body) + len(m.MessageID) + len(m.CorrelationID) + len(m.UserID) + len(m.ContentType) + len(m.ContentEncoding) + len(m.Ack)
	for _, p := range m.Properties {
		n += len(p.Key) + len(p.Value)
	}
	return n
}

// validC2DToken reports whether s uses only what IoT Hub allows in cloud-to-device property
// names and values: ASCII letters, digits and ! # $ % & ' * + - . ^ _ ` | ~.
func validC2DToken(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' {
			continue
		}
		switch c {
		case '!', '#', '$', '%', '&', '\'', '*', '+', '-', '.', '^', '_', '`', '|', '~':
			continue
		}
		return false
	}
	return true
}

// NewMessageID returns a random UUID (version 4).
func NewMessageID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// SendC2D queues a cloud-to-device message and returns its message ID (generated when empty).
// It is delivered at once when the device is connected and subscribed to its devicebound
// filter, else when it next is. Errors: DeviceNotFound, DeviceMaximumQueueDepthExceeded (50
// pending), MessageTooLarge (64 KB), ArgumentInvalid (property characters).
func (b *Broker) SendC2D(deviceID string, m C2DMessage) (string, error) {
	id, ok := b.reg.Identity(deviceID)
	if !ok {
		return "", wire.ErrDeviceNotFound.WithText("Device %s not registered", deviceID)
	}
	for i, p := range m.Properties {
		if p.Key == "" || wire.System(p.Key) || !validC2DToken(p.Key) || !validC2DToken(p.Value) {
			return "", wire.ErrArgumentInvalid.WithText("property %q: names and values may use only ASCII letters, digits and !#$%%&'*+-.^_`|~", p.Key)
		}
		if slices.ContainsFunc(m.Properties[:i], func(q wire.Property) bool { return q.Key == p.Key }) {
			return "", wire.ErrArgumentInvalid.WithText("property %q given twice", p.Key)
		}
	}
	if m.size() > MaxC2DSize {
		return "", wire.ErrMessageTooLarge.WithText("Message size %d exceeds the limit of %d bytes", m.size(), MaxC2DSize)
	}
	if m.MessageID == "" {
		m.MessageID = NewMessageID()
	}
	now := time.Now()
	ds := b.state(deviceID, id.GenerationID)
	ds.mu.Lock()
	expired := ds.dropExpired(now)
	if len(ds.queue) >= MaxC2DQueue {
		ds.mu.Unlock()
		notifyExpired(expired)
		return "", wire.ErrQueueDepthExceeded.WithText("Device %s has %d messages pending, the maximum", deviceID, MaxC2DQueue)
	}
	ds.queue = append(ds.queue, &c2dEntry{msg: m, enqueued: now, expires: expiryOf(&m, now)})
	n := len(ds.queue)
	ds.mu.Unlock()
	notifyExpired(expired)
	b.reg.SetCloudToDeviceMessageCount(deviceID, id.GenerationID, n)
	b.kick(ds)
	return m.MessageID, nil
}

// expiryOf is when a message enqueued at now expires: its own expiry time, else DefaultC2DTTL
// later, as IoT Hub applies its default time to live.
func expiryOf(m *C2DMessage, now time.Time) time.Time {
	if !m.ExpiryTime.IsZero() {
		return m.ExpiryTime
	}
	return now.Add(DefaultC2DTTL)
}

// dropExpired removes undelivered expired messages and returns them. Call with ds.mu held, and
// notifyExpired after releasing it.
func (ds *deviceState) dropExpired(now time.Time) []*c2dEntry {
	var expired []*c2dEntry
	ds.queue = slices.DeleteFunc(ds.queue, func(e *c2dEntry) bool {
		if e.sess == nil && now.After(e.expires) {
			expired = append(expired, e)
			return true
		}
		return false
	})
	return expired
}

// SweepExpiredC2D drops the undelivered expired messages of every device now (they are
// otherwise dropped when their device's queue is next used), so their senders learn it.
func (b *Broker) SweepExpiredC2D() {
	b.devMu.Lock()
	all := make([]*deviceState, 0, len(b.devices))
	for _, ds := range b.devices {
		all = append(all, ds)
	}
	b.devMu.Unlock()
	now := time.Now()
	for _, ds := range all {
		ds.mu.Lock()
		expired := ds.dropExpired(now)
		n := len(ds.queue)
		ds.mu.Unlock()
		if len(expired) > 0 {
			notifyExpired(expired)
			b.reg.SetCloudToDeviceMessageCount(ds.id, ds.generationID, n)
		}
	}
}

func notifyExpired(expired []*c2dEntry) { notifyOutcome(expired, FeedbackExpired) }

// notifyOutcome tells each message's sender what became of it. Call without locks held.
func notifyOutcome(entries []*c2dEntry, status string) {
	for _, e := range entries {
		if e.msg.OnOutcome != nil {
			e.msg.OnOutcome(status)
		}
	}
}

// PurgeC2D drops every cloud-to-device message queued or in flight for a device (IoT Hub's
// DELETE /devices/{id}/commands) and returns how many; each sender learns FeedbackPurged. A
// device that completes a purged message later completes nothing.
func (b *Broker) PurgeC2D(deviceID string) (int, error) {
	id, ok := b.reg.Identity(deviceID)
	if !ok {
		return 0, wire.ErrDeviceNotFound.WithText("Device %s not registered", deviceID)
	}
	ds := b.existingState(deviceID)
	if ds == nil || ds.generationID != id.GenerationID {
		return 0, nil
	}
	ds.mu.Lock()
	purged := ds.queue
	ds.queue = nil
	ds.mu.Unlock()
	b.reg.SetCloudToDeviceMessageCount(deviceID, id.GenerationID, 0)
	notifyOutcome(purged, FeedbackPurged)
	return len(purged), nil
}

// kick makes sure a delivery pump runs for ds. The pump is a goroutine owned by the broker that
// exits when nothing is left to send.
func (b *Broker) kick(ds *deviceState) {
	ds.mu.Lock()
	if ds.pumping {
		ds.mu.Unlock()
		return
	}
	ds.pumping = true
	ds.mu.Unlock()
	if !b.grp.Go(func() { b.pump(ds) }) {
		ds.mu.Lock()
		ds.pumping = false
		ds.mu.Unlock()
	}
}

type outgoing struct {
	topic string
	body  []byte
	pid   uint16
	mid   string
}

func (b *Broker) pump(ds *deviceState) {
	for {
		ds.mu.Lock()
		s := ds.current
		var batch []outgoing
		var expired []*c2dEntry
		if s != nil && s.subscribedC2D() {
			expired = ds.dropExpired(time.Now())
			for _, e := range ds.queue {
				if e.sess != nil {
					continue
				}
				e.sess, e.pid = s, ds.nextPacketID(s)
				e.deliveries++
				batch = append(batch, outgoing{topic: c2dTopic(ds.id, &e.msg), body: e.msg.Body, pid: e.pid, mid: e.msg.MessageID})
			}
		}
		if len(batch) == 0 {
			ds.pumping = false
			ds.mu.Unlock()
			notifyExpired(expired)
			return
		}
		ds.mu.Unlock()
		notifyExpired(expired)
		for _, o := range batch {
			err := s.send(packets.Packet{
				FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
				TopicName:   o.topic,
				Payload:     o.body,
				PacketID:    o.pid,
			})
			if err == nil && b.c2dDuplicate(ds.id, o.mid) {
				// c2d-duplicate fault: the same message again under another packet ID (whose
				// PUBACK completes nothing).
				ds.mu.Lock()
				pid := ds.nextPacketID(s)
				ds.mu.Unlock()
				err = s.send(packets.Packet{
					FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
					TopicName:   o.topic,
					Payload:     o.body,
					PacketID:    pid,
				})
			}
			if err != nil {
				// The connection is ending; its disconnect returns the messages to the queue.
				b.log.Debug("cloud-to-device message not sent", zap.String("device", ds.id), zap.Error(err))
				break
			}
		}
	}
}

func c2dTopic(deviceID string, m *C2DMessage) string {
	props := make(wire.Properties, 0, 8+len(m.Properties))
	props = append(props, wire.Property{Key: wire.PropMessageID, Value: m.MessageID})
	props = append(props, wire.Property{Key: wire.PropTo, Value: "/devices/" + deviceID + "/messages/deviceBound"})
	add := func(k, v string) {
		if v != "" {
			props = append(props, wire.Property{Key: k, Value: v})
		}
	}
	add(wire.PropCorrelationID, m.CorrelationID)
	add(wire.PropUserID, m.UserID)
	add(wire.PropContentType, m.ContentType)
	add(wire.PropContentEncoding, m.ContentEncoding)
	if !m.ExpiryTime.IsZero() {
		add(wire.PropExpiry, m.ExpiryTime.UTC().Format(EnqueuedTimeFormat))
	}
	add("iothub-ack", m.Ack)
	props = append(props, m.Properties...)
	return wire.C2D(deviceID, props)
}

// acked completes the in-flight message that s sent with packet ID pid.
func (b *Broker) acked(s *session, pid uint16) {
	ds := s.ds
	ds.mu.Lock()
	i := slices.IndexFunc(ds.queue, func(e *c2dEntry) bool { return e.sess == s && e.pid == pid })
	if i < 0 {
		ds.mu.Unlock()
		return
	}
	mid, onOutcome := ds.queue[i].msg.MessageID, ds.queue[i].msg.OnOutcome
	ds.queue = slices.Delete(ds.queue, i, i+1)
	n := len(ds.queue)
	ds.mu.Unlock()
	if onOutcome != nil {
		onOutcome(FeedbackSuccess)
	}
	b.reg.SetCloudToDeviceMessageCount(ds.id, ds.generationID, n)
	b.emit(Event{Kind: EventC2DCompleted, DeviceID: ds.id, Remote: s.remote, MessageID: mid})
}

// PendingC2D is the number of cloud-to-device messages queued or in flight for a device.
func (b *Broker) PendingC2D(deviceID string) int {
	ds := b.existingState(deviceID)
	if ds == nil {
		return 0
	}
	ds.mu.Lock()
	defer ds.mu.Unlock()
	return len(ds.queue)
}
