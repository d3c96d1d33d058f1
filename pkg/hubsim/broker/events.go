package broker

import "time"

// EventKind says what happened on the device endpoint.
type EventKind string

// Event kinds.
const (
	// EventConnected: a device connection was accepted (after CONNACK 0 was sent).
	EventConnected EventKind = "connected"
	// EventRefused: a CONNECT was refused with CONNACK 5; Reason says why.
	EventRefused EventKind = "refused"
	// EventRejected: a connection was closed before MQTT (not a 3.1.1 CONNECT); Reason says why.
	EventRejected EventKind = "rejected"
	// EventDisconnected: an authenticated connection ended, after the registry was updated.
	EventDisconnected EventKind = "disconnected"
	// EventTelemetry: a device-to-cloud message was recorded.
	EventTelemetry EventKind = "telemetry"
	// EventC2DCompleted: a device acknowledged a cloud-to-device message.
	EventC2DCompleted EventKind = "c2d-completed"
)

// Event is an observation of the device endpoint, for tests and recorders.
type Event struct {
	Kind     EventKind
	DeviceID string
	// Remote is the peer address.
	Remote string
	// Reason explains refusals, rejections and disconnections (never a secret).
	Reason string
	// MessageID: telemetry and cloud-to-device events.
	MessageID string
	// Current (disconnections): whether the connection was still the device's current one, so
	// that the registry was set to Disconnected.
	Current bool
	Time    time.Time
}

func (b *Broker) emit(e Event) {
	if b.cfg.OnEvent == nil {
		return
	}
	e.Time = time.Now()
	b.cfg.OnEvent(e)
}
