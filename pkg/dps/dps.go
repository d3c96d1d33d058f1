// Package dps is the agent's Device Provisioning Service client: it registers a device over MQTT
// or HTTPS with a symmetric key (SAS token) or an X.509 certificate (TLS client certificate),
// polls the operation honouring retry-after (capped, jittered, 2 s when absent), retries 429 and
// 5xx with backoff (pkg/backoff, the policy the hub session uses), fails clearly on other 4xx, and caches the result atomically in a state
// directory so that a restart reuses it (protocol-device.md §2, §3, §5–§7).
//
// With a TPM (Config.TPM) it runs the two-round HTTPS flow of protocol-device.md §3.1: the
// first request carries the endorsement and storage root keys and no Authorization, the 401
// answer's activation blob is imported into the TPM, and every later request carries a SAS
// token the TPM signs. The final result's blob is imported too: the key it carries is the one
// the device signs its IoT Hub tokens with. DPS has no TPM attestation over MQTT, so a TPM with
// the MQTT transport is refused before anything is sent.
package dps

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/backoff"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// GlobalEndpoint is Azure's global DPS device endpoint.
const GlobalEndpoint = "global.azure-devices-provisioning.net"

// MsgProvisioned is the log message of a successful registration (fields "hub",
// "assigned_device"), which tests and operators wait for.
const MsgProvisioned = "provisioned"

// Transports.
const (
	MQTT  = "mqtt"
	HTTPS = "https"
)

// Defaults.
const (
	DefaultPollInterval = 2 * time.Second
	DefaultMaxWait      = 30 * time.Second
	DefaultTimeout      = 2 * time.Minute
	DefaultTokenTTL     = time.Hour
	DefaultBackoffMin   = time.Second
	DefaultBackoffMax   = 30 * time.Second
	// DefaultRequestTimeout bounds one request/response exchange.
	DefaultRequestTimeout = 30 * time.Second
)

// ErrRefused wraps a permanent refusal: a 4xx other than 429, or a final failed/disabled status.
var ErrRefused = errors.New("dps: registration refused")

// ErrTPMOverMQTT is returned for a TPM registration configured with the MQTT transport.
var ErrTPMOverMQTT = errors.New("dps: TPM attestation needs the HTTPS transport (DPS does not support TPM over MQTT)")

// TPM is what TPM attestation needs from the device's TPM; pkg/tpm.Device implements it.
type TPM interface {
	// EndorsementKey and StorageRootKey return the marshalled TPM2B_PUBLIC of each key.
	EndorsementKey() []byte
	StorageRootKey() []byte
	// ImportActivation imports the HMAC key an activation blob carries, replacing the old one.
	ImportActivation(ctx context.Context, blob []byte) error
	// Sign computes HMAC-SHA256 with the imported key, inside the TPM.
	sas.Signer
}

// Config describes one registration.
type Config struct {
	// Endpoint is the DPS device endpoint host[:port]; default GlobalEndpoint (port 8883 for
	// MQTT, 443 for HTTPS).
	Endpoint string
	// ServerName is the name the server certificate must carry (default: the endpoint's host).
	ServerName string
	// RootCAs are trusted for the server certificate; nil uses the system roots.
	RootCAs *x509.CertPool
	// SessionCache, when set, lets registrations resume one another's TLS sessions (a fleet
	// shares one with its hub connections; tickets are kept per server name, so DPS and the
	// hub each resume their own). Not used with an X.509 credential: a resumed session would
	// present the certificate of the registration that made it.
	SessionCache tls.ClientSessionCache
	// CurvePreferences are the TLS key exchanges offered, in order; nil: Go's defaults.
	CurvePreferences []tls.CurveID
	// IDScope and RegistrationID name the registration.
	IDScope        string
	RegistrationID string
	// Transport is MQTT (default) or HTTPS.
	Transport string
	// Credential is a symmetric key (individual, or already derived from a group key) or an
	// X.509 certificate whose CN is the registration ID. Leave it nil when TPM is set.
	Credential *attest.Credential
	// TPM attests with the device's TPM over HTTPS (the default transport when TPM is set).
	TPM TPM
	// Payload is an optional JSON object sent with the request.
	Payload json.RawMessage
	// ClientVersion goes into the MQTT user name and the HTTPS User-Agent.
	ClientVersion string
	// MaxWait caps a server's retry-after. Default 30 s.
	MaxWait time.Duration
	// Timeout bounds the whole registration (on top of ctx). Default 2 min.
	Timeout time.Duration
	// RequestTimeout bounds one exchange. Default 30 s.
	RequestTimeout time.Duration
	// BackoffMin and BackoffMax bound the backoff between retries of 429, 5xx and transport
	// errors (backoff.Policy: exponential with full jitter, never below BackoffMin). Defaults
	// 1 s and 30 s.
	BackoffMin, BackoffMax time.Duration
	// TokenTTL is the SAS token lifetime. Default 1 h.
	TokenTTL time.Duration
	// Logger receives progress (never secrets); nil discards.
	Logger *zap.Logger
	// Clock drives the waits between polls and retries and dates tokens and results. Default:
	// the real clock. (Timeout and RequestTimeout are context deadlines on the wall clock.)
	Clock clock.Clock
	// Rand returns a uniform float in [0, 1) for jitter. Default: math/rand/v2.
	Rand func() float64

	// tpmReady is set once the challenge's key is in the TPM: requests then carry SAS tokens.
	tpmReady bool
}

