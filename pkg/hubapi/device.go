// Package hubapi defines the JSON documents of IoT Hub's and DPS's service REST APIs once: device
// identities, the bulk registry result, individual enrollments and enrollment groups. The service
// client (pkg/service, hubby) and hubsim's REST handlers both use these types, so that what one
// sends is what the other reads. The shapes are Azure's (protocol-service.md §1.3 and §3). Pure:
// no I/O.
package hubapi

import (
	"encoding/json"
	"fmt"
	"time"
)

// AuthType is a device's authentication type, as the service REST API spells it.
type AuthType string

// Authentication types.
const (
	AuthSAS                  AuthType = "sas"
	AuthSelfSigned           AuthType = "selfSigned"
	AuthCertificateAuthority AuthType = "certificateAuthority"
	AuthNone                 AuthType = "none"
)

// Status is whether a device may connect.
type Status string

// Device statuses.
const (
	StatusEnabled  Status = "enabled"
	StatusDisabled Status = "disabled"
)

// ConnectionState is the registry's view of a device's MQTT connection.
type ConnectionState string

// Connection states.
const (
	Connected    ConnectionState = "Connected"
	Disconnected ConnectionState = "Disconnected"
)

// SymmetricKey holds a SAS device's two base64 keys. Empty keys in a create ask the service to
// generate them; they are sent as null.
type SymmetricKey struct {
	PrimaryKey   string
	SecondaryKey string
}

// X509Thumbprint holds a self-signed device's two certificate thumbprints (hex SHA-1 or SHA-256).
type X509Thumbprint struct {
	PrimaryThumbprint   string
	SecondaryThumbprint string
}

// Authentication is a device's authentication mechanism. Its JSON always carries both key slots
// and both thumbprint slots, null where unset, as IoT Hub answers.
type Authentication struct {
	Type           AuthType
	SymmetricKey   SymmetricKey
	X509Thumbprint X509Thumbprint
}

// Capabilities are a device's capabilities.
type Capabilities struct {
	IoTEdge bool `json:"iotEdge"`
}

// Device is a device identity: the document that GET/PUT /devices/{id} carry. Its JSON form is
// Azure's (camelCase fields, nulls for unset keys, thumbprints and status reason, and
// "0001-01-01T00:00:00Z" for times never set), both as hubsim answers and as the client sends
// it; Microsoft's .NET service SDK sends the same full document (Device(id) sets the
// connection state and the three times to their defaults).
type Device struct {
	DeviceID                   string
	GenerationID               string
	ETag                       string
	ConnectionState            ConnectionState
	Status                     Status
	StatusReason               string
	ConnectionStateUpdatedTime time.Time
	StatusUpdatedTime          time.Time
	LastActivityTime           time.Time
	CloudToDeviceMessageCount  int
	Authentication             Authentication
	Capabilities               Capabilities
}

type deviceJSON struct {
	DeviceID                   string          `json:"deviceId"`
	GenerationID               string          `json:"generationId"`
	ETag                       string          `json:"etag"`
	ConnectionState            string          `json:"connectionState"`
	Status                     string          `json:"status"`
	StatusReason               *string         `json:"statusReason"`
	ConnectionStateUpdatedTime string          `json:"connectionStateUpdatedTime"`
	StatusUpdatedTime          string          `json:"statusUpdatedTime"`
	LastActivityTime           string          `json:"lastActivityTime"`
	CloudToDeviceMessageCount  int             `json:"cloudToDeviceMessageCount"`
	Authentication             *Authentication `json:"authentication"`
	Capabilities               *Capabilities   `json:"capabilities"`
}

type authJSON struct {
	SymmetricKey   *keysJSON   `json:"symmetricKey"`
	X509Thumbprint *thumbsJSON `json:"x509Thumbprint"`
	Type           string      `json:"type"`
}

type keysJSON struct {
	PrimaryKey   *string `json:"primaryKey"`
	SecondaryKey *string `json:"secondaryKey"`
}

type thumbsJSON struct {
	PrimaryThumbprint   *string `json:"primaryThumbprint"`
	SecondaryThumbprint *string `json:"secondaryThumbprint"`
}

