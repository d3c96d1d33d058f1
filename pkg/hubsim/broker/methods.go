package broker

import (
	"errors"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/iothubby/iothubby/pkg/wire"
)

// ErrNotSubscribed means the device has no connection subscribed to direct methods.
var ErrNotSubscribed = errors.New("broker: device is not connected and subscribed to methods")

// SendMethodRequest queues a direct-method request ($iothub/methods/POST/{method}/?$rid={rid},
// QoS 0, as IoT Hub sends it) to the device's current connection, if that connection is
// subscribed to $iothub/methods/POST/#. It does not block.
func (b *Broker) SendMethodRequest(deviceID, method, rid string, payload []byte) error {
	ds := b.existingState(deviceID)
	if ds == nil {
		return ErrNotSubscribed
	}
	ds.mu.Lock()
	s := ds.current
	ds.mu.Unlock()
	if s == nil {
		return ErrNotSubscribed
	}
	if !s.subscribed(wire.MethodsFilter) {
		return ErrNotSubscribed
	}
	return s.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish},
		TopicName:   wire.MethodRequest(method, rid),
		Payload:     payload,
	})
}

// SubscriptionSignal returns a channel that is closed the next time any device's subscriptions
// change. Take it before checking a condition, then wait on it, so no change is missed.
func (b *Broker) SubscriptionSignal() <-chan struct{} {
	b.subMu.Lock()
	defer b.subMu.Unlock()
	if b.subCh == nil {
		b.subCh = make(chan struct{})
	}
	return b.subCh
}

func (b *Broker) signalSubscribed() {
	b.subMu.Lock()
	if b.subCh != nil {
		close(b.subCh)
		b.subCh = nil
	}
	b.subMu.Unlock()
}
