package service

import (
	"context"
	"encoding/base64"
	"net/http"
	"time"

	"github.com/iothubby/iothubby/pkg/hubsim/endpoints"
)

// The calls in this file reach hubsim's additions under /hubsim/; a real IoT Hub answers them
// with 404.

// RecordedMessage is a device-to-cloud message as hubsim recorded it.
type RecordedMessage struct {
	Body             []byte             `json:"body"` // base64 in JSON
	Properties       map[string]*string `json:"properties"`
	SystemProperties map[string]string  `json:"systemProperties"`
}

// Telemetry returns the messages hubsim recorded for a device, oldest first.
func (c *Client) Telemetry(ctx context.Context, deviceID string) ([]RecordedMessage, error) {
	var out struct {
		Messages []RecordedMessage `json:"messages"`
	}
	_, err := c.do(ctx, request{method: http.MethodGet, path: "/hubsim" + devicePath(deviceID) + "/messages/events"}, &out)
	return out.Messages, err
}

// C2DMessage is a cloud-to-device message for hubsim to deliver.
type C2DMessage struct {
	Body            string            `json:"body,omitempty"`
	BodyBase64      string            `json:"bodyBase64,omitempty"`
	Properties      map[string]string `json:"properties,omitempty"`
	MessageID       string            `json:"messageId,omitempty"`
	CorrelationID   string            `json:"correlationId,omitempty"`
	ContentType     string            `json:"contentType,omitempty"`
	ContentEncoding string            `json:"contentEncoding,omitempty"`
	ExpiryTimeUTC   *time.Time        `json:"expiryTimeUtc,omitempty"`
}

// SendC2D asks hubsim to deliver (or queue) a cloud-to-device message and returns its message ID.
func (c *Client) SendC2D(ctx context.Context, deviceID string, m C2DMessage) (string, error) {
	var out struct {
		MessageID string `json:"messageId"`
	}
	_, err := c.do(ctx, request{method: http.MethodPost, path: "/hubsim" + devicePath(deviceID) + "/messages/devicebound", body: m}, &out)
	return out.MessageID, err
}

// SetBinaryBody sets the body from bytes.
func (m *C2DMessage) SetBinaryBody(b []byte) { m.BodyBase64 = base64.StdEncoding.EncodeToString(b) }

// Connection is a live device connection as hubsim lists it.
type Connection struct {
	DeviceID      string    `json:"deviceId"`
	ClientID      string    `json:"clientId"`
	RemoteAddr    string    `json:"remoteAddr"`
	AuthType      string    `json:"authType"`
	ConnectedAt   time.Time `json:"connectedAt"`
	Subscriptions []string  `json:"subscriptions"`
}

// Connections lists hubsim's live device connections.
func (c *Client) Connections(ctx context.Context) ([]Connection, error) {
	var out struct {
		Connections []Connection `json:"connections"`
	}
	_, err := c.do(ctx, request{method: http.MethodGet, path: "/hubsim/connections"}, &out)
	return out.Connections, err
}

// ForHubsim makes a Client for the hubsim whose state directory is stateDir.
func ForHubsim(stateDir string) (*Client, endpoints.Endpoints, error) {
	e, err := endpoints.Read(stateDir)
	if err != nil {
		return nil, e, err
	}
	c, err := New(Config{ConnectionString: e.ServiceConnectionString, Address: e.HTTPSAddress, CAFile: e.CAFile})
	return c, e, err
}
