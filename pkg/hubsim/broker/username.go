package broker

import (
	"errors"
	"fmt"
	"strings"

	"github.com/iothubby/iothubby/pkg/wire"
)

// Username is a parsed IoT Hub MQTT user name:
//
//	{host}/{deviceId}/?api-version=...&DeviceClientType=...&model-id=...
//	{host}/{deviceId}/{moduleId}/?api-version=...
//	{host}/{deviceId}/api-version=...            (2017-era docs: no '?')
type Username struct {
	Host       string
	DeviceID   string
	ModuleID   string
	APIVersion string
	ModelID    string
	ClientType string
}

// ErrUsername wraps every user name parsing error.
var ErrUsername = errors.New("bad MQTT user name")

// ParseUsername parses an MQTT user name for the connection whose client identifier is
// clientID ({deviceId} or {deviceId}/{moduleId}). The path after the host must be exactly the
// client identifier followed by '/'; what follows is the parameter list, with or without a
// leading '?'. Any api-version is accepted, unknown parameters are ignored, and parameter values
// are percent-decoded when they decode cleanly ('+' stays '+').
func ParseUsername(username, clientID string) (Username, error) {
	var u Username
	host, rest, ok := strings.Cut(username, "/")
	if !ok || host == "" {
		return u, fmt.Errorf("%w: no host name", ErrUsername)
	}
	u.Host = host
	if clientID == "" {
		return u, fmt.Errorf("%w: empty client identifier", ErrUsername)
	}
	dev, mod, isModule := strings.Cut(clientID, "/")
	if err := wire.ValidateDeviceID(dev); err != nil {
		return u, fmt.Errorf("%w: client identifier: %v", ErrUsername, err)
	}
	if isModule {
		if err := wire.ValidateDeviceID(mod); err != nil {
			return u, fmt.Errorf("%w: module identifier: %v", ErrUsername, err)
		}
	}
	query, ok := strings.CutPrefix(rest, clientID+"/")
	if !ok {
		return u, fmt.Errorf("%w: the path after the host is not the client identifier followed by '/'", ErrUsername)
	}
	u.DeviceID, u.ModuleID = dev, mod
	query = strings.TrimPrefix(query, "?")
	for seg := range strings.SplitSeq(query, "&") {
		if seg == "" {
			continue
		}
		k, v, _ := strings.Cut(seg, "=")
		if dv, err := pctDecode(v); err == nil {
			v = dv
		}
		switch k {
		case "api-version":
			u.APIVersion = v
		case "model-id":
			u.ModelID = v
		case "DeviceClientType":
			u.ClientType = v
		}
	}
	return u, nil
}

// pctDecode percent-decodes once, leaving '+' alone.
func pctDecode(s string) (string, error) {
	if !strings.Contains(s, "%") {
		return s, nil
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b = append(b, s[i])
			continue
		}
		if i+2 >= len(s) {
			return "", errors.New("truncated escape")
		}
		hi, lo := unhex(s[i+1]), unhex(s[i+2])
		if hi < 0 || lo < 0 {
			return "", errors.New("bad escape")
		}
		b = append(b, byte(hi<<4|lo))
		i += 2
	}
	return string(b), nil
}

func unhex(c byte) int {
	switch {
	case '0' <= c && c <= '9':
		return int(c - '0')
	case 'a' <= c && c <= 'f':
		return int(c-'a') + 10
	case 'A' <= c && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// hostMatches compares a host as a device wrote it (user name, token) with the hub's host name:
// case-insensitive, a ":port" on either side ignored.
func hostMatches(got, hub string) bool {
	return strings.EqualFold(stripPort(got), stripPort(hub))
}

func stripPort(h string) string {
	if i := strings.LastIndexByte(h, ':'); i >= 0 && !strings.Contains(h[i:], "]") {
		return h[:i]
	}
	return h
}
