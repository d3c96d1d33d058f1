package agent

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/connstr"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/methods"
	"github.com/iothubby/iothubby/pkg/spool"
)

// ErrConfig wraps every configuration error.
var ErrConfig = errors.New("agent: invalid configuration")

// Config is one device's agent configuration, as read from YAML (configs/agent.yaml documents
// every field). Identity comes either from a device connection string (preferably from a file:
// secrets on the command line show in ps) or from host + deviceId + a key or certificate.
type Config struct {
	// ConnectionString is a device (or module) connection string:
	// HostName=...;DeviceId=...;SharedAccessKey=... (or x509=true).
	ConnectionString string `yaml:"connectionString"`
	// ConnectionStringFile is a file holding the connection string (mode 0600).
	ConnectionStringFile string `yaml:"connectionStringFile"`

	// Host is the hub's host name (when no connection string is given).
	Host string `yaml:"host"`
	// Address is the TCP dial target host:port; default host:8883 (or GatewayHostName:8883), or
	// port 443 with transport mqtt-ws.
	Address string `yaml:"address"`
	// Transport is mqtt (MQTT over TLS, port 8883; the default) or mqtt-ws (MQTT over a
	// WebSocket on port 443, through the HTTP CONNECT proxy HTTPS_PROXY names unless NO_PROXY
	// covers the hub).
	Transport string `yaml:"transport"`
	// DeviceID is the device identity.
	DeviceID string `yaml:"deviceId"`
	// ModuleID makes this a module identity.
	ModuleID string `yaml:"moduleId"`
	// ModelID is an IoT Plug and Play model id sent at connect.
	ModelID string `yaml:"modelId"`

	Auth       AuthConfig       `yaml:"auth"`
	DPS        DPSConfig        `yaml:"dps"`
	TPM        TPMConfig        `yaml:"tpm"`
	TLS        TLSConfig        `yaml:"tls"`
	Connection ConnectionConfig `yaml:"connection"`
	Queue      QueueConfig      `yaml:"queue"`
	Telemetry  TelemetryConfig  `yaml:"telemetry"`
	Twin       TwinConfig       `yaml:"twin"`
	Log        LogConfig        `yaml:"log"`

	// Methods are scripted direct methods by name (a fake device for testing cloud code): a
	// static status and payload, echo, a delay, a failure rate, or a command.
	Methods map[string]methods.Script `yaml:"methods"`
	// MethodTimeout is the deadline of every direct-method handler (default 30s, IoT Hub's
	// default response timeout); a handler past it is not answered.
	MethodTimeout time.Duration `yaml:"methodTimeout"`
	// Firmware enables firmware updates (firmwareUpdate method, desired firmware property).
	Firmware FirmwareConfig `yaml:"firmware"`
	// Reboot enables the built-in reboot method.
	Reboot RebootConfig `yaml:"reboot"`
	// MaxConcurrentMethods bounds the handlers running at once (default 8); beyond it calls get 429.
	MaxConcurrentMethods int `yaml:"maxConcurrentMethods"`

	// StateDir keeps what must survive a restart: twin-<deviceId>.json (the intended reported
	// state and the last applied desired version) and the DPS provisioning result. Empty:
	// nothing is kept (DPS requires it).
	StateDir string `yaml:"stateDir"`

	// ShutdownTimeout bounds the drain of queued telemetry on shutdown. Default 5s.
	ShutdownTimeout time.Duration `yaml:"shutdownTimeout"`

	// Shared is set by a program running many devices (pkg/fleet), never by YAML.
	Shared Shared `yaml:"-"`
}

// AuthConfig is the device's credential when it is not in the connection string.
type AuthConfig struct {
	// SymmetricKey is the base64 device key. Prefer SymmetricKeyFile.
	SymmetricKey string `yaml:"symmetricKey"`
	// SymmetricKeyFile is a file holding the base64 device key (mode 0600).
	SymmetricKeyFile string `yaml:"symmetricKeyFile"`
	// CertFile is the PEM client certificate chain for X.509 authentication.
	CertFile string `yaml:"certFile"`
	// KeyFile is the PEM private key of CertFile (mode 0600).
	KeyFile string `yaml:"keyFile"`
	// AllowInsecureKeyFile accepts key files readable by group or others.
	AllowInsecureKeyFile bool `yaml:"allowInsecureKeyFile"`
}

