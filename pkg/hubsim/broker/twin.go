package broker

import (
	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/wire"
)

// NotifyDesired queues a desired-properties notification
// ($iothub/twin/PATCH/properties/desired/?$version=N, QoS 0) to the device's current connection
// when it is subscribed to $iothub/twin/PATCH/properties/desired/#, as IoT Hub does: nothing is
// kept for a device that is offline or not subscribed. It reports whether it was queued for the
// connection. It does not block (the twin store calls it under its lock).
func (b *Broker) NotifyDesired(deviceID string, version int64, body []byte) bool {
	ds := b.existingState(deviceID)
	if ds == nil {
		return false
	}
	ds.mu.Lock()
	s := ds.current
	ds.mu.Unlock()
	if s == nil {
		return false
	}
	if !s.subscribed(wire.TwinDesiredFilter) {
		return false
	}
	err := s.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish},
		TopicName:   wire.TwinDesired(version),
		Payload:     body,
	})
	if err != nil {
		s.log.Debug("desired notification not sent", zap.Int64("version", version), zap.Error(err))
		return false
	}
	return true
}
