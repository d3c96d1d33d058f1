// Package fleet runs many simulated devices in one process, each a full pkg/agent device (DPS,
// hub session, twin sync, methods, telemetry, C2D, simulated reboot and firmware), from one
// YAML file (configs/fleet.yaml documents every field). The devices share the TLS roots and a
// TLS session cache, the parsed templates, one logger and a fleet-wide connect-rate limiter;
// their events are counted for a JSON summary and passed on to an agent.Observer (metrics).
package fleet

import (
	"fmt"
	"os"
	"strings"
	"text/template"
	"time"

	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/methods"
)

// ErrConfig wraps every fleet configuration error (the agent's exit status 2).
var ErrConfig = agent.ErrConfig

// Defaults.
const (
	DefaultIDPattern       = `sim-{{printf "%05d" .Index}}`
	DefaultConnectRate     = 100
	DefaultShutdownTimeout = 30 * time.Second
)

// Config is a fleet, as read from YAML.
type Config struct {
	// Count is the number of devices in the whole fleet (all shards).
	Count int `yaml:"count"`
	// IDPattern is a Go template of the device (registration) ID; data .Index. Every ID of a
	// shard must be distinct.
	IDPattern string `yaml:"idPattern"`
	// Seed picks each device's profile (see AssignProfile).
	Seed int64 `yaml:"seed"`
	// ConnectRate is the most new hub connections per second across the fleet; ConnectBurst
	// the token bucket's depth (default: ConnectRate rounded up, at least 1).
	ConnectRate  float64 `yaml:"connectRate"`
	ConnectBurst int     `yaml:"connectBurst"`
	// Duration, when positive, stops the fleet cleanly after this long.
	Duration time.Duration `yaml:"duration"`
	// ShutdownTimeout bounds the drain of every device at shutdown.
	ShutdownTimeout time.Duration `yaml:"shutdownTimeout"`
	// StateDir holds each device's state in StateDir/<id>/ (DPS result, twin state, keys).
	StateDir string `yaml:"stateDir"`
	// Transport is the hub transport: mqtt (default) or mqtt-ws.
	Transport string `yaml:"transport"`
	// TLS is the trust for the hub (and DPS).
	TLS agent.TLSConfig `yaml:"tls"`

	// Identity sources: exactly one of dps, registry and connectionStringsFile.
	DPS                   DPSConfig      `yaml:"dps"`
	Registry              RegistryConfig `yaml:"registry"`
	ConnectionStringsFile string         `yaml:"connectionStringsFile"`

	// Profiles are the weighted device types.
	Profiles []Profile `yaml:"profiles"`

	Log agent.LogConfig `yaml:"log"`
}

// DPSConfig provisions every device through a DPS enrollment group.
type DPSConfig struct {
	IDScope        string `yaml:"idScope"`
	GlobalEndpoint string `yaml:"globalEndpoint"`
	ServerName     string `yaml:"serverName"`
	Transport      string `yaml:"transport"`
	HubAddress     string `yaml:"hubAddress"`
	// GroupKey / GroupKeyFile: symmetric-key enrollment group (device keys derived per ID).
	GroupKey     string `yaml:"groupKey"`
	GroupKeyFile string `yaml:"groupKeyFile"`
	// CACertFile / CAKeyFile: X.509 enrollment group; the fleet issues each device a leaf
	// certificate (CN = registration ID) from this CA, cached in StateDir/<id>/.
	CACertFile string `yaml:"caCertFile"`
	CAKeyFile  string `yaml:"caKeyFile"`
	// AllowInsecureKeyFile accepts key files readable by group or others.
	AllowInsecureKeyFile bool `yaml:"allowInsecureKeyFile"`
}

// RegistryConfig creates the devices in the hub's registry (bulk, 100 per call).
type RegistryConfig struct {
	// ConnectionStringFile holds a service (policy) connection string with registry write.
	ConnectionStringFile string `yaml:"connectionStringFile"`
	// ServiceAddress overrides where REST calls go (hubsim: httpsAddress).
	ServiceAddress string `yaml:"serviceAddress"`
	// HubAddress is the devices' MQTT dial address (hubsim: mqttAddress) [HostName:8883].
	HubAddress string `yaml:"hubAddress"`
}

// Profile is one device type: the single agent's sections.
type Profile struct {
	Name   string `yaml:"name"`
	Weight int    `yaml:"weight"`

	ModelID              string                    `yaml:"modelId"`
	Telemetry            agent.TelemetryConfig     `yaml:"telemetry"`
	Twin                 agent.TwinConfig          `yaml:"twin"`
	Methods              map[string]methods.Script `yaml:"methods"`
	MethodTimeout        time.Duration             `yaml:"methodTimeout"`
	MaxConcurrentMethods int                       `yaml:"maxConcurrentMethods"`
	Reboot               agent.RebootConfig        `yaml:"reboot"`
	Firmware             agent.FirmwareConfig      `yaml:"firmware"`
	Connection           agent.ConnectionConfig    `yaml:"connection"`
	Queue                agent.QueueConfig         `yaml:"queue"`
}

// Parse reads a fleet file. Unknown fields and a second document are errors.
func Parse(data []byte) (Config, error) {
	var c Config
	err := agent.DecodeYAML(data, &c) // its errors match ErrConfig (the same value)
	return c, err
}