// TLSConfig is how the hub's server certificate is checked.
type TLSConfig struct {
	// CAFile is a PEM bundle of trusted roots; empty uses the system roots.
	CAFile string `yaml:"caFile"`
	// ServerName overrides the name the server certificate must carry (default: the host).
	ServerName string `yaml:"serverName"`
}

// ConnectionConfig tunes the hub session; zero values take hub's defaults.
type ConnectionConfig struct {
	TokenTTL         time.Duration `yaml:"tokenTTL"`
	RenewAt          float64       `yaml:"renewAt"`
	KeepAlive        time.Duration `yaml:"keepAlive"`
	BackoffMin       time.Duration `yaml:"backoffMin"`
	BackoffMax       time.Duration `yaml:"backoffMax"`
	RetryTimeout     time.Duration `yaml:"retryTimeout"`
	OperationTimeout time.Duration `yaml:"operationTimeout"`
}

// QueueConfig bounds outgoing telemetry.
type QueueConfig struct {
	Capacity       int           `yaml:"capacity"`
	MaxInFlight    int           `yaml:"maxInFlight"`
	MessageTimeout time.Duration `yaml:"messageTimeout"`
	// Persist keeps the queue on disk in StateDir (queue-<deviceId>/), so telemetry accepted
	// before a crash, a SIGKILL or a power cut is sent after the restart (pkg/spool).
	Persist bool `yaml:"persist"`
	// MaxBytes bounds the bytes the disk queue holds (with Persist). Default 16 MiB.
	MaxBytes int64 `yaml:"maxBytes"`
	// Fsync is when the disk queue is forced to stable storage: always (every message),
	// interval (every FsyncInterval; the default) or never (left to the operating system).
	Fsync string `yaml:"fsync"`
	// FsyncInterval is the period of the interval policy, and of writing which messages the
	// hub acknowledged. Default 1s.
	FsyncInterval time.Duration `yaml:"fsyncInterval"`
	// WhenFull is refuseNewest (the default: a new message is refused and logged) or dropOldest
	// (the oldest message not in flight is dropped and logged); both are counted.
	WhenFull string `yaml:"whenFull"`
}

// DefaultQueueMaxBytes is queue.maxBytes when queue.persist is set and maxBytes is not.
const DefaultQueueMaxBytes = 16 << 20

// check validates the queue section.
func (q *QueueConfig) check(stateDir string) error {
	if _, err := spool.ParseFsync(q.Fsync); err != nil {
		return fmt.Errorf("%w: queue.fsync: %w", ErrConfig, err)
	}
	switch q.WhenFull {
	case "", hub.WhenFullRefuseNewest, hub.WhenFullDropOldest:
	default:
		return fmt.Errorf("%w: queue.whenFull %q: want %s or %s", ErrConfig, q.WhenFull, hub.WhenFullRefuseNewest, hub.WhenFullDropOldest)
	}
	if q.MaxBytes < 0 || q.FsyncInterval < 0 {
		return fmt.Errorf("%w: queue.maxBytes and queue.fsyncInterval must not be negative", ErrConfig)
	}
	if q.Persist && stateDir == "" {
		return fmt.Errorf("%w: queue.persist needs stateDir", ErrConfig)
	}
	return nil
}

// TelemetryConfig is the periodic telemetry the agent sends.
type TelemetryConfig struct {
	// Interval between messages; 0 sends none.
	Interval time.Duration `yaml:"interval"`
	// Template is a Go text/template rendering the body. Data: .DeviceID, .ModuleID, .Seq,
	// .Time (RFC 3339 UTC), .Unix. Functions: randFloat min max, randInt min max.
	Template string `yaml:"template"`
	// ContentType is $.ct; default application/json.
	ContentType string `yaml:"contentType"`
	// ContentEncoding is $.ce; default utf-8.
	ContentEncoding string `yaml:"contentEncoding"`
	// Properties are application properties added to every message.
	Properties map[string]string `yaml:"properties"`
	// Count, when positive, stops the periodic telemetry after that many messages in this run
	// (for tests and measurements); 0 sends until shutdown.
	Count uint64 `yaml:"count"`
}

// LogConfig selects the log output; used by cmd/agent.
type LogConfig struct {
	// Level is debug, info, warn or error; default info.
	Level string `yaml:"level"`
	// Format is console or json; default console.
	Format string `yaml:"format"`
}

// DefaultTemplate is the telemetry body used when none is configured.
const DefaultTemplate = `{"deviceId":"{{.DeviceID}}","seq":{{.Seq}},"time":"{{.Time}}","temperature":{{printf "%.2f" (randFloat 20 30)}}}`

