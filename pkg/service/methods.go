package service

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"time"
)

// MethodCall is a direct-method invocation (POST /twins/{id}/methods).
type MethodCall struct {
	// MethodName is the method to call.
	MethodName string `json:"methodName"`
	// Payload is the request payload (JSON); nil sends null.
	Payload json.RawMessage `json:"payload"`
	// ResponseTimeout is how long the hub waits for the device's answer (5 s to 300 s); 0 means
	// the hub's default, 30 s. It is sent in whole seconds.
	ResponseTimeout time.Duration `json:"-"`
	// ConnectTimeout is how long the hub waits for the device to connect (0 to 300 s; 0: the
	// device must be online).
	ConnectTimeout time.Duration `json:"-"`
}

// MethodResult is a completed call: the status and payload the device answered with.
type MethodResult struct {
	Status  int             `json:"status"`
	Payload json.RawMessage `json:"payload"`
}

// InvokeMethod calls a direct method on a device and waits for its answer. A device that is
// not connected gives an error matching wire.ErrDeviceNotOnline (404103), one that does not
// answer in time wire.ErrMethodTimeout (504101). The HTTP request is allowed the response and
// connect timeouts plus a margin, whatever the client's own timeout.
func (c *Client) InvokeMethod(ctx context.Context, deviceID string, call MethodCall) (MethodResult, error) {
	if call.MethodName == "" {
		return MethodResult{}, errors.New("service: a method name is required")
	}
	resp := 30
	if call.ResponseTimeout > 0 {
		resp = int((call.ResponseTimeout + time.Second - 1) / time.Second)
	}
	conn := int((call.ConnectTimeout + time.Second - 1) / time.Second)
	payload := call.Payload
	if len(payload) == 0 {
		payload = json.RawMessage("null")
	}
	body := struct {
		MethodName               string          `json:"methodName"`
		Payload                  json.RawMessage `json:"payload"`
		ResponseTimeoutInSeconds int             `json:"responseTimeoutInSeconds"`
		ConnectTimeoutInSeconds  int             `json:"connectTimeoutInSeconds"`
	}{call.MethodName, payload, resp, conn}
	var out MethodResult
	_, err := c.do(ctx, request{method: http.MethodPost, path: "/twins/" + url.PathEscape(deviceID) + "/methods", body: body,
		timeout: time.Duration(resp+conn)*time.Second + 30*time.Second}, &out)
	return out, err
}