// Result is a successful registration.
type Result struct {
	RegistrationID string          `json:"registrationId"`
	AssignedHub    string          `json:"assignedHub"`
	DeviceID       string          `json:"deviceId"`
	Substatus      string          `json:"substatus,omitempty"`
	Payload        json.RawMessage `json:"payload,omitempty"`
	// IDScope and Endpoint are what the result was obtained from (a cache for another scope is
	// ignored).
	IDScope  string    `json:"idScope"`
	Endpoint string    `json:"endpoint"`
	Obtained time.Time `json:"obtained"`
}

// HubHostAndAddress splits AssignedHub ("host" or "host:port") into the hub's host name and a
// dial address (port 8883 when none).
func (r *Result) HubHostAndAddress() (host, address string) {
	if h, p, err := net.SplitHostPort(r.AssignedHub); err == nil {
		return h, net.JoinHostPort(h, p)
	}
	return r.AssignedHub, net.JoinHostPort(r.AssignedHub, "8883")
}

// exchange is one request/response with DPS.
type exchange struct {
	status     int
	retryAfter int
	hasRA      bool
	body       []byte
}

type transport interface {
	register(ctx context.Context, body []byte) (exchange, error)
	poll(ctx context.Context, operationID string) (exchange, error)
	close()
}

func (c *Config) defaults() error {
	if c.Endpoint == "" {
		c.Endpoint = GlobalEndpoint
	}
	if c.TPM != nil {
		if c.Transport == MQTT {
			return ErrTPMOverMQTT
		}
		c.Transport = HTTPS
		if c.Credential != nil {
			return errors.New("dps: set a credential or a TPM, not both")
		}
		c.Credential, _ = attest.FromTPM(c.TPM)
	}
	if c.Transport == "" {
		c.Transport = MQTT
	}
	if c.Transport != MQTT && c.Transport != HTTPS {
		return fmt.Errorf("dps: transport %q is not mqtt or https", c.Transport)
	}
	if c.IDScope == "" {
		return errors.New("dps: ID scope is required")
	}
	if err := wire.ValidateRegistrationID(c.RegistrationID); err != nil {
		return fmt.Errorf("dps: %w", err)
	}
	if c.Credential == nil {
		return errors.New("dps: a credential is required")
	}
	if c.Credential.Kind() == attest.X509 {
		leaf := c.Credential.Certificate().Leaf
		if leaf != nil && leaf.Subject.CommonName != c.RegistrationID {
			return fmt.Errorf("dps: certificate CN %q is not the registration ID %q", leaf.Subject.CommonName, c.RegistrationID)
		}
	}
	if len(c.Payload) > 0 {
		var obj map[string]any
		if err := json.Unmarshal(c.Payload, &obj); err != nil {
			return errors.New("dps: payload must be a JSON object")
		}
	}
	if c.MaxWait <= 0 {
		c.MaxWait = DefaultMaxWait
	}
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.BackoffMin <= 0 {
		c.BackoffMin = DefaultBackoffMin
	}
	if c.BackoffMax < c.BackoffMin {
		c.BackoffMax = max(DefaultBackoffMax, c.BackoffMin)
	}
	if c.TokenTTL <= 0 {
		c.TokenTTL = DefaultTokenTTL
	}
	if c.ClientVersion == "" {
		c.ClientVersion = "iothubby-agent/0.1"
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.Clock == nil {
		c.Clock = clock.Real()
	}
	if c.Rand == nil {
		c.Rand = rand.Float64
	}
	return nil
}

func (c *Config) endpointHostPort() (host, addr string) {
	port := "8883"
	if c.Transport == HTTPS {
		port = "443"
	}
	if h, _, err := net.SplitHostPort(c.Endpoint); err == nil {
		return h, c.Endpoint
	}
	return c.Endpoint, net.JoinHostPort(c.Endpoint, port)
}

func (c *Config) tlsConfig() *tls.Config {
	host, _ := c.endpointHostPort()
	sn := c.ServerName
	if sn == "" {
		sn = host
	}
	tc := &tls.Config{RootCAs: c.RootCAs, ServerName: sn, MinVersion: tls.VersionTLS12, CurvePreferences: c.CurvePreferences}
	if cert := c.Credential.Certificate(); cert != nil {
		tc.Certificates = []tls.Certificate{*cert}
	} else {
		tc.ClientSessionCache = c.SessionCache
	}
	return tc
}

// token builds the DPS SAS token of a symmetric-key credential ("" for X.509).
func (c *Config) token(ctx context.Context) (string, error) {
	s := c.Credential.Signer()
	if s == nil || (c.TPM != nil && !c.tpmReady) {
		return "", nil
	}
	return sas.Build(ctx, s, sas.Params{
		Resource: sas.DPSResource(c.IDScope, c.RegistrationID), KeyName: "registration",
		Expiry: c.Clock.Now().Add(c.TokenTTL),
	})
}

// Register registers the device and waits for its assignment.
func Register(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	log := cfg.Logger.With(zap.String("registration_id", cfg.RegistrationID), zap.String("transport", cfg.Transport))
	req := wire.DPSRegistrationRequest{RegistrationID: cfg.RegistrationID, Payload: cfg.Payload}
	if cfg.TPM != nil {
		req.TPM = &wire.DPSTPMKeys{
			EndorsementKey: base64.StdEncoding.EncodeToString(cfg.TPM.EndorsementKey()),
			StorageRootKey: base64.StdEncoding.EncodeToString(cfg.TPM.StorageRootKey()),
		}
	}
	body, _ := json.Marshal(req)
	policy := backoff.Policy{Min: cfg.BackoffMin, Max: cfg.BackoffMax}
	attempt := 0
	var tr transport
	defer func() {
		if tr != nil {
			tr.close()
		}
	}()
	retry := func(what string, err error, ra int) error {
		d := cfg.retryWait(policy, attempt, ra)
		attempt++
		log.Warn("DPS "+what+" failed; retrying", zap.Error(err), zap.Duration("retry_in", d))
		if tr != nil {
			tr.close()
			tr = nil
		}
		return cfg.sleep(ctx, d)
	}
	for {
		if tr == nil {
			var err error
			if cfg.Transport == HTTPS {
				tr, err = newHTTPS(&cfg)
			} else {
				var mt *mqttTransport
				if mt, err = dialMQTT(ctx, &cfg); err == nil {
					tr = mt
				}
			}
			if err != nil {
				tr = nil
				if errors.Is(err, ErrRefused) || ctx.Err() != nil {
					return nil, errors.Join(err, ctx.Err())
				}
				if err := retry("connect", err, 0); err != nil {
					return nil, fmt.Errorf("dps: %w", err)
				}
				continue
			}
		}
		ex, err := tr.register(ctx, body)
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("dps: register: %w", err)
			}
			if err := retry("register", err, 0); err != nil {
				return nil, fmt.Errorf("dps: %w", err)
			}
			continue
		}
		if cfg.TPM != nil && !cfg.tpmReady && ex.status == 401 {
			if err := cfg.acceptChallenge(ctx, ex); err != nil {
				return nil, err
			}
			log.Debug("TPM challenge imported; registering with TPM-signed tokens")
			continue
		}
		op, err := wire.ParseDPSReply(ex.status, ex.body)
		var de *wire.DPSError
		if errors.As(err, &de) && de.Retryable() {
			if err := retry("register", err, ex.retryAfter); err != nil {
				return nil, fmt.Errorf("dps: %w", err)
			}
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrRefused, err)
		}
		log.Debug("DPS registration accepted", zap.String("operation_id", op.OperationID), zap.String("status", op.Status))
		for op.Status == wire.DPSStatusAssigning || op.Status == wire.DPSStatusUnassigned {
			wait := cfg.pollWait(ex)
			if err := cfg.sleep(ctx, wait); err != nil {
				return nil, fmt.Errorf("dps: waiting for operation %s: %w", op.OperationID, err)
			}
			ex, err = tr.poll(ctx, op.OperationID)
			if err != nil {
				if ctx.Err() != nil {
					return nil, fmt.Errorf("dps: poll: %w", err)
				}
				break // reconnect and register again
			}
			next, err := wire.ParseDPSReply(ex.status, ex.body)
			if errors.As(err, &de) && de.Retryable() {
				log.Warn("DPS poll throttled or failed; polling again", zap.Error(err))
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("%w: %w", ErrRefused, err)
			}
			op = next
		}
		switch op.Status {
		case wire.DPSStatusAssigned:
			rs := op.RegistrationState
			if cfg.TPM != nil {
				if err := cfg.importFinal(ctx, rs); err != nil {
					return nil, err
				}
			}
			res := &Result{RegistrationID: cfg.RegistrationID, AssignedHub: rs.AssignedHub, DeviceID: rs.DeviceID,
				Substatus: rs.Substatus, Payload: rs.Payload, IDScope: cfg.IDScope, Endpoint: cfg.Endpoint, Obtained: cfg.Clock.Now().UTC()}
			log.Info(MsgProvisioned, zap.String("hub", res.AssignedHub), zap.String("assigned_device", res.DeviceID), zap.String("substatus", res.Substatus))
			return res, nil
		case wire.DPSStatusFailed, wire.DPSStatusDisabled:
			msg, code := "", 0
			if rs := op.RegistrationState; rs != nil {
				msg, code = rs.ErrorMessage, rs.ErrorCode
			}
			return nil, fmt.Errorf("%w: status %s, error %d: %s", ErrRefused, op.Status, code, msg)
		}
		if err := retry("poll", errors.New("connection lost while polling"), 0); err != nil {
			return nil, fmt.Errorf("dps: %w", err)
		}
	}
}

