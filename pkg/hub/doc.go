// Package hub is one device's (or module's) Azure IoT Hub session over MQTT 3.1.1 on TLS, built
// on github.com/eclipse/paho.mqtt.golang, or with [Config.LeanMQTT] on internal/mqttc (one
// goroutine per connection instead of paho's ten; `agent fleet` uses it).
//
// A [Session] owns staying connected: paho's own reconnect logic is switched off and a
// supervisor goroutine dials, waits for CONNACK, subscribes (cloud-to-device, twin responses,
// desired properties, methods) before anything is published on the connection, and on loss
// reconnects with exponential backoff and full jitter ([Backoff]). SAS tokens are built fresh for
// every connect and renewed by a planned reconnect before 85% of their lifetime has passed, as
// Microsoft's SDKs do over MQTT 3.1.1. Connection changes are reported as (status, reason)
// pairs like the SDKs' ([Status]).
//
// Telemetry ([Session.Send], [Session.Enqueue]) waits in a bounded, ordered queue while offline;
// every accepted message is either acknowledged by the hub (PUBACK) or reported as failed with a
// reason. Twin operations are correlated by $rid ([Session.Request], [Session.TwinGet],
// [Session.TwinPatchReported]); requests still pending when a connection drops fail with
// [ErrConnectionLost] and are never answered from a later connection. Cloud-to-device messages,
// desired-property patches and method requests are delivered to handlers from a session-owned
// dispatcher goroutine; [Session.RespondMethod] answers a method only on the connection that
// received it, never waits for a connection (a method does not outlive the connection that
// delivered it: without one it fails at once with [ErrNotConnected]), and is published by the
// supervisor, so it blocks only its caller. [Session.RespondMethodAsync] does not wait at all:
// handlers running on the dispatcher (which also delivers C2D messages and desired patches) use
// it for refusals such as 501, 400 or 429.
//
// Inside, each mechanism has one owner, in its own file: conn.go is one MQTT connection (its
// net.Conn and paho client, Done/Err, the method requests it delivered) and knows nothing of the
// session; queue.go is the telemetry queue; requests.go is the $rid correlation; supervisor.go
// stays connected (backoff, renewal, retry expiry) and drives the queue; inbound.go routes
// paho's deliveries and runs the dispatcher. Every timer of the session (renewal, backoff,
// retry expiry, the SUBACK and PUBACK timeouts, message expiry) is the supervisor's one timer
// from [Config.Clock], so tests run them on pkg/clock's fake clock; only the network's
// own deadlines (dial, TLS, paho's CONNACK and ping waits) are on the wall clock.
//
// Goroutines: a session runs one of its own (the supervisor) on top of paho's per-connection
// ones while it connects, waits to reconnect or has messages in flight; while connected and
// idle the supervisor parks without a goroutine and the next event (telemetry, a method answer,
// the connection's end, Close, the renewal time) resumes it on a fresh one. A dispatcher exists
// only while handler events are waiting and a dial goroutine only while a connection is being
// opened, so an idle, connected device in a fleet costs no goroutine beyond paho's. No paho callback blocks or waits on a token: callbacks only
// hand events over through bounded, non-blocking queues. [Session.Close] drains the telemetry
// queue within a deadline, fails what is left, sends MQTT DISCONNECT and waits for every
// goroutine it started.
package hub
