package dps

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// DefaultIDScope is the ID scope used when none is configured.
const DefaultIDScope = "0ne00000001"

// PolicyName is the DPS service policy name.
const PolicyName = "provisioningserviceowner"

// Config configures a Server.
type Config struct {
	// Path is the bbolt file (created if missing).
	Path string
	// IDScope is the DPS instance's ID scope. Default DefaultIDScope.
	IDScope string
	// ServiceHostName is the host name service tokens' sr must name. Required.
	ServiceHostName string
	// Hubs are the linked hubs' host names (the first is the default). Required.
	Hubs []string
	// AssignedHubSuffix is appended to a hub's name in assignedHub (e.g. ":8884" when the hub's
	// MQTT port is not 8883, so that SDKs dial it).
	AssignedHubSuffix string
	// Registry is the hub's device registry, where assigned devices are created.
	Registry *registry.Registry
	// RetryAfter is the retry-after (seconds) of 202 replies. Negative: 0.
	RetryAfter int
	// RegistrationRate limits register requests per second across all devices (0: no limit);
	// RegistrationBurst is the bucket size (default 1). Over the limit: 429 with retry-after.
	RegistrationRate  float64
	RegistrationBurst int
	// ApplyInitialTwin, when set, is called on an assignment that applies the enrollment's
	// initial twin (a first registration, or a reprovision that resets the device's data) with
	// the device ID and the initialTwin ({"tags":…,"properties":{"desired":…}}; empty when the
	// enrollment has none). An error fails the registration.
	ApplyInitialTwin func(deviceID string, initialTwin json.RawMessage) error
	// Now is the clock; nil is time.Now.
	Now func() time.Time
	// Fault, when set, is asked before a device's register or operation-status request is
	// served (after authentication, over MQTT and HTTPS): it may hold the request (dps-delay)
	// and returns a status (429, 500 or 503; 0: none) to answer instead, with its retry-after in
	// seconds (dps-error).
	Fault func(ctx context.Context, registrationID string) (status, retryAfter int)
}

// Stats are counters hubsim exposes under /hubsim/dps/stats.
type Stats struct {
	// Registrations counts register requests that were assigned.
	Registrations int64 `json:"registrations"`
	// RegisterRequests counts every register request, accepted or not.
	RegisterRequests int64 `json:"registerRequests"`
	// EarlyPolls counts operation polls sent before the retry-after of the previous reply.
	EarlyPolls int64 `json:"earlyPolls"`
	// Throttled counts 429 replies.
	Throttled int64 `json:"throttled"`
	// Operations counts operation polls.
	Polls int64 `json:"polls"`
}

// Server is hubsim's DPS.
type Server struct {
	cfg Config
	log *zap.Logger
	db  *bolt.DB

	policyKey sas.Key
	policyB64 string

	// writeMu orders the service API's writes (enrollments, deleted registrations): held across
	// the check, the disk write and the update of the maps, so that two writers of one key
	// cannot interleave. Device paths never take it.
	writeMu sync.Mutex
	// mu guards the maps below. It is never held across a disk write: device connects (HubOf)
	// and registrations (authentication) take it.
	mu          sync.Mutex
	enrollments map[string]*hubapi.Enrollment
	groups      map[string]*hubapi.Enrollment
	regs        map[string]*Registration
	ops         map[string]*operation
	// tpmChallenges holds the key (K1) of each registration's outstanding TPM challenge.
	tpmChallenges map[string]*tpmChallenge

	limMu     sync.Mutex
	tokens    float64
	tokenTime time.Time

	registrations, registerRequests, earlyPolls, throttled, polls atomic.Int64

	hubSuffix atomic.Pointer[string]

	// placed maps a device ID to the hub DPS put it in and the registry generation it created
	// or updated (guarded by mu).
	placed map[string]placement

	// beforeWrite, if set (tests only), runs before each disk write; an error fails the write.
	beforeWrite func() error
}

type placement struct{ hub, generationID, regKey string }

// HubOf names the hub a device was assigned to, if DPS placed this generation of it.
func (s *Server) HubOf(deviceID, generationID string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.placed[deviceID]
	if !ok || p.generationID != generationID {
		return "", false
	}
	return p.hub, true
}

// SetAssignedHubSuffix sets what is appended to hub names in assignedHub (e.g. ":8884" once the
// hub's MQTT port is known).
func (s *Server) SetAssignedHubSuffix(suffix string) { s.hubSuffix.Store(&suffix) }

