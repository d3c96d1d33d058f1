package registry

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
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

// SymmetricKey holds a SAS device's two base64 keys.
type SymmetricKey struct {
	PrimaryKey   string
	SecondaryKey string
}

// X509Thumbprint holds a self-signed device's two certificate thumbprints (hex SHA-1 or SHA-256).
type X509Thumbprint struct {
	PrimaryThumbprint   string
	SecondaryThumbprint string
}

// Authentication is a device's authentication mechanism.
type Authentication struct {
	Type           AuthType
	SymmetricKey   SymmetricKey
	X509Thumbprint X509Thumbprint
}

// Capabilities are a device's capabilities.
type Capabilities struct {
	IotEdge bool
}

// Device is a device identity as the service REST API shows it. Its JSON form is Azure's
// (camelCase fields, nulls for unset keys, thumbprints and status reason, and
// "0001-01-01T00:00:00Z" for times never set).
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
	DeviceID                   string    `json:"deviceId"`
	GenerationID               string    `json:"generationId"`
	ETag                       string    `json:"etag"`
	ConnectionState            string    `json:"connectionState"`
	Status                     string    `json:"status"`
	StatusReason               *string   `json:"statusReason"`
	ConnectionStateUpdatedTime string    `json:"connectionStateUpdatedTime"`
	StatusUpdatedTime          string    `json:"statusUpdatedTime"`
	LastActivityTime           string    `json:"lastActivityTime"`
	CloudToDeviceMessageCount  int       `json:"cloudToDeviceMessageCount"`
	Authentication             *authJSON `json:"authentication"`
	Capabilities               *capsJSON `json:"capabilities"`
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

type capsJSON struct {
	IotEdge bool `json:"iotEdge"`
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

func formatTime(t time.Time) string {
	if t.IsZero() {
		return "0001-01-01T00:00:00Z"
	}
	return t.UTC().Format(TimeFormat)
}

func parseTime(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil || t.Year() <= 1 {
		return time.Time{}
	}
	return t
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
		ConnectionStateUpdatedTime: formatTime(d.ConnectionStateUpdatedTime),
		StatusUpdatedTime:          formatTime(d.StatusUpdatedTime),
		LastActivityTime:           formatTime(d.LastActivityTime),
		CloudToDeviceMessageCount:  d.CloudToDeviceMessageCount,
		Authentication: &authJSON{
			SymmetricKey: &keysJSON{
				PrimaryKey:   nullable(d.Authentication.SymmetricKey.PrimaryKey),
				SecondaryKey: nullable(d.Authentication.SymmetricKey.SecondaryKey),
			},
			X509Thumbprint: &thumbsJSON{
				PrimaryThumbprint:   nullable(d.Authentication.X509Thumbprint.PrimaryThumbprint),
				SecondaryThumbprint: nullable(d.Authentication.X509Thumbprint.SecondaryThumbprint),
			},
			Type: string(d.Authentication.Type),
		},
		Capabilities: &capsJSON{IotEdge: d.Capabilities.IotEdge},
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
		ConnectionStateUpdatedTime: parseTime(j.ConnectionStateUpdatedTime),
		StatusUpdatedTime:          parseTime(j.StatusUpdatedTime),
		LastActivityTime:           parseTime(j.LastActivityTime),
		CloudToDeviceMessageCount:  j.CloudToDeviceMessageCount,
	}
	if j.Authentication != nil {
		d.Authentication.Type = AuthType(j.Authentication.Type)
		if k := j.Authentication.SymmetricKey; k != nil {
			d.Authentication.SymmetricKey = SymmetricKey{deref(k.PrimaryKey), deref(k.SecondaryKey)}
		}
		if t := j.Authentication.X509Thumbprint; t != nil {
			d.Authentication.X509Thumbprint = X509Thumbprint{deref(t.PrimaryThumbprint), deref(t.SecondaryThumbprint)}
		}
	}
	if j.Capabilities != nil {
		d.Capabilities.IotEdge = j.Capabilities.IotEdge
	}
	return nil
}

// Identity is what device authentication needs, precomputed: parsed keys and normalised
// thumbprints. It is immutable; the registry replaces it on every update.
type Identity struct {
	DeviceID     string
	GenerationID string
	Status       Status
	AuthType     AuthType
	PrimaryKey   sas.Key
	SecondaryKey sas.Key
	// Thumbprints are the device's registered thumbprints, upper-case hex (1 or 2).
	Thumbprints []string
}

