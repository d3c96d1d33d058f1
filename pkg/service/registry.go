package service

import (
	"context"
	"net/http"
	"net/url"
	"strconv"

	"github.com/iothubby/iothubby/pkg/hubapi"
)

// The registry's documents are hubapi's, defined once for this client and hubsim's REST API.
type (
	// Device is a device identity in Azure's JSON shape (hubapi.Device).
	Device = hubapi.Device
	// Authentication is a device's authentication mechanism; Type is "sas", "selfSigned",
	// "certificateAuthority" or "none".
	Authentication = hubapi.Authentication
	// SymmetricKey holds a device's keys. Empty keys in a create ask the service to generate them.
	SymmetricKey = hubapi.SymmetricKey
	// X509Thumbprint holds the thumbprints of a self-signed device certificate.
	X509Thumbprint = hubapi.X509Thumbprint
	// Capabilities of a device.
	Capabilities = hubapi.Capabilities
	// RegistryStatistics are the registry's device counts.
	RegistryStatistics = hubapi.RegistryStatistics
)

// withDefaults fills what Microsoft's SDKs fill before they send a device: status enabled, and
// an authentication type (selfSigned with a thumbprint, else sas) so that the service never
// reads an empty type.
func withDefaults(d Device) Device {
	if d.Status == "" {
		d.Status = hubapi.StatusEnabled
	}
	if d.Authentication.Type == "" {
		d.Authentication.Type = hubapi.AuthSAS
		if d.Authentication.X509Thumbprint != (X509Thumbprint{}) {
			d.Authentication.Type = hubapi.AuthSelfSigned
		}
	}
	return d
}

func devicePath(id string) string { return "/devices/" + url.PathEscape(id) }

// CreateDevice creates a device (PUT without If-Match). As Microsoft's SDKs do, a device without
// a status is enabled, and one without an authentication type is selfSigned when it has a
// thumbprint and sas otherwise (empty keys: the service generates them).
func (c *Client) CreateDevice(ctx context.Context, d Device) (Device, error) {
	var out Device
	_, err := c.do(ctx, request{method: http.MethodPut, path: devicePath(d.DeviceID), body: withDefaults(d)}, &out)
	return out, err
}

// UpdateDevice replaces a device, with CreateDevice's defaults. etag "" means unconditional ("*").
func (c *Client) UpdateDevice(ctx context.Context, d Device, etag string) (Device, error) {
	if etag == "" {
		etag = "*"
	}
	var out Device
	_, err := c.do(ctx, request{method: http.MethodPut, path: devicePath(d.DeviceID), body: withDefaults(d), ifMatch: etag}, &out)
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