func (s *Server) suffix() string {
	if p := s.hubSuffix.Load(); p != nil {
		return *p
	}
	return s.cfg.AssignedHubSuffix
}

type operation struct {
	id, regID string
	notBefore time.Time
	created   time.Time
	result    wire.DPSOperationStatus
}

// Open opens the DPS store and returns the server.
func Open(cfg Config, log *zap.Logger) (*Server, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.IDScope == "" {
		cfg.IDScope = DefaultIDScope
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.RetryAfter < 0 {
		cfg.RetryAfter = 0
	}
	if cfg.RegistrationBurst <= 0 {
		cfg.RegistrationBurst = 1
	}
	if cfg.Registry == nil || len(cfg.Hubs) == 0 || cfg.ServiceHostName == "" || cfg.Path == "" {
		return nil, errors.New("dps: Path, Registry, Hubs and ServiceHostName are required")
	}
	if strings.ContainsAny(cfg.IDScope, "/ ?&") {
		return nil, fmt.Errorf("dps: ID scope %q must not contain '/', '?', '&' or spaces", cfg.IDScope)
	}
	db, err := bolt.Open(cfg.Path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("dps: %s is locked (is another hubsim using this state directory?)", cfg.Path)
	}
	if err != nil {
		return nil, fmt.Errorf("dps: open %s: %w", cfg.Path, err)
	}
	s := &Server{
		cfg: cfg, log: log, db: db,
		enrollments: map[string]*hubapi.Enrollment{}, groups: map[string]*hubapi.Enrollment{},
		regs: map[string]*Registration{}, ops: map[string]*operation{}, placed: map[string]placement{},
		tpmChallenges: map[string]*tpmChallenge{},
		tokens:        float64(cfg.RegistrationBurst), tokenTime: cfg.Now(),
	}
	if err := s.load(); err != nil {
		_ = db.Close()
		return nil, err
	}
	return s, nil
}

// Close closes the store.
func (s *Server) Close() error { return s.db.Close() }

// IDScope is the configured ID scope.
func (s *Server) IDScope() string { return s.cfg.IDScope }

// ConnectionString is the provisioningserviceowner connection string (it holds the key).
func (s *Server) ConnectionString() string {
	return "HostName=" + s.cfg.ServiceHostName + ";SharedAccessKeyName=" + PolicyName + ";SharedAccessKey=" + s.policyB64
}

// Stats returns the counters.
func (s *Server) Stats() Stats {
	return Stats{
		Registrations: s.registrations.Load(), RegisterRequests: s.registerRequests.Load(),
		EarlyPolls: s.earlyPolls.Load(), Throttled: s.throttled.Load(), Polls: s.polls.Load(),
	}
}

// InitialTwin returns the initial twin ({"tags":…,"properties":{"desired":…}}) DPS applied to a
// device at its last initial assignment or reset, for a twin store to seed the device's twin.
func (s *Server) InitialTwin(deviceID string) (json.RawMessage, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.placed[deviceID]
	if !ok {
		return nil, false
	}
	r := s.regs[p.regKey]
	if r == nil || r.State.DeviceID != deviceID || len(r.InitialTwin) == 0 {
		return nil, false
	}
	return slices.Clone(r.InitialTwin), true
}

// apiError is a DPS error: HTTP status and six-digit code.
type apiError struct {
	status, code int
	msg          string
	retryAfter   int
}

func (e *apiError) Error() string { return fmt.Sprintf("%d %d %s", e.status, e.code, e.msg) }

// faultReply asks Config.Fault about a device request of regID: ok means answer rep instead.
func (s *Server) faultReply(ctx context.Context, regID string) (rep reply, ok bool) {
	if s.cfg.Fault == nil {
		return reply{}, false
	}
	status, retryAfter := s.cfg.Fault(ctx, regID)
	if status == 0 {
		return reply{}, false
	}
	rep = errorReply(errf(status, status*1000+1, "fault injected: dps-error %d", status))
	rep.retryAfter = retryAfter
	s.log.Info("DPS request answered by a fault", zap.String("registration_id", regID), zap.Int("status", status), zap.Int("retry_after", retryAfter))
	return rep, true
}

func errf(status, code int, format string, args ...any) *apiError {
	return &apiError{status: status, code: code, msg: fmt.Sprintf(format, args...)}
}

func (s *Server) now() time.Time { return s.cfg.Now() }

func timestamp(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.0000000Z") }

func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func newETag() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return `"` + hex.EncodeToString(b[:]) + `"`
}

func keyOf(id string) string { return strings.ToLower(id) }
