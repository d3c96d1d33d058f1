package broker

import (
	"errors"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
)

// IoT Hub tier throttling on the device endpoint (Config.Throttle; off when nil), as the notes
// (protocol-amqp.md §9) say the hub answers:
//   - a CONNECT over the new-connection rate gets CONNACK 3 (server unavailable), which the SDKs
//     retry (Node: ServiceUnavailableError; C#: a retryable IotHubCommunicationException);
//   - telemetry over the device-to-cloud rate closes the connection: MQTT 3.1.1 cannot refuse a
//     PUBLISH, and IoT Hub drops MQTT devices it throttles; the message is not acknowledged;
//   - twin GETs and reported-property PATCHes over the twin rates get status 429 on
//     $iothub/twin/res/429/?$rid=... with a 429001 ThrottlingException body.
//
// Every refusal is counted by the Limiter (GET /hubsim/throttle) and logged, sampled: a storm of
// refusals must not flood the log.

// Log messages of throttle refusals (sampled).
const (
	LogConnectThrottled = "device connection refused: CONNACK 3 (throttled)"
	LogTwinThrottled    = "twin request throttled: 429"
)

// ReasonD2CThrottled is why a device sending telemetry over the tier's rate is disconnected.
const ReasonD2CThrottled = "device-to-cloud throttled (over the tier's send rate)"

// ReasonConnectThrottled is the Reason of the EventRefused of a throttled CONNECT.
const ReasonConnectThrottled = "new connections throttled (over the tier's connect rate)"

// Throttle log sampling: the first throttleLogFirst messages of a kind each second, then one in
// throttleLogThereafter.
const (
	throttleLogFirst      = 5
	throttleLogThereafter = 1000
)

var errThrottled = errors.New("connect refused: throttled")

func newThrottleLog(log *zap.Logger) *zap.Logger {
	return log.WithOptions(zap.WrapCore(func(c zapcore.Core) zapcore.Core {
		return zapcore.NewSamplerWithOptions(c, time.Second, throttleLogFirst, throttleLogThereafter)
	}))
}

// refuseByThrottle answers a CONNECT over the tier's connect rate with CONNACK 3 and reports
// whether it did.
func (b *Broker) refuseByThrottle(cl *mqtt.Client, pk packets.Packet) bool {
	if b.cfg.Throttle.Allow(throttle.Connect) {
		return false
	}
	id := pk.Connect.ClientIdentifier
	b.throttleLog.Info(LogConnectThrottled, zap.String("client_id", maskTopic(id)), zap.String("remote", cl.Net.Remote))
	_ = b.mqtt.SendConnack(cl, packets.ErrServerUnavailable, false, nil)
	b.emit(Event{Kind: EventRefused, DeviceID: id, Remote: cl.Net.Remote, Reason: ReasonConnectThrottled})
	return true
}

// throttleTelemetry closes the connection of a device whose telemetry is over the tier's rate
// and reports whether it did.
func (s *session) throttleTelemetry() bool {
	if s.b.cfg.Throttle.Allow(throttle.D2C) {
		return false
	}
	s.b.throttleLog.Info("closing device connection", zap.String("device", s.deviceID), zap.String("reason", ReasonD2CThrottled))
	s.close(ReasonD2CThrottled)
	return true
}

// throttledTwin answers a twin request over the tier's rate with 429 and reports whether it did.
func (s *session) throttledTwin(rid string, op throttle.Op) bool {
	if s.b.cfg.Throttle.Allow(op) {
		return false
	}
	s.b.throttleLog.Info(LogTwinThrottled, zap.String("device", s.deviceID), zap.String("op", string(op)))
	s.respondTwin(rid, TwinResponse{Status: 429, Version: -1, Body: []byte(throttledTwinBody)})
	return true
}

// throttledTwinBody is a wire.DeviceError: Node's device SDK fails a twin call on its errorCode.
const throttledTwinBody = `{"errorCode":429001,"message":"ThrottlingException: twin operations over the hub tier's rate; retry later"}`
