package hub

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"reflect"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/backoff"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/spool"
	"github.com/iothubby/iothubby/pkg/wire"
)

// APIVersion is the IoT Hub API version sent in the MQTT username.
const APIVersion = "2021-04-12"

// MaxMessageSize is IoT Hub's limit on a device-to-cloud message: the body, the values of system
// properties and the names and values of application properties together.
const MaxMessageSize = 256 * 1024

// MaxMethodPayload is IoT Hub's limit on a direct-method response payload.
const MaxMethodPayload = 128 * 1024

// Defaults applied by New to zero fields of Config.
const (
	DefaultPort             = 8883
	DefaultTokenTTL         = time.Hour
	DefaultRenewAt          = 0.85
	DefaultKeepAlive        = 120 * time.Second
	DefaultBackoffMin       = time.Second
	DefaultBackoffMax       = 60 * time.Second
	DefaultOperationTimeout = 30 * time.Second
	DefaultQueueCapacity    = 1000
	DefaultMaxInFlight      = 8
	DefaultInboundQueue     = 64
	DefaultDrainTimeout     = 5 * time.Second
	// StableAfter is how long a connection must stay up for the reconnect backoff to start
	// again from its minimum.
	StableAfter = 30 * time.Second
)

// Config describes one device or module identity and how to reach its hub. The zero value of
// every optional field is replaced by a documented default in New.
type Config struct {
	// Host is the hub's host name (the connection string's HostName). It is used in the MQTT
	// username, in the SAS token's resource and, by default, as the TLS server name.
	Host string
	// Address is the TCP dial target "host:port". Default: Host on port 8883 (443 for mqtt-ws).
	// Set it to reach a gateway or a local hubsim on another port while Host stays the hub's name.
	Address string
	// Transport is TransportMQTT (MQTT over TLS; the default) or TransportMQTTWS (MQTT over a
	// WebSocket on the HTTPS port, through Proxy if it names one).
	Transport string
	// Proxy picks the HTTP CONNECT proxy of a mqtt-ws connection, given https://Address; nil
	// URL: connect directly. Default: ProxyFromEnvironment (HTTPS_PROXY, NO_PROXY).
	Proxy func(*url.URL) (*url.URL, error)
	// ServerName is the name the server certificate must carry. Default: the host part of Host.
	ServerName string
	// DeviceID is the device identity; required.
	DeviceID string
	// ModuleID, when set, makes this a module identity ({deviceId}/{moduleId}).
	ModuleID string
	// ModelID is an IoT Plug and Play model id (e.g. "dtmi:com:example:Thermostat;1"), sent as
	// &model-id= in the username.
	ModelID string

	// Signer signs SAS tokens (a sas.Key or a TPM-backed signer). Exactly one of Signer and
	// Certificate is required.
	Signer sas.Signer
	// KeyName is the skn of a shared-access-policy token; empty for device keys.
	KeyName string
	// Certificate is an X.509 client certificate presented in the TLS handshake.
	Certificate *tls.Certificate

	// TokenTTL is the lifetime of each SAS token. Default 1h; at least 2s.
	TokenTTL time.Duration
	// RenewAt is the fraction of the token lifetime after which the session reconnects with a
	// fresh token. Default and maximum 0.85.
	RenewAt float64

	// RootCAs are the CA roots trusted for the server certificate. When nil, CAFile is read;
	// when both are empty, the system roots are used.
	RootCAs *x509.CertPool
	// CAFile is a PEM bundle of trusted CA roots.
	CAFile string
	// TLSSessionCache lets a fleet share TLS session resumption; optional.
	TLSSessionCache tls.ClientSessionCache
	// CurvePreferences are the key exchanges offered in the TLS handshake, in order; nil:
	// Go's defaults (which lead with the hybrid post-quantum X25519MLKEM768). A fleet offers
	// X25519 first: one cheap key share per connect.
	CurvePreferences []tls.CurveID
	// TLSConfig, when set, is used as it is instead of one built from RootCAs, ServerName,
	// Certificate and TLSSessionCache (which are then ignored). A fleet of devices on one hub can
	// share a single value; it must not be modified once a session uses it.
	TLSConfig *tls.Config
	// TLSConfigs, when set, lets sessions without a client certificate share the tls.Config
	// built from RootCAs, ServerName, TLSSessionCache and CurvePreferences with every other
	// session given the same TLSConfigs and the same four values (a fleet's devices: ~0.5 KiB
	// each). A session with a Certificate always has its own.
	TLSConfigs *TLSConfigs
	// LeanMQTT connects with the lean MQTT client (internal/mqttc: one goroutine per
	// connection, its reader) instead of paho's (ten goroutines per connection). `agent fleet`
	// sets it: in a fleet the goroutines are most of a device's memory.
	LeanMQTT bool

	// KeepAlive is the MQTT keep-alive. Default 120s: below the 240s idle timeout of Azure's
	// load balancers and of most NAT gateways, between Python's 60s and Node's 180s, and cheap
	// for a fleet (one PINGREQ per device every two minutes when idle).
	KeepAlive time.Duration
	// BackoffMin is the least time between two connection attempts after a failure. Default and
	// minimum 1s.
	BackoffMin time.Duration
	// BackoffMax caps the backoff. Default 60s.
	BackoffMax time.Duration
	// RetryTimeout, when positive, stops the session with ErrRetryExpired after reconnecting has
	// failed for this long. Default 0: retry forever (as the C SDK does).
	RetryTimeout time.Duration
	// OperationTimeout bounds a connect (TCP, TLS and CONNACK), a subscribe, a twin request
	// without its own deadline and the wait for a PUBACK. Default 30s.
	OperationTimeout time.Duration

	// QueueCapacity bounds the telemetry messages held by the session (queued and in flight).
	// Default 1000.
	QueueCapacity int
	// Spool, when set, keeps the telemetry queue on disk: a message is appended to it before
	// Send or Enqueue accepts it and removed once the hub acknowledges it (or it expires, is
	// canceled or dropped). A session started on a spool first sends what it holds, in order;
	// Close leaves undelivered messages in it. The caller opens and closes it, and must not give
	// one spool to two sessions at once.
	Spool *spool.Spool
	// QueueMaxBytes, with Spool, bounds the bytes the spool holds; the queue is also full at
	// QueueCapacity messages. Default 0: no bound beyond QueueCapacity.
	QueueMaxBytes int64
	// WhenFull is what Send and Enqueue do when the queue is full: WhenFullRefuseNewest (the
	// default) refuses the new message with ErrQueueFull; WhenFullDropOldest accepts it and
	// drops the oldest message not in flight (it fails with ErrDropped; Stats.Dropped counts it).
	WhenFull string
	// MaxInFlight is how many telemetry messages may await PUBACK at once. Default 8.
	MaxInFlight int
	// MessageTimeout, when positive, fails a telemetry message that has not been published on a
	// live connection within this time of being accepted. Default 0: no expiry (a Send context
	// deadline or Message.Deadline still applies).
	MessageTimeout time.Duration
	// InboundQueue bounds cloud-to-device messages, desired patches and method requests waiting
	// for their handler. A cloud-to-device message that does not fit is not acknowledged, so the
	// hub delivers it again after a reconnect. Default 64.
	InboundQueue int
	// DrainTimeout bounds Close when its context has no deadline. Default 5s.
	DrainTimeout time.Duration

	// OnStatus is called on every connection status change.
	OnStatus func(Status)
	// OnC2D is called for each cloud-to-device message.
	OnC2D func(context.Context, *C2DMessage)
	// OnDesired is called for each desired-properties patch.
	OnDesired func(context.Context, *DesiredPatch)
	// OnMethod is called for each direct-method request; answer with RespondMethod.
	OnMethod func(context.Context, *MethodRequest)

	// Logger receives the session's logs; nil discards them. Scope it with the device id before
	// passing it in. Secrets never reach it.
	Logger *zap.Logger
	// BeforeConnect, when set, is called before every connection attempt (after the backoff
	// wait) and may block, e.g. on a fleet-wide connect-rate limiter; ctx ends when the session
	// is closed. An error fails the attempt like a dial error (the session backs off and retries).
	BeforeConnect func(ctx context.Context) error
	// Dial opens the TCP connection. Default: a net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Clock drives every timer of the session: token renewal, reconnect backoff, RetryTimeout,
	// the SUBACK and PUBACK timeouts and message expiry (MessageTimeout, Message.Deadline and
	// Send's context deadline, carried over as a remaining duration). Default: the real clock.
	Clock Clock
	// Rand returns a uniform float in [0, 1) for backoff jitter. Default: math/rand/v2.
	Rand func() float64
}