// Defaults.
const (
	DefaultShutdownTimeout   = 5 * time.Second
	DefaultTelemetryInterval = 10 * time.Second
)

// Default returns the configuration the agent starts from before a file or flags apply.
func Default() Config {
	return Config{
		ShutdownTimeout: DefaultShutdownTimeout,
		Telemetry: TelemetryConfig{
			Interval:        DefaultTelemetryInterval,
			Template:        DefaultTemplate,
			ContentType:     "application/json",
			ContentEncoding: "utf-8",
		},
		Log: LogConfig{Level: "info", Format: "console"},
	}
}

// ParseConfig reads YAML over Default(). Unknown fields and a second YAML document are errors,
// so a typo does not silently drop a setting.
func ParseConfig(data []byte) (Config, error) {
	c := Default()
	if err := DecodeYAML(data, &c); err != nil {
		return c, err
	}
	return c, nil
}

// DecodeYAML decodes data over v the way every configuration file of ours is read: unknown
// fields are an error, and so is a second YAML document (it would otherwise be ignored, and the
// program would run with half the configuration the user wrote). Errors match ErrConfig.
func DecodeYAML(data []byte, v any) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	var next yaml.Node
	if err := dec.Decode(&next); err == nil {
		return fmt.Errorf("%w: a second YAML document starts at line %d; the configuration must be one document (remove the '---' or merge the documents)", ErrConfig, next.Line)
	} else if !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	return nil
}

