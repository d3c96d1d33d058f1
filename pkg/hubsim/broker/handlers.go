package broker

import (
	"encoding/json"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/wire"
)

// Caller identifies the device (or module) connection a request came from.
type Caller struct {
	DeviceID     string
	ModuleID     string
	GenerationID string
}

// TwinResponse is a twin handler's answer, sent as
// $iothub/twin/res/{Status}/?$rid={rid}[&$version={Version}].
type TwinResponse struct {
	Status int
	// Version is the new reported version after a PATCH; < 0 leaves $version out.
	Version int64
	Body    []byte
}

// TwinHandler answers a device's twin requests. It is called on the device's connection
// goroutine; the response is written to that device's connection only.
type TwinHandler interface {
	GetTwin(c Caller) TwinResponse
	PatchReported(c Caller, patch []byte) TwinResponse
}

// MethodResponseHandler receives a device's direct-method responses.
type MethodResponseHandler interface {
	MethodResponse(c Caller, rid string, status int, body []byte)
}

// stubTwins is this slice's minimal twin: GET answers an empty twin at version 1 (enough for
// request/response correlation), PATCH answers 500 "not implemented".
type stubTwins struct{}

const emptyTwin = `{"desired":{"$version":1},"reported":{"$version":1}}`

func (stubTwins) GetTwin(Caller) TwinResponse {
	return TwinResponse{Status: 200, Version: -1, Body: []byte(emptyTwin)}
}

func (stubTwins) PatchReported(Caller, []byte) TwinResponse {
	body, _ := json.Marshal(wire.DeviceError{Code: 500001, Message: "hubsim: reported properties are not implemented yet"})
	return TwinResponse{Status: 500, Version: -1, Body: body}
}

type logMethods struct{ log *zap.Logger }

func (l logMethods) MethodResponse(c Caller, rid string, status int, body []byte) {
	l.log.Debug("method response ignored (no method handler)", zap.String("device", c.DeviceID),
		zap.String("rid", rid), zap.Int("status", status), zap.Int("bytes", len(body)))
}