// Clock is the session's source of time (pkg/clock); tests may replace it.
type Clock = clock.Clock

// Timer is a resettable timer as returned by Clock.NewTimer.
type Timer = clock.Timer

// Backoff is the reconnect backoff policy (pkg/backoff).
type Backoff = backoff.Policy

// ClientID returns the MQTT client id: deviceId or deviceId/moduleId.
func (c *Config) ClientID() string {
	if c.ModuleID != "" {
		return c.DeviceID + "/" + c.ModuleID
	}
	return c.DeviceID
}

// Username returns the MQTT username:
// {host}/{deviceId}[/{moduleId}]/?api-version=2021-04-12[&model-id={urlencoded}].
func (c *Config) Username() string {
	u := c.Host + "/" + c.ClientID() + "/?api-version=" + APIVersion
	if c.ModelID != "" {
		u += "&model-id=" + url.QueryEscape(c.ModelID)
	}
	return u
}

// Resource returns the SAS resource URI of this identity.
func (c *Config) Resource() string {
	if c.ModuleID != "" {
		return sas.ModuleResource(c.Host, c.DeviceID, c.ModuleID)
	}
	return sas.DeviceResource(c.Host, c.DeviceID)
}

// Validate checks c as New does and returns it with defaults filled in, without starting a
// session. Errors match ErrConfig.
func Validate(c Config) (Config, error) { return c.withDefaults() }

