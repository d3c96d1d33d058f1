// Package connstr parses and renders Azure IoT connection strings: device and module strings
// (HostName, DeviceId, ModuleId, SharedAccessKey, GatewayHostName, x509) and service strings
// (HostName, SharedAccessKeyName, SharedAccessKey). It does no I/O.
package connstr

import (
	"errors"
	"fmt"
	"strings"
)

// ConnectionString holds the fields of an IoT Hub connection string. String renders it back in
// a stable order; it includes the key, so callers must not log it (use Redacted).
type ConnectionString struct {
	HostName            string
	DeviceID            string
	ModuleID            string
	SharedAccessKeyName string
	SharedAccessKey     string
	GatewayHostName     string
	X509                bool
}

// Parse reads "Key=Value;Key=Value". Key names are matched case-insensitively; values keep
// everything after the first '=' (base64 keys end in '='). Unknown keys are an error, so a typo
// does not silently drop a setting.
func Parse(s string) (ConnectionString, error) {
	var c ConnectionString
	s = strings.TrimSpace(s)
	if s == "" {
		return c, errors.New("connstr: empty connection string")
	}
	seen := map[string]bool{}
	for part := range strings.SplitSeq(s, ";") {
		if strings.TrimSpace(part) == "" {
			continue
		}
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			return c, fmt.Errorf("connstr: segment without '=' (%d characters)", len(part))
		}
		k = strings.ToLower(strings.TrimSpace(k))
		if seen[k] {
			return c, fmt.Errorf("connstr: %s given twice", k)
		}
		seen[k] = true
		switch k {
		case "hostname":
			c.HostName = v
		case "deviceid":
			c.DeviceID = v
		case "moduleid":
			c.ModuleID = v
		case "sharedaccesskeyname":
			c.SharedAccessKeyName = v
		case "sharedaccesskey":
			c.SharedAccessKey = v
		case "gatewayhostname":
			c.GatewayHostName = v
		case "x509":
			c.X509 = strings.EqualFold(v, "true")
		default:
			return c, fmt.Errorf("connstr: unknown key %q", k)
		}
	}
	if c.HostName == "" {
		return c, errors.New("connstr: HostName is missing")
	}
	if c.DeviceID == "" && c.SharedAccessKeyName == "" {
		return c, errors.New("connstr: neither DeviceId nor SharedAccessKeyName is set")
	}
	if c.SharedAccessKey == "" && !c.X509 {
		return c, errors.New("connstr: SharedAccessKey is missing (and x509 is not true)")
	}
	return c, nil
}

// IsService reports whether this is a service (policy) connection string.
func (c ConnectionString) IsService() bool { return c.DeviceID == "" && c.SharedAccessKeyName != "" }

// String renders the connection string, key included.
func (c ConnectionString) String() string { return c.render(c.SharedAccessKey) }

// Redacted renders the connection string with the key replaced, for logs.
func (c ConnectionString) Redacted() string {
	k := c.SharedAccessKey
	if k != "" {
		k = "REDACTED"
	}
	return c.render(k)
}

func (c ConnectionString) render(key string) string {
	var parts []string
	add := func(k, v string) {
		if v != "" {
			parts = append(parts, k+"="+v)
		}
	}
	add("HostName", c.HostName)
	add("DeviceId", c.DeviceID)
	add("ModuleId", c.ModuleID)
	add("SharedAccessKeyName", c.SharedAccessKeyName)
	add("SharedAccessKey", key)
	add("GatewayHostName", c.GatewayHostName)
	if c.X509 {
		add("x509", "true")
	}
	return strings.Join(parts, ";")
}