// acceptChallenge imports the activation blob of DPS's 401 answer to a TPM register request.
// A 401 without one is a refusal (unknown registration, another endorsement key).
func (c *Config) acceptChallenge(ctx context.Context, ex exchange) error {
	var ch wire.DPSTPMChallenge
	if json.Unmarshal(ex.body, &ch) != nil || ch.AuthenticationKey == "" {
		_, err := wire.ParseDPSReply(ex.status, ex.body)
		if err == nil {
			err = errors.New("401 without an error body")
		}
		return fmt.Errorf("%w: %w", ErrRefused, err)
	}
	blob, err := base64.StdEncoding.DecodeString(ch.AuthenticationKey)
	if err != nil {
		return fmt.Errorf("%w: the TPM challenge's authenticationKey is not base64: %w", ErrRefused, err)
	}
	if err := c.TPM.ImportActivation(ctx, blob); err != nil {
		return fmt.Errorf("%w: importing the TPM challenge: %w", ErrRefused, err)
	}
	c.tpmReady = true
	return nil
}

// importFinal imports registrationState.tpm.authenticationKey: the key the device will sign
// its IoT Hub tokens with.
func (c *Config) importFinal(ctx context.Context, rs *wire.DPSRegistrationState) error {
	if rs.TPM == nil || rs.TPM.AuthenticationKey == "" {
		return fmt.Errorf("%w: DPS assigned the device but sent no registrationState.tpm.authenticationKey", ErrRefused)
	}
	blob, err := base64.StdEncoding.DecodeString(rs.TPM.AuthenticationKey)
	if err != nil {
		return fmt.Errorf("%w: registrationState.tpm.authenticationKey is not base64: %w", ErrRefused, err)
	}
	if err := c.TPM.ImportActivation(ctx, blob); err != nil {
		return fmt.Errorf("%w: importing the device key from the registration result: %w", ErrRefused, err)
	}
	return nil
}