// withDefaults validates c and returns a copy with defaults filled in.
func (c Config) withDefaults() (Config, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.Host == "" {
		bad("Host is required")
	}
	if err := wire.ValidateDeviceID(c.DeviceID); err != nil {
		bad("DeviceID: %v", err)
	}
	if c.ModuleID != "" {
		if err := wire.ValidateDeviceID(c.ModuleID); err != nil {
			bad("ModuleID: %v", err)
		}
	}
	switch {
	case c.Signer == nil && c.Certificate == nil:
		bad("a credential is required: Signer (SAS) or Certificate (X.509)")
	case c.Signer != nil && c.Certificate != nil:
		bad("set only one credential: Signer or Certificate")
	}
	port := DefaultPort
	switch c.Transport {
	case "":
		c.Transport = TransportMQTT
	case TransportMQTT:
	case TransportMQTTWS:
		port = DefaultWSPort
		if c.Proxy == nil {
			c.Proxy = ProxyFromEnvironment()
		}
	default:
		bad("Transport %q: want %s or %s", c.Transport, TransportMQTT, TransportMQTTWS)
	}
	if c.Address == "" {
		if _, _, err := net.SplitHostPort(c.Host); err == nil {
			c.Address = c.Host
		} else {
			c.Address = net.JoinHostPort(c.Host, fmt.Sprint(port))
		}
	}
	if h, p, err := net.SplitHostPort(c.Address); err != nil || h == "" || p == "" || strings.ContainsAny(h, ":/") && net.ParseIP(h) == nil {
		bad("Address %q is not host:port", c.Address)
	} else if _, err := url.Parse("ssl://" + c.Address); err != nil {
		bad("Address %q: %v", c.Address, err)
	}
	if c.ServerName == "" {
		c.ServerName = c.Host
		if h, _, err := net.SplitHostPort(c.Host); err == nil {
			c.ServerName = h
		}
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.TokenTTL, DefaultTokenTTL)
	if c.TokenTTL < 2*time.Second {
		bad("TokenTTL %v is shorter than 2s", c.TokenTTL)
	}
	if c.RenewAt == 0 {
		c.RenewAt = DefaultRenewAt
	}
	if c.RenewAt <= 0.1 || c.RenewAt > DefaultRenewAt {
		bad("RenewAt %v must be in (0.1, 0.85]", c.RenewAt)
	}
	def(&c.KeepAlive, DefaultKeepAlive)
	if c.KeepAlive < time.Second || c.KeepAlive > 1177*time.Second {
		bad("KeepAlive %v must be between 1s and 1177s (IoT Hub's useful maximum)", c.KeepAlive)
	}
	def(&c.BackoffMin, DefaultBackoffMin)
	if c.BackoffMin < time.Second {
		bad("BackoffMin %v is below the 1s minimum", c.BackoffMin)
	}
	def(&c.BackoffMax, DefaultBackoffMax)
	if c.BackoffMax < c.BackoffMin {
		bad("BackoffMax %v is below BackoffMin %v", c.BackoffMax, c.BackoffMin)
	}
	if c.RetryTimeout < 0 {
		bad("RetryTimeout is negative")
	}
	def(&c.OperationTimeout, DefaultOperationTimeout)
	if c.OperationTimeout < 0 {
		bad("OperationTimeout is negative")
	}
	if c.QueueCapacity == 0 {
		c.QueueCapacity = DefaultQueueCapacity
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = DefaultMaxInFlight
	}
	if c.InboundQueue == 0 {
		c.InboundQueue = DefaultInboundQueue
	}
	switch c.WhenFull {
	case "", WhenFullRefuseNewest, WhenFullDropOldest:
	default:
		bad("WhenFull %q: want %s or %s", c.WhenFull, WhenFullRefuseNewest, WhenFullDropOldest)
	}
	if c.QueueMaxBytes < 0 {
		bad("QueueMaxBytes must not be negative")
	}
	if c.QueueCapacity < 0 || c.MaxInFlight < 0 || c.InboundQueue < 0 {
		bad("QueueCapacity, MaxInFlight and InboundQueue must not be negative")
	}
	if c.MessageTimeout < 0 {
		bad("MessageTimeout is negative")
	}
	def(&c.DrainTimeout, DefaultDrainTimeout)
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.Dial == nil {
		d := &net.Dialer{}
		c.Dial = d.DialContext
	}
	if c.Clock == nil {
		c.Clock = clock.Real()
	}
	if c.Rand == nil {
		c.Rand = rand.Float64
	}
	if c.TLSConfig != nil && c.TLSConfig.MinVersion < tls.VersionTLS12 {
		bad("TLSConfig: MinVersion must be TLS 1.2 or newer")
	}
	if c.RootCAs == nil && c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			bad("CAFile: %v", err)
		} else {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				bad("CAFile %s: no PEM certificates found", c.CAFile)
			}
			c.RootCAs = pool
		}
	}
	if len(errs) > 0 {
		return c, fmt.Errorf("%w: %w", ErrConfig, errors.Join(errs...))
	}
	return c, nil
}

