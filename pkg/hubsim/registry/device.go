package registry

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"strings"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// The device document is hubapi's, defined once for hubsim and the service client; these names
// keep the registry's API as it was.
type (
	// AuthType is a device's authentication type.
	AuthType = hubapi.AuthType
	// Status is whether a device may connect.
	Status = hubapi.Status
	// ConnectionState is the registry's view of a device's MQTT connection.
	ConnectionState = hubapi.ConnectionState
	// SymmetricKey holds a SAS device's two base64 keys.
	SymmetricKey = hubapi.SymmetricKey
	// X509Thumbprint holds a self-signed device's two certificate thumbprints.
	X509Thumbprint = hubapi.X509Thumbprint
	// Authentication is a device's authentication mechanism.
	Authentication = hubapi.Authentication
	// Capabilities are a device's capabilities.
	Capabilities = hubapi.Capabilities
	// Device is a device identity in Azure's JSON shape (see hubapi.Device).
	Device = hubapi.Device
)

// Authentication types, statuses and connection states.
const (
	AuthSAS                  = hubapi.AuthSAS
	AuthSelfSigned           = hubapi.AuthSelfSigned
	AuthCertificateAuthority = hubapi.AuthCertificateAuthority
	AuthNone                 = hubapi.AuthNone
	StatusEnabled            = hubapi.StatusEnabled
	StatusDisabled           = hubapi.StatusDisabled
	Connected                = hubapi.Connected
	Disconnected             = hubapi.Disconnected
)

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