// Load reads and parses a fleet file.
func Load(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	c, err := Parse(b)
	if err != nil {
		return c, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// withDefaults fills defaults and checks what needs no I/O.
func (c Config) withDefaults() (Config, error) {
	bad := func(f string, a ...any) (Config, error) {
		return c, fmt.Errorf("%w: %s", ErrConfig, fmt.Sprintf(f, a...))
	}
	if c.Count <= 0 && c.ConnectionStringsFile == "" {
		return bad("count must be at least 1 (got %d)", c.Count)
	}
	if c.IDPattern == "" {
		c.IDPattern = DefaultIDPattern
	}
	if c.ConnectRate == 0 {
		c.ConnectRate = DefaultConnectRate
	}
	if c.ConnectRate < 0 || c.ConnectBurst < 0 {
		return bad("connectRate and connectBurst must not be negative")
	}
	if c.ConnectBurst == 0 {
		c.ConnectBurst = max(1, int(c.ConnectRate+0.999))
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = DefaultShutdownTimeout
	}
	if c.Duration < 0 || c.ShutdownTimeout < 0 {
		return bad("duration and shutdownTimeout must not be negative")
	}
	if c.StateDir == "" {
		return bad("stateDir is required (each device keeps its state in stateDir/<id>/)")
	}
	if len(c.Profiles) == 0 {
		c.Profiles = []Profile{{Name: "default", Weight: 1}}
	}
	total := 0
	names := map[string]bool{}
	for i, p := range c.Profiles {
		if p.Name == "" {
			return bad("profiles[%d]: name is required", i)
		}
		if names[p.Name] {
			return bad("profiles[%d]: name %q is used twice", i, p.Name)
		}
		names[p.Name] = true
		if p.Weight < 0 {
			return bad("profiles[%d] (%s): weight must not be negative", i, p.Name)
		}
		total += p.Weight
	}
	if total == 0 {
		return bad("the profile weights sum to 0: give at least one profile a positive weight")
	}
	sources := 0
	dpsSet := c.DPS != (DPSConfig{})
	for _, b := range []bool{dpsSet, c.Registry != (RegistryConfig{}), c.ConnectionStringsFile != ""} {
		if b {
			sources++
		}
	}
	if sources != 1 {
		return bad("set exactly one identity source: dps, registry or connectionStringsFile")
	}
	if dpsSet {
		d := c.DPS
		if d.IDScope == "" {
			return bad("dps.idScope is required")
		}
		group := d.GroupKey != "" || d.GroupKeyFile != ""
		x509 := d.CACertFile != "" || d.CAKeyFile != ""
		switch {
		case group && x509:
			return bad("dps: set a group key (groupKey/groupKeyFile) or a CA (caCertFile/caKeyFile), not both")
		case !group && !x509:
			return bad("dps: the enrollment group's key is missing: set dps.groupKeyFile (or groupKey), or dps.caCertFile and dps.caKeyFile")
		case d.GroupKey != "" && d.GroupKeyFile != "":
			return bad("dps: set groupKey or groupKeyFile, not both")
		case x509 && (d.CACertFile == "" || d.CAKeyFile == ""):
			return bad("dps: set both caCertFile and caKeyFile")
		}
	}
	if c.Registry != (RegistryConfig{}) && c.Registry.ConnectionStringFile == "" {
		return bad("registry.connectionStringFile is required")
	}
	return c, nil
}

// idTemplate parses the ID pattern.
func (c *Config) idTemplate() (*template.Template, error) {
	t, err := template.New("idPattern").Option("missingkey=error").Parse(c.IDPattern)
	if err != nil {
		return nil, fmt.Errorf("%w: idPattern: %w", ErrConfig, err)
	}
	return t, nil
}

// DeviceID renders the ID of the device with this index.
func deviceID(t *template.Template, index int) (string, error) {
	var b strings.Builder
	if err := t.Execute(&b, struct{ Index int }{index}); err != nil {
		return "", fmt.Errorf("%w: idPattern: %w", ErrConfig, err)
	}
	id := strings.TrimSpace(b.String())
	if id == "" {
		return "", fmt.Errorf("%w: idPattern gives an empty ID for index %d", ErrConfig, index)
	}
	return id, nil
}

// splitmix64 is a fixed, well-mixed hash of a 64-bit value (the SplitMix64 finaliser).
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// AssignProfile is which profile the device with this index gets: h = SplitMix64(seed XOR
// SplitMix64(index)); r = h mod (sum of weights); the first profile whose running weight sum
// exceeds r. It depends only on seed, index and the weights in file order, so every shard and
// every run agrees.
func AssignProfile(seed int64, index int, weights []int) int {
	total := 0
	for _, w := range weights {
		total += w
	}
	if total <= 0 {
		return 0
	}
	r := int(splitmix64(uint64(seed)^splitmix64(uint64(index))) % uint64(total))
	for i, w := range weights {
		if r < w {
			return i
		}
		r -= w
	}
	return len(weights) - 1
}

// Shard returns the half-open index range [lo, hi) of shard index of count over n devices:
// contiguous ranges whose sizes differ by at most one.
func Shard(n, index, count int) (lo, hi int) {
	return n * index / count, n * (index + 1) / count
}