func (c *Config) tlsConfig() *tls.Config {
	if c.TLSConfig != nil {
		return c.TLSConfig
	}
	if c.Certificate == nil && c.TLSConfigs != nil {
		return c.TLSConfigs.get(c)
	}
	return c.newTLSConfig()
}

func (c *Config) newTLSConfig() *tls.Config {
	t := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		RootCAs:            c.RootCAs,
		ServerName:         c.ServerName,
		ClientSessionCache: c.TLSSessionCache,
		CurvePreferences:   c.CurvePreferences,
	}
	if c.Certificate != nil {
		t.Certificates = []tls.Certificate{*c.Certificate}
	}
	return t
}

// TLSConfigs is the set of tls.Configs that sessions share (Config.TLSConfigs), one for each
// combination of trust roots (the same *x509.CertPool), server name, session cache and curve
// preferences. It is safe for concurrent use; the zero value is ready. A shared tls.Config is
// never modified.
type TLSConfigs struct {
	mu sync.Mutex
	m  map[tlsKey]*tls.Config
}

type tlsKey struct {
	roots      *x509.CertPool
	serverName string
	cache      tls.ClientSessionCache
	curves     string
}

// get returns the shared tls.Config for c (which has no Certificate), making it if needed. A
// session cache of a type that cannot be a map key is not shared: c gets a tls.Config of its own.
func (s *TLSConfigs) get(c *Config) *tls.Config {
	if c.TLSSessionCache != nil && !reflect.TypeOf(c.TLSSessionCache).Comparable() {
		return c.newTLSConfig()
	}
	var curves strings.Builder
	for _, id := range c.CurvePreferences {
		curves.WriteByte(byte(id >> 8))
		curves.WriteByte(byte(id))
	}
	k := tlsKey{roots: c.RootCAs, serverName: c.ServerName, cache: c.TLSSessionCache, curves: curves.String()}
	s.mu.Lock()
	defer s.mu.Unlock()
	if t := s.m[k]; t != nil {
		return t
	}
	if s.m == nil {
		s.m = make(map[tlsKey]*tls.Config)
	}
	t := c.newTLSConfig()
	s.m[k] = t
	return t
}

// pingTimeout is how long a connection waits for PINGRESP: the operation timeout, at most 30 s.
func (c *Config) pingTimeout() time.Duration { return min(c.OperationTimeout, 30*time.Second) }
