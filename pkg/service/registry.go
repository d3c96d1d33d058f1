package service

import (
	"context"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// Device is a device identity as the registry serves it.
type Device struct {
	DeviceID                   string          `json:"deviceId"`
	GenerationID               string          `json:"generationId,omitempty"`
	ETag                       string          `json:"etag,omitempty"`
	ConnectionState            string          `json:"connectionState,omitempty"`
	Status                     string          `json:"status,omitempty"`
	StatusReason               string          `json:"statusReason,omitempty"`
	ConnectionStateUpdatedTime *time.Time      `json:"connectionStateUpdatedTime,omitempty"`
	StatusUpdatedTime          *time.Time      `json:"statusUpdatedTime,omitempty"`
	LastActivityTime           *time.Time      `json:"lastActivityTime,omitempty"`
	CloudToDeviceMessageCount  int             `json:"cloudToDeviceMessageCount,omitempty"`
	Authentication             *Authentication `json:"authentication,omitempty"`
	Capabilities               *Capabilities   `json:"capabilities,omitempty"`
}

// Authentication is a device's authentication mechanism.
type Authentication struct {
	// Type is "sas", "selfSigned", "certificateAuthority" or "none".
	Type           string          `json:"type"`
	SymmetricKey   *SymmetricKey   `json:"symmetricKey,omitempty"`
	X509Thumbprint *X509Thumbprint `json:"x509Thumbprint,omitempty"`
}

// SymmetricKey holds a device's keys. Empty keys in a create ask the service to generate them.
type SymmetricKey struct {
	PrimaryKey   string `json:"primaryKey"`
	SecondaryKey string `json:"secondaryKey"`
}

// X509Thumbprint holds the thumbprints of a self-signed device certificate.
type X509Thumbprint struct {
	PrimaryThumbprint   string `json:"primaryThumbprint,omitempty"`
	SecondaryThumbprint string `json:"secondaryThumbprint,omitempty"`
}

// Capabilities of a device.
type Capabilities struct {
	IoTEdge bool `json:"iotEdge"`
}

// RegistryStatistics are the registry's device counts.
type RegistryStatistics struct {
	TotalDeviceCount    int `json:"totalDeviceCount"`
	EnabledDeviceCount  int `json:"enabledDeviceCount"`
	DisabledDeviceCount int `json:"disabledDeviceCount"`
}

func devicePath(id string) string { return "/devices/" + url.PathEscape(id) }

// CreateDevice creates a device (PUT without If-Match). A device with no authentication gets
// generated symmetric keys, as Microsoft's SDK asks for them.
func (c *Client) CreateDevice(ctx context.Context, d Device) (Device, error) {
	if d.Authentication == nil {
		d.Authentication = &Authentication{Type: "sas", SymmetricKey: &SymmetricKey{}}
	}
	var out Device
	_, err := c.do(ctx, request{method: http.MethodPut, path: devicePath(d.DeviceID), body: d}, &out)
	return out, err
}

// UpdateDevice replaces a device. etag "" means unconditional ("*").
func (c *Client) UpdateDevice(ctx context.Context, d Device, etag string) (Device, error) {
	if etag == "" {
		etag = "*"
	}
	var out Device
	_, err := c.do(ctx, request{method: http.MethodPut, path: devicePath(d.DeviceID), body: d, ifMatch: etag}, &out)
	return out, err
}

// GetDevice reads a device.
func (c *Client) GetDevice(ctx context.Context, id string) (Device, error) {
	var out Device
	_, err := c.do(ctx, request{method: http.MethodGet, path: devicePath(id)}, &out)
	return out, err
}

// ListDevices lists up to top devices (0: the service's default).
func (c *Client) ListDevices(ctx context.Context, top int) ([]Device, error) {
	q := url.Values{}
	if top > 0 {
		q.Set("top", strconv.Itoa(top))
	}
	var out []Device
	_, err := c.do(ctx, request{method: http.MethodGet, path: "/devices/", query: q}, &out)
	return out, err
}

// DeleteDevice deletes a device. etag "" means unconditional ("*").
func (c *Client) DeleteDevice(ctx context.Context, id, etag string) error {
	if etag == "" {
		etag = "*"
	}
	_, err := c.do(ctx, request{method: http.MethodDelete, path: devicePath(id), ifMatch: etag}, nil)
	return err
}

// Statistics reads the registry's device counts.
func (c *Client) Statistics(ctx context.Context) (RegistryStatistics, error) {
	var out RegistryStatistics
	_, err := c.do(ctx, request{method: http.MethodGet, path: "/statistics/devices"}, &out)
	return out, err
}