// pollWait is how long to wait before the next poll: the server's retry-after (2 s when absent),
// capped at MaxWait, plus up to 10 % jitter (never less than retry-after, so polls are not early).
// Polling is not backoff: an operation in progress is asked again at the interval DPS names.
func (c *Config) pollWait(ex exchange) time.Duration {
	d := DefaultPollInterval
	if ex.hasRA {
		d = time.Duration(ex.retryAfter) * time.Second
	}
	d = min(d, c.MaxWait)
	return d + time.Duration(c.Rand()*float64(d)/10)
}

// retryWait is the wait before retry number attempt (0-based) after a failure: the backoff
// policy's delay, never less than the server's retry-after (ra seconds, when positive), and at
// most max(MaxWait, BackoffMax).
func (c *Config) retryWait(p backoff.Policy, attempt, ra int) time.Duration {
	d := p.Delay(attempt, c.Rand())
	if ra > 0 {
		d = max(d, time.Duration(ra)*time.Second)
	}
	return min(d, max(c.MaxWait, c.BackoffMax))
}

// sleep waits d on the configured clock, or until ctx ends.
func (c *Config) sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := c.Clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C():
		return nil
	}
}

// ParseEndpoint checks an endpoint host[:port].
func ParseEndpoint(s string) error {
	if s == "" || strings.ContainsAny(s, "/ ") {
		return fmt.Errorf("dps: endpoint %q must be host or host:port", s)
	}
	return nil
}
