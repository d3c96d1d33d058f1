package wire

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// ServiceError is the error body of IoT Hub's service REST API:
//
//	{"Message":"ErrorCode:DeviceNotFound;Device dev1 not found.","ExceptionMessage":"Tracking ID:..."}
//
// Microsoft's Node SDK splits Message at ';' and ':' to find the code name, so the shape matters.
type ServiceError struct {
	// Status is the HTTP status; it is not part of the body.
	Status int `json:"-"`
	// Code is the error code name, e.g. "DeviceNotFound".
	Code string `json:"-"`
	// Number is the six-digit error code, e.g. 404001; 0 when unknown.
	Number int `json:"-"`
	// Text is the human-readable message.
	Text string `json:"-"`
}

// Well-known service error codes (name and number), from Microsoft's published list.
var (
	ErrDeviceNotFound       = ServiceError{Status: 404, Code: "DeviceNotFound", Number: 404001}
	ErrDeviceAlreadyExists  = ServiceError{Status: 409, Code: "DeviceAlreadyExists", Number: 409001}
	ErrPreconditionFailed   = ServiceError{Status: 412, Code: "PreconditionFailed", Number: 412001}
	ErrArgumentInvalid      = ServiceError{Status: 400, Code: "ArgumentInvalid", Number: 400004}
	ErrIotHubFormatError    = ServiceError{Status: 400, Code: "IotHubFormatError", Number: 400006}
	ErrUnauthorized         = ServiceError{Status: 401, Code: "IotHubUnauthorizedAccess", Number: 401002}
	ErrMessageTooLarge      = ServiceError{Status: 413, Code: "MessageTooLarge", Number: 413001}
	ErrQueueDepthExceeded   = ServiceError{Status: 403, Code: "DeviceMaximumQueueDepthExceeded", Number: 403004}
	ErrThrottled            = ServiceError{Status: 429, Code: "ThrottlingException", Number: 429001}
	ErrServerError          = ServiceError{Status: 500, Code: "ServerError", Number: 500001}
	ErrDeviceNotOnline      = ServiceError{Status: 404, Code: "DeviceNotOnline", Number: 404103}
	ErrMethodTimeout        = ServiceError{Status: 504, Code: "GatewayTimeout", Number: 504101}
	ErrInvalidProtocolError = ServiceError{Status: 400, Code: "InvalidProtocolVersion", Number: 400001}
)

// WithText returns a copy of e with its message set.
func (e ServiceError) WithText(format string, args ...any) ServiceError {
	e.Text = fmt.Sprintf(format, args...)
	return e
}

func (e ServiceError) Error() string {
	return fmt.Sprintf("iothub: %d %s: %s", e.Status, e.Code, e.Text)
}

// Is matches another ServiceError by code name, so errors.Is(err, wire.ErrDeviceNotFound) works
// whatever the text.
func (e ServiceError) Is(target error) bool {
	t, ok := target.(ServiceError)
	return ok && t.Code == e.Code && (t.Status == 0 || t.Status == e.Status)
}

type serviceErrorBody struct {
	Message          string `json:"Message"`
	ExceptionMessage string `json:"ExceptionMessage"`
}

// MarshalJSON renders Azure's body shape.
func (e ServiceError) MarshalJSON() ([]byte, error) {
	return json.Marshal(serviceErrorBody{
		Message:          "ErrorCode:" + e.Code + ";" + e.Text,
		ExceptionMessage: "ErrorCode:" + e.Code + ";" + strconv.Itoa(e.Number),
	})
}

// ParseServiceError reads an error body as the service sends it. It never fails: a body that is
// not of the expected shape becomes a ServiceError whose Text is the (clipped) body.
func ParseServiceError(status int, body []byte) ServiceError {
	e := ServiceError{Status: status}
	var b serviceErrorBody
	if json.Unmarshal(body, &b) != nil || b.Message == "" {
		e.Text = clip(strings.TrimSpace(string(body)))
		return e
	}
	msg := b.Message
	var nested struct {
		ErrorCode int    `json:"errorCode"`
		Message   string `json:"message"`
	}
	if strings.HasPrefix(msg, "{") && json.Unmarshal([]byte(msg), &nested) == nil && nested.ErrorCode != 0 {
		// Direct-method errors nest a JSON document in Message, with no ErrorCode: prefix.
		e.Number, e.Text = nested.ErrorCode, nested.Message
		for _, k := range []ServiceError{ErrDeviceNotOnline, ErrMethodTimeout} {
			if k.Number == nested.ErrorCode {
				e.Code = k.Code
			}
		}
		return e
	}
	if rest, ok := strings.CutPrefix(msg, "ErrorCode:"); ok {
		code, text, _ := strings.Cut(rest, ";")
		e.Code, e.Text = code, text
	} else {
		e.Text = msg
	}
	if _, num, ok := strings.Cut(b.ExceptionMessage, ";"); ok {
		e.Number, _ = strconv.Atoi(num)
	}
	return e
}

// DeviceError is the JSON body IoT Hub puts on a failed twin response over MQTT, e.g.
// {"errorCode":400004,"message":"..."}. Node's device SDK fails a twin call only when the body
// parses as JSON carrying errorCode.
type DeviceError struct {
	Code    int    `json:"errorCode"`
	Message string `json:"message"`
}

func (e DeviceError) Error() string { return fmt.Sprintf("iothub: error %d: %s", e.Code, e.Message) }