func nullable(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func deref(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

// TimeFormat renders registry times: RFC 3339 in UTC with up to seven fractional digits, as
// .NET does.
const TimeFormat = "2006-01-02T15:04:05.9999999Z"

// FormatTime renders t in TimeFormat, and the zero time as .NET's DateTime.MinValue
// ("0001-01-01T00:00:00Z"), which IoT Hub sends for times never set.
func FormatTime(t time.Time) string {
	if t.IsZero() {
		return "0001-01-01T00:00:00Z"
	}
	return t.UTC().Format(TimeFormat)
}

// ParseTime reads an RFC 3339 time; DateTime.MinValue and what does not parse read as zero.
func ParseTime(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil || t.Year() <= 1 {
		return time.Time{}
	}
	return t
}

// MarshalJSON renders Azure's authentication mechanism: both key slots and both thumbprint
// slots, null where unset, then the type.
func (a Authentication) MarshalJSON() ([]byte, error) {
	return json.Marshal(authJSON{
		SymmetricKey: &keysJSON{
			PrimaryKey:   nullable(a.SymmetricKey.PrimaryKey),
			SecondaryKey: nullable(a.SymmetricKey.SecondaryKey),
		},
		X509Thumbprint: &thumbsJSON{
			PrimaryThumbprint:   nullable(a.X509Thumbprint.PrimaryThumbprint),
			SecondaryThumbprint: nullable(a.X509Thumbprint.SecondaryThumbprint),
		},
		Type: string(a.Type),
	})
}

// UnmarshalJSON reads an authentication mechanism; nulls and missing slots read as empty.
func (a *Authentication) UnmarshalJSON(b []byte) error {
	var j authJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*a = Authentication{Type: AuthType(j.Type)}
	if k := j.SymmetricKey; k != nil {
		a.SymmetricKey = SymmetricKey{deref(k.PrimaryKey), deref(k.SecondaryKey)}
	}
	if t := j.X509Thumbprint; t != nil {
		a.X509Thumbprint = X509Thumbprint{deref(t.PrimaryThumbprint), deref(t.SecondaryThumbprint)}
	}
	return nil
}

// MarshalJSON renders Azure's device shape.
func (d Device) MarshalJSON() ([]byte, error) {
	j := deviceJSON{
		DeviceID:                   d.DeviceID,
		GenerationID:               d.GenerationID,
		ETag:                       d.ETag,
		ConnectionState:            string(d.ConnectionState),
		Status:                     string(d.Status),
		StatusReason:               nullable(d.StatusReason),
		ConnectionStateUpdatedTime: FormatTime(d.ConnectionStateUpdatedTime),
		StatusUpdatedTime:          FormatTime(d.StatusUpdatedTime),
		LastActivityTime:           FormatTime(d.LastActivityTime),
		CloudToDeviceMessageCount:  d.CloudToDeviceMessageCount,
		Authentication:             &d.Authentication,
		Capabilities:               &d.Capabilities,
	}
	if j.ConnectionState == "" {
		j.ConnectionState = string(Disconnected)
	}
	return json.Marshal(j)
}

// UnmarshalJSON reads Azure's device shape. Unknown fields are ignored, nulls read as empty, and
// times that do not parse read as zero.
func (d *Device) UnmarshalJSON(b []byte) error {
	var j deviceJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*d = Device{
		DeviceID:                   j.DeviceID,
		GenerationID:               j.GenerationID,
		ETag:                       j.ETag,
		ConnectionState:            ConnectionState(j.ConnectionState),
		Status:                     Status(j.Status),
		StatusReason:               deref(j.StatusReason),
		ConnectionStateUpdatedTime: ParseTime(j.ConnectionStateUpdatedTime),
		StatusUpdatedTime:          ParseTime(j.StatusUpdatedTime),
		LastActivityTime:           ParseTime(j.LastActivityTime),
		CloudToDeviceMessageCount:  j.CloudToDeviceMessageCount,
	}
	if j.Authentication != nil {
		d.Authentication = *j.Authentication
	}
	if j.Capabilities != nil {
		d.Capabilities = *j.Capabilities
	}
	return nil
}

// RegistryStatistics are the registry's device counts (GET /statistics/devices).
type RegistryStatistics struct {
	TotalDeviceCount    int `json:"totalDeviceCount"`
	EnabledDeviceCount  int `json:"enabledDeviceCount"`
	DisabledDeviceCount int `json:"disabledDeviceCount"`
}

func (d Device) String() string {
	return fmt.Sprintf("device %s (%s, %s)", d.DeviceID, d.Authentication.Type, d.Status)
}
