package registry

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/iothubby/iothubby/pkg/sas"
)

// Rights are a shared access policy's permissions.
type Rights uint8

// Permissions, as IoT Hub names them.
const (
	RegistryRead Rights = 1 << iota
	RegistryWrite
	ServiceConnect
	DeviceConnect
)

var rightNames = []struct {
	r    Rights
	name string
}{{RegistryRead, "RegistryRead"}, {RegistryWrite, "RegistryWrite"}, {ServiceConnect, "ServiceConnect"}, {DeviceConnect, "DeviceConnect"}}

// Has reports whether r includes every right in want.
func (r Rights) Has(want Rights) bool { return r&want == want }

// String renders rights as Azure does: "RegistryRead, RegistryWrite".
func (r Rights) String() string {
	var parts []string
	for _, n := range rightNames {
		if r.Has(n.r) {
			parts = append(parts, n.name)
		}
	}
	return strings.Join(parts, ", ")
}

// ParseRights reads the form String writes (commas, optional spaces, case-insensitive).
func ParseRights(s string) (Rights, error) {
	var r Rights
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		found := false
		for _, n := range rightNames {
			if strings.EqualFold(part, n.name) {
				r |= n.r
				found = true
			}
		}
		if !found {
			return 0, fmt.Errorf("registry: unknown right %q", part)
		}
	}
	return r, nil
}

// MarshalJSON writes rights as their string form.
func (r Rights) MarshalJSON() ([]byte, error) { return json.Marshal(r.String()) }

// UnmarshalJSON reads rights from their string form.
func (r *Rights) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := ParseRights(s)
	if err != nil {
		return err
	}
	*r = v
	return nil
}

// Policy is a hub-level shared access policy.
type Policy struct {
	KeyName      string `json:"keyName"`
	Rights       Rights `json:"rights"`
	PrimaryKey   string `json:"primaryKey"`
	SecondaryKey string `json:"secondaryKey"`

	primary, secondary sas.Key
}

// DefaultPolicies are the policies every IoT hub starts with, and their rights.
var defaultPolicies = []struct {
	name   string
	rights Rights
}{
	{"iothubowner", RegistryRead | RegistryWrite | ServiceConnect | DeviceConnect},
	{"service", ServiceConnect},
	{"device", DeviceConnect},
	{"registryRead", RegistryRead},
	{"registryReadWrite", RegistryRead | RegistryWrite},
}

func (p *Policy) parseKeys() error {
	var err error
	if p.primary, err = sas.ParseKey(p.PrimaryKey); err != nil {
		return fmt.Errorf("policy %s primary key: %w", p.KeyName, err)
	}
	if p.secondary, err = sas.ParseKey(p.SecondaryKey); err != nil {
		return fmt.Errorf("policy %s secondary key: %w", p.KeyName, err)
	}
	return nil
}

// Verify checks a token's signature against the policy's primary, then secondary key, and its
// expiry. It does not check the token's resource or key name.
func (p *Policy) Verify(t *sas.Token, now time.Time) error {
	err := t.Verify(p.primary, now)
	if errors.Is(err, sas.ErrSignature) {
		err = t.Verify(p.secondary, now)
	}
	return err
}