// LoadConfig reads a YAML config file.
func LoadConfig(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	c, err := ParseConfig(b)
	if err != nil {
		return c, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// identity is the resolved device identity and credential.
type identity struct {
	host, address, deviceID, moduleID, keyName string
	cred                                       *attest.Credential
	// registrationID is set when the device provisions through DPS (host and deviceID then
	// come from the provisioning result).
	registrationID string
	// tpm: the credential is the TPM of Config.TPM, opened by New.
	tpm bool
}

// resolve checks the configuration and loads the credential. Errors name the field, never a
// secret.
func (c *Config) resolve() (identity, error) {
	var id identity
	fileOpts := attest.FileOptions{AllowInsecureKeyFile: c.Auth.AllowInsecureKeyFile}
	if c.DPS.IDScope != "" || c.DPS.GlobalEndpoint != "" {
		return c.resolveDPS(fileOpts)
	}
	if c.DPS.GroupKey != "" || c.DPS.GroupKeyFile != "" {
		return id, fmt.Errorf("%w: dps.groupKey needs dps.idScope", ErrConfig)
	}
	cs := c.ConnectionString
	if c.ConnectionString != "" && c.ConnectionStringFile != "" {
		return id, fmt.Errorf("%w: set connectionString or connectionStringFile, not both", ErrConfig)
	}
	if c.ConnectionStringFile != "" {
		b, err := attest.ReadSecretFile(c.ConnectionStringFile, fileOpts)
		if err != nil {
			return id, fmt.Errorf("%w: connectionStringFile: %w", ErrConfig, err)
		}
		cs = strings.TrimSpace(string(b))
	}
	x509Files := c.Auth.CertFile != "" || c.Auth.KeyFile != ""
	keyGiven := c.Auth.SymmetricKey != "" || c.Auth.SymmetricKeyFile != ""
	if cs != "" {
		if c.Host != "" || c.DeviceID != "" || c.ModuleID != "" || keyGiven {
			return id, fmt.Errorf("%w: a connection string was given; do not also set host, deviceId, moduleId or a symmetric key", ErrConfig)
		}
		parsed, err := connstr.Parse(cs)
		if err != nil {
			// connstr errors describe the structure, not the values.
			return id, fmt.Errorf("%w: connection string: %w", ErrConfig, err)
		}
		if parsed.IsService() {
			return id, fmt.Errorf("%w: connection string is a service (policy) string; the agent needs a device connection string", ErrConfig)
		}
		id.host, id.deviceID, id.moduleID, id.keyName = parsed.HostName, parsed.DeviceID, parsed.ModuleID, parsed.SharedAccessKeyName
		if gw := parsed.GatewayHostName; gw != "" {
			// A gateway name may carry its own port (hubsim's connection strings do).
			if _, _, err := net.SplitHostPort(gw); err == nil {
				id.address = gw
			} else if c.Transport == hub.TransportMQTTWS {
				id.address = net.JoinHostPort(gw, fmt.Sprint(hub.DefaultWSPort))
			} else {
				id.address = net.JoinHostPort(gw, fmt.Sprint(hub.DefaultPort))
			}
		}
		switch {
		case parsed.X509:
			if !x509Files {
				return id, fmt.Errorf("%w: connection string says x509=true; set auth.certFile and auth.keyFile", ErrConfig)
			}
		case x509Files:
			return id, fmt.Errorf("%w: connection string has a SharedAccessKey; do not also set auth.certFile/keyFile", ErrConfig)
		default:
			cred, err := attest.FromBase64Key(parsed.SharedAccessKey)
			if err != nil {
				return id, fmt.Errorf("%w: connection string SharedAccessKey: %w", ErrConfig, err)
			}
			id.cred = cred
		}
	} else {
		if c.Host == "" || c.DeviceID == "" {
			return id, fmt.Errorf("%w: set a connection string (connectionStringFile), or host and deviceId", ErrConfig)
		}
		id.host, id.deviceID, id.moduleID = c.Host, c.DeviceID, c.ModuleID
		if keyGiven && x509Files {
			return id, fmt.Errorf("%w: set a symmetric key or an X.509 certificate, not both", ErrConfig)
		}
		if c.Auth.SymmetricKey != "" && c.Auth.SymmetricKeyFile != "" {
			return id, fmt.Errorf("%w: set auth.symmetricKey or auth.symmetricKeyFile, not both", ErrConfig)
		}
		var err error
		switch {
		case c.Auth.SymmetricKeyFile != "":
			id.cred, err = attest.FromKeyFile(c.Auth.SymmetricKeyFile, fileOpts)
		case c.Auth.SymmetricKey != "":
			id.cred, err = attest.FromBase64Key(c.Auth.SymmetricKey)
		case !x509Files:
			err = errors.New("no credential: set auth.symmetricKeyFile (or symmetricKey), or auth.certFile and auth.keyFile")
		}
		if err != nil {
			return id, fmt.Errorf("%w: %w", ErrConfig, err)
		}
	}
	if x509Files && id.cred == nil {
		cred, err := attest.FromX509Files(c.Auth.CertFile, c.Auth.KeyFile, fileOpts)
		if err != nil {
			return id, fmt.Errorf("%w: %w", ErrConfig, err)
		}
		id.cred = cred
	}
	if c.Address != "" {
		id.address = c.Address
	}
	if c.ShutdownTimeout < 0 || c.Telemetry.Interval < 0 {
		return id, fmt.Errorf("%w: shutdownTimeout and telemetry.interval must not be negative", ErrConfig)
	}
	return id, nil
}

// hubConfig builds the session configuration (without handlers or logger).
func (c *Config) hubConfig(id identity) hub.Config {
	h := hub.Config{
		Host:             id.host,
		Address:          id.address,
		Transport:        c.Transport,
		ServerName:       c.TLS.ServerName,
		DeviceID:         id.deviceID,
		ModuleID:         id.moduleID,
		ModelID:          c.ModelID,
		KeyName:          id.keyName,
		CAFile:           c.TLS.CAFile,
		TokenTTL:         c.Connection.TokenTTL,
		RenewAt:          c.Connection.RenewAt,
		KeepAlive:        c.Connection.KeepAlive,
		BackoffMin:       c.Connection.BackoffMin,
		BackoffMax:       c.Connection.BackoffMax,
		RetryTimeout:     c.Connection.RetryTimeout,
		OperationTimeout: c.Connection.OperationTimeout,
		QueueCapacity:    c.Queue.Capacity,
		MaxInFlight:      c.Queue.MaxInFlight,
		MessageTimeout:   c.Queue.MessageTimeout,
		WhenFull:         c.Queue.WhenFull,
		DrainTimeout:     c.ShutdownTimeout,
		BeforeConnect:    c.Shared.BeforeConnect,
		TLSSessionCache:  c.Shared.TLSSessionCache,
		CurvePreferences: c.Shared.CurvePreferences,
		TLSConfigs:       c.Shared.TLSConfigs,
		LeanMQTT:         c.Shared.LeanMQTT,
	}
	if c.Shared.RootCAs != nil {
		h.RootCAs, h.CAFile = c.Shared.RootCAs, ""
	}
	if s := id.cred.Signer(); s != nil {
		h.Signer = s
	} else {
		h.Certificate = id.cred.Certificate()
	}
	return h
}