func newIdentity(d *Device) *Identity {
	id := &Identity{DeviceID: d.DeviceID, GenerationID: d.GenerationID, Status: d.Status, AuthType: d.Authentication.Type}
	if d.Authentication.Type == AuthSAS {
		id.PrimaryKey, _ = sas.ParseKey(d.Authentication.SymmetricKey.PrimaryKey)
		id.SecondaryKey, _ = sas.ParseKey(d.Authentication.SymmetricKey.SecondaryKey)
	}
	for _, t := range []string{d.Authentication.X509Thumbprint.PrimaryThumbprint, d.Authentication.X509Thumbprint.SecondaryThumbprint} {
		if t != "" {
			id.Thumbprints = append(id.Thumbprints, strings.ToUpper(t))
		}
	}
	return id
}

// GenerateKey returns 32 random bytes in base64, the form of the keys IoT Hub generates.
func GenerateKey() string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

// normalize fills defaults into a device a caller sent and validates it. It never generates
// keys; callers decide.
func normalize(d *Device) error {
	if err := wire.ValidateDeviceID(d.DeviceID); err != nil {
		return wire.ErrArgumentInvalid.WithText("%v", err)
	}
	switch strings.ToLower(string(d.Status)) {
	case "", "enabled":
		d.Status = StatusEnabled
	case "disabled":
		d.Status = StatusDisabled
	default:
		return wire.ErrArgumentInvalid.WithText("status must be enabled or disabled, not %q", d.Status)
	}
	if len(d.StatusReason) > 128 {
		return wire.ErrArgumentInvalid.WithText("statusReason is longer than 128 characters")
	}
	a := &d.Authentication
	if a.Type == "" {
		// As Microsoft's service SDK normalises: a thumbprint means selfSigned, else sas.
		if a.X509Thumbprint.PrimaryThumbprint != "" || a.X509Thumbprint.SecondaryThumbprint != "" {
			a.Type = AuthSelfSigned
		} else {
			a.Type = AuthSAS
		}
	}
	switch strings.ToLower(string(a.Type)) {
	case "sas":
		a.Type = AuthSAS
		for _, k := range []string{a.SymmetricKey.PrimaryKey, a.SymmetricKey.SecondaryKey} {
			if k == "" {
				continue
			}
			raw, err := base64.StdEncoding.DecodeString(k)
			if err != nil || len(raw) < 16 || len(raw) > 64 {
				return wire.ErrArgumentInvalid.WithText("symmetric keys must be base64 of 16 to 64 bytes")
			}
		}
		if a.X509Thumbprint != (X509Thumbprint{}) {
			return wire.ErrArgumentInvalid.WithText("a sas device cannot have x509 thumbprints")
		}
	case "selfsigned":
		a.Type = AuthSelfSigned
		if a.X509Thumbprint.PrimaryThumbprint == "" {
			return wire.ErrArgumentInvalid.WithText("a selfSigned device needs a primary thumbprint")
		}
		for _, t := range []string{a.X509Thumbprint.PrimaryThumbprint, a.X509Thumbprint.SecondaryThumbprint} {
			if t != "" && !validThumbprint(t) {
				return wire.ErrArgumentInvalid.WithText("thumbprints must be 40 (SHA-1) or 64 (SHA-256) hex digits")
			}
		}
		if a.SymmetricKey != (SymmetricKey{}) {
			return wire.ErrArgumentInvalid.WithText("a selfSigned device cannot have symmetric keys")
		}
	case "certificateauthority":
		a.Type = AuthCertificateAuthority
		if a.SymmetricKey != (SymmetricKey{}) || a.X509Thumbprint != (X509Thumbprint{}) {
			return wire.ErrArgumentInvalid.WithText("a certificateAuthority device has neither keys nor thumbprints")
		}
	case "none":
		a.Type = AuthNone
		a.SymmetricKey, a.X509Thumbprint = SymmetricKey{}, X509Thumbprint{}
	default:
		return wire.ErrArgumentInvalid.WithText("unknown authentication type %q", a.Type)
	}
	return nil
}

func validThumbprint(t string) bool {
	if len(t) != 40 && len(t) != 64 {
		return false
	}
	_, err := hex.DecodeString(t)
	return err == nil
}

// ETagMatches applies IoT Hub's If-Match rule: "*" (with or without quotes) matches anything;
// otherwise one pair of surrounding quotes is stripped and the rest compared with etag.
func ETagMatches(ifMatch, etag string) bool {
	v := strings.TrimSpace(ifMatch)
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		v = v[1 : len(v)-1]
	}
	if v == "*" {
		return true
	}
	return v == etag
}

func (d Device) String() string {
	return fmt.Sprintf("device %s (%s, %s)", d.DeviceID, d.Authentication.Type, d.Status)
}
