package dps

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/pki"
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

var (
	bucketMeta        = []byte("meta")
	bucketEnrollments = []byte("enrollments")
	bucketGroups      = []byte("enrollmentGroups")
	bucketRegs        = []byte("registrations")
)

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
	enrollments map[string]*Enrollment
	groups      map[string]*Enrollment
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
		enrollments: map[string]*Enrollment{}, groups: map[string]*Enrollment{},
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

func (s *Server) load() error {
	return s.db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketEnrollments, bucketGroups, bucketRegs} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return fmt.Errorf("dps: %w", err)
			}
		}
		meta := tx.Bucket(bucketMeta)
		key := meta.Get([]byte("policyKey"))
		if key == nil {
			key = []byte(registry.GenerateKey())
			if err := meta.Put([]byte("policyKey"), key); err != nil {
				return fmt.Errorf("dps: %w", err)
			}
		}
		k, err := sas.ParseKey(string(key))
		if err != nil {
			return fmt.Errorf("dps: stored policy key: %w", err)
		}
		s.policyKey, s.policyB64 = k, string(key)
		load := func(bucket []byte, into func(k string, v []byte) error) error {
			return tx.Bucket(bucket).ForEach(func(k, v []byte) error { return into(string(k), v) })
		}
		if err := load(bucketEnrollments, func(k string, v []byte) error {
			var e Enrollment
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("dps: enrollment %s: %w", k, err)
			}
			s.enrollments[k] = &e
			return nil
		}); err != nil {
			return err
		}
		if err := load(bucketGroups, func(k string, v []byte) error {
			var e Enrollment
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("dps: enrollment group %s: %w", k, err)
			}
			s.groups[k] = &e
			return nil
		}); err != nil {
			return err
		}
		return load(bucketRegs, func(k string, v []byte) error {
			var r Registration
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("dps: registration %s: %w", k, err)
			}
			s.regs[k] = &r
			if r.State.Status == wire.DPSStatusAssigned && r.Hub != "" {
				s.placed[r.State.DeviceID] = placement{hub: r.Hub, generationID: r.GenerationID, regKey: k}
			}
			return nil
		})
	})
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

// ---- enrollments ----

// normalizeEnrollment validates e and fills service-computed fields (keys, certificate info).
func normalizeEnrollment(e *Enrollment, group bool) *apiError {
	if group {
		if e.EnrollmentGroupID == "" {
			return errf(400, 400004, "enrollmentGroupId is required")
		}
		if err := wire.ValidateRegistrationID(e.EnrollmentGroupID); err != nil {
			return errf(400, 400004, "enrollmentGroupId: %v", err)
		}
		e.RegistrationID, e.DeviceID, e.RegistrationState = "", "", nil
	} else {
		if err := wire.ValidateRegistrationID(e.RegistrationID); err != nil {
			return errf(400, 400004, "registrationId: %v", err)
		}
		if e.DeviceID != "" {
			if err := wire.ValidateDeviceID(e.DeviceID); err != nil {
				return errf(400, 400004, "deviceId: %v", err)
			}
		}
		e.EnrollmentGroupID = ""
	}
	switch e.ProvisioningStatus {
	case "":
		e.ProvisioningStatus = "enabled"
	case "enabled", "disabled":
	default:
		return errf(400, 400004, "provisioningStatus must be enabled or disabled")
	}
	switch e.AllocationPolicy {
	case "", AllocationHashed, AllocationStatic, AllocationGeoLatency, AllocationCustom:
	default:
		return errf(400, 400004, "allocationPolicy %q is not hashed, geoLatency, static or custom", e.AllocationPolicy)
	}
	if len(e.InitialTwin) > 0 {
		var tw struct {
			Tags       map[string]any `json:"tags"`
			Properties *struct {
				Desired map[string]any `json:"desired"`
			} `json:"properties"`
		}
		if err := json.Unmarshal(e.InitialTwin, &tw); err != nil {
			return errf(400, 400004, "initialTwin: %v", err)
		}
	}
	a := e.Attestation
	if a == nil {
		return errf(400, 400004, "attestation is required")
	}
	switch a.Type {
	case AttestationSymmetricKey:
		if a.SymmetricKey == nil {
			a.SymmetricKey = &SymmetricKeyAttestation{}
		}
		for _, k := range []*string{&a.SymmetricKey.PrimaryKey, &a.SymmetricKey.SecondaryKey} {
			if *k == "" {
				*k = generateKey64()
				continue
			}
			raw, err := base64.StdEncoding.DecodeString(*k)
			if err != nil || len(raw) < 16 || len(raw) > 64 {
				return errf(400, 400004, "symmetric keys must be base64 of 16 to 64 bytes")
			}
		}
		a.X509, a.TPM = nil, nil
	case AttestationX509:
		if a.X509 == nil {
			return errf(400, 400004, "x509 attestation needs certificates")
		}
		certs := a.X509.ClientCertificates
		if group {
			certs = a.X509.SigningCertificates
			if certs == nil && len(a.X509.CAReferences) > 0 {
				return errf(400, 400004, "hubsim supports signingCertificates for X.509 groups, not caReferences")
			}
		}
		if certs == nil || certs.Primary == nil || certs.Primary.Certificate == "" {
			if group {
				return errf(400, 400004, "x509.signingCertificates.primary.certificate is required")
			}
			return errf(400, 400004, "x509.clientCertificates.primary.certificate is required")
		}
		for _, c := range []*X509CertificateWithInfo{certs.Primary, certs.Secondary} {
			if c == nil {
				continue
			}
			cert, err := parsePEMOrBase64(c.Certificate)
			if err != nil {
				return errf(400, 400004, "x509 certificate: %v", err)
			}
			c.Info = certInfo(cert)
		}
		a.SymmetricKey, a.TPM = nil, nil
	case AttestationTPM:
		if group {
			return errf(400, 400004, "enrollment groups cannot use TPM attestation")
		}
		if err := normalizeTPM(a.TPM); err != nil {
			return err
		}
		a.SymmetricKey, a.X509 = nil, nil
	default:
		return errf(400, 400004, "attestation type %q is not symmetricKey, x509 or tpm", a.Type)
	}
	return nil
}

func generateKey64() string {
	var b [64]byte
	_, _ = rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

// parsePEMOrBase64 reads a certificate as PEM or as bare base64 DER (both appear in Azure tools).
func parsePEMOrBase64(s string) (*x509.Certificate, error) {
	if strings.Contains(s, "-----BEGIN") {
		return pki.ParseCert([]byte(s))
	}
	der, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, errors.New("neither PEM nor base64 DER")
	}
	return x509.ParseCertificate(der)
}

func certInfo(c *x509.Certificate) *wire.X509CertificateInfo {
	return &wire.X509CertificateInfo{
		SubjectName:      "CN=" + c.Subject.CommonName,
		SHA1Thumbprint:   pki.ThumbprintSHA1(c),
		SHA256Thumbprint: pki.ThumbprintSHA256(c),
		IssuerName:       "CN=" + c.Issuer.CommonName,
		NotBeforeUTC:     timestamp(c.NotBefore),
		NotAfterUTC:      timestamp(c.NotAfter),
		SerialNumber:     strings.ToUpper(c.SerialNumber.Text(16)),
		Version:          c.Version,
	}
}

func etagMatches(ifMatch, etag string) bool {
	if ifMatch == "" || ifMatch == "*" || ifMatch == `"*"` {
		return true
	}
	return strings.Trim(ifMatch, `"`) == strings.Trim(etag, `"`)
}

func (s *Server) maps(group bool) (map[string]*Enrollment, []byte) {
	if group {
		return s.groups, bucketGroups
	}
	return s.enrollments, bucketEnrollments
}

// PutEnrollment creates or updates an individual enrollment (group false) or an enrollment
// group. ifMatch, when set, must match the stored etag.
func (s *Server) PutEnrollment(e Enrollment, group bool, ifMatch string) (Enrollment, error) {
	if err := normalizeEnrollment(&e, group); err != nil {
		return Enrollment{}, err
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	m, bucket := s.maps(group)
	k := keyOf(e.id())
	now := timestamp(s.now())
	s.mu.Lock()
	old := m[k]
	var oldETag, oldCreated string
	if old != nil {
		oldETag, oldCreated = old.ETag, old.CreatedDateTimeUTC
	}
	s.mu.Unlock()
	if old != nil {
		if !etagMatches(ifMatch, oldETag) {
			return Enrollment{}, errf(412, 412002, "etag %s does not match", ifMatch)
		}
		e.CreatedDateTimeUTC = oldCreated
	} else {
		if ifMatch != "" && ifMatch != "*" && ifMatch != `"*"` {
			return Enrollment{}, errf(404, 404201, "enrollment %s does not exist", e.id())
		}
		e.CreatedDateTimeUTC = now
	}
	e.LastUpdatedDateTimeUTC = now
	e.ETag = newETag()
	e.RegistrationState = nil
	if err := s.store(bucket, k, &e); err != nil {
		return Enrollment{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	m[k] = &e
	return s.withState(e), nil
}

// withState adds the registration state to an individual enrollment's view. Call with s.mu.
func (s *Server) withState(e Enrollment) Enrollment {
	if !e.isGroup() {
		if r := s.regs[keyOf(e.RegistrationID)]; r != nil {
			st := r.State
			e.RegistrationState = &st
		}
	}
	return e
}

// store writes one record. Call it without s.mu.
func (s *Server) store(bucket []byte, k string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return errf(500, 500000, "encoding: %v", err)
	}
	if s.beforeWrite != nil {
		if err := s.beforeWrite(); err != nil {
			return errf(500, 500000, "store: %v", err)
		}
	}
	// Batch coalesces concurrent writers into one transaction (one fsync) under load.
	if err := s.db.Batch(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Put([]byte(k), b) }); err != nil {
		return errf(500, 500000, "store: %v", err)
	}
	return nil
}

// remove deletes one record. Call it without s.mu.
func (s *Server) remove(bucket []byte, k string) error {
	if s.beforeWrite != nil {
		if err := s.beforeWrite(); err != nil {
			return errf(500, 500000, "store: %v", err)
		}
	}
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Delete([]byte(k)) }); err != nil {
		return errf(500, 500000, "store: %v", err)
	}
	return nil
}

// GetEnrollment returns an enrollment or group.
func (s *Server) GetEnrollment(id string, group bool) (Enrollment, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, _ := s.maps(group)
	e := m[keyOf(id)]
	if e == nil {
		return Enrollment{}, errf(404, 404201, "enrollment %s not found", id)
	}
	return s.withState(*e), nil
}

// DeleteEnrollment deletes an enrollment or group (ifMatch optional).
func (s *Server) DeleteEnrollment(id string, group bool, ifMatch string) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	m, bucket := s.maps(group)
	k := keyOf(id)
	s.mu.Lock()
	e := m[k]
	var etag string
	if e != nil {
		etag = e.ETag
	}
	s.mu.Unlock()
	if e == nil {
		return errf(404, 404201, "enrollment %s not found", id)
	}
	if !etagMatches(ifMatch, etag) {
		return errf(412, 412002, "etag %s does not match", ifMatch)
	}
	if err := s.remove(bucket, k); err != nil {
		return err
	}
	s.mu.Lock()
	delete(m, k)
	s.mu.Unlock()
	return nil
}

// ListEnrollments returns every enrollment or group, ordered by ID.
func (s *Server) ListEnrollments(group bool) []Enrollment {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, _ := s.maps(group)
	out := make([]Enrollment, 0, len(m))
	for _, e := range m {
		out = append(out, s.withState(*e))
	}
	slices.SortFunc(out, func(a, b Enrollment) int { return strings.Compare(keyOf(a.id()), keyOf(b.id())) })
	return out
}

// RegistrationState returns a registration ID's state.
func (s *Server) RegistrationState(regID string) (wire.DPSRegistrationState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.regs[keyOf(regID)]
	if r == nil {
		return wire.DPSRegistrationState{}, errf(404, 404202, "registration %s not found", regID)
	}
	return r.State, nil
}

// DeleteRegistrationState forgets a registration (the next registration is an initial one).
func (s *Server) DeleteRegistrationState(regID, ifMatch string) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	k := keyOf(regID)
	s.mu.Lock()
	r := s.regs[k]
	s.mu.Unlock()
	if r == nil {
		return errf(404, 404202, "registration %s not found", regID)
	}
	if !etagMatches(ifMatch, r.State.ETag) {
		return errf(412, 412002, "etag %s does not match", ifMatch)
	}
	if err := s.remove(bucketRegs, k); err != nil {
		return err
	}
	s.mu.Lock()
	if s.regs[k] == r { // a registration since the snapshot is newer than this delete
		delete(s.regs, k)
	}
	s.mu.Unlock()
	return nil
}

// GroupRegistrations lists the registration states of a group's devices.
func (s *Server) GroupRegistrations(groupID string) []wire.DPSRegistrationState {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []wire.DPSRegistrationState
	for _, r := range s.regs {
		if strings.EqualFold(r.EnrollmentGroupID, groupID) {
			out = append(out, r.State)
		}
	}
	slices.SortFunc(out, func(a, b wire.DPSRegistrationState) int { return strings.Compare(a.RegistrationID, b.RegistrationID) })
	return out
}

// ---- attestation ----

// match is an authenticated device: the enrollment it matched and what it attested with.
type match struct {
	regID      string
	enrollment Enrollment
	// key is the base64 key the device signed with (derived, for groups); secondary the other.
	key, otherKey string
	leaf          *x509.Certificate
	signer        *x509.Certificate
	// disabled: the credentials are good but the matched enrollment is disabled; registration
	// ends with status "disabled".
	disabled bool
	// tpm: the device signed with the key of its TPM challenge. tpmAuthKey is the base64
	// activation blob of the final result (it delivers key, the hub key, to the TPM).
	tpm        bool
	tpmAuthKey string
}

// Credentials are what a device presented: a SAS token, or TLS client certificates.
type Credentials struct {
	Token string
	Certs []*x509.Certificate
}

// authenticate finds the enrollment a device's credentials match.
func (s *Server) authenticate(scope, regID string, cr Credentials) (*match, *apiError) {
	if !strings.EqualFold(scope, s.cfg.IDScope) {
		return nil, errf(401, 401002, "unknown ID scope %q", scope)
	}
	if err := wire.ValidateRegistrationID(regID); err != nil {
		return nil, errf(400, 400004, "%v", err)
	}
	if cr.Token != "" {
		return s.authSAS(scope, regID, cr.Token)
	}
	if len(cr.Certs) > 0 {
		return s.authX509(regID, cr.Certs)
	}
	return nil, errf(401, 401002, "no credentials: send a SAS token or a client certificate")
}

func (s *Server) authSAS(scope, regID, token string) (*match, *apiError) {
	tok, err := sas.Parse(token)
	if err != nil {
		return nil, errf(401, 401002, "malformed SAS token: %v", err)
	}
	if tok.KeyName != "registration" {
		return nil, errf(401, 401002, "token skn must be registration")
	}
	if !strings.EqualFold(tok.Resource, sas.DPSResource(scope, regID)) {
		return nil, errf(401, 401002, "token resource %q is not %s", tok.Resource, sas.DPSResource(scope, regID))
	}
	now := s.now()
	verify := func(b64 string) bool {
		k, err := sas.ParseKey(b64)
		return err == nil && tok.Verify(k, now) == nil
	}
	if tok.Expiry.Before(now) {
		return nil, errf(401, 401002, "token expired")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.enrollments[keyOf(regID)]; e != nil {
		if e.Attestation.Type == AttestationTPM {
			return s.authTPMLocked(regID, e, tok, now)
		}
		if e.Attestation.Type != AttestationSymmetricKey {
			return nil, errf(401, 401002, "enrollment %s does not use symmetric keys", regID)
		}
		sk := e.Attestation.SymmetricKey
		for _, pair := range [][2]string{{sk.PrimaryKey, sk.SecondaryKey}, {sk.SecondaryKey, sk.PrimaryKey}} {
			if verify(pair[0]) {
				return &match{regID: regID, enrollment: *e, key: pair[0], otherKey: pair[1], disabled: !e.enabled()}, nil
			}
		}
		return nil, errf(401, 401002, "token signature does not match enrollment %s", regID)
	}
	ids := make([]string, 0, len(s.groups))
	for k, g := range s.groups {
		if g.Attestation.Type == AttestationSymmetricKey {
			ids = append(ids, k)
		}
	}
	slices.Sort(ids)
	for _, id := range ids {
		g := s.groups[id]
		sk := g.Attestation.SymmetricKey
		p, sec := deriveB64(sk.PrimaryKey, regID), deriveB64(sk.SecondaryKey, regID)
		for _, pair := range [][2]string{{p, sec}, {sec, p}} {
			if verify(pair[0]) {
				return &match{regID: regID, enrollment: *g, key: pair[0], otherKey: pair[1], disabled: !g.enabled()}, nil
			}
		}
	}
	return nil, errf(401, 401002, "no enrollment matches registration %s and its key", regID)
}

func deriveB64(groupKey, regID string) string {
	k, err := sas.ParseKey(groupKey)
	if err != nil {
		return ""
	}
	return sas.DeriveDeviceKey(k, regID).Base64()
}

func (s *Server) authX509(regID string, certs []*x509.Certificate) (*match, *apiError) {
	leaf := certs[0]
	if leaf.Subject.CommonName != regID {
		return nil, errf(401, 401002, "certificate CN %q is not the registration ID %q", leaf.Subject.CommonName, regID)
	}
	now := s.now()
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return nil, errf(401, 401002, "certificate is outside its validity period")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.enrollments[keyOf(regID)]; e != nil && e.Attestation.Type == AttestationX509 {
		tp := pki.ThumbprintSHA256(leaf)
		cc := e.Attestation.X509.ClientCertificates
		for _, c := range []*X509CertificateWithInfo{cc.Primary, cc.Secondary} {
			if c != nil && c.Info != nil && c.Info.SHA256Thumbprint == tp {
				return &match{regID: regID, enrollment: *e, leaf: leaf, disabled: !e.enabled()}, nil
			}
		}
		return nil, errf(401, 401002, "certificate does not match enrollment %s", regID)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	var best *Enrollment
	var bestSigner *x509.Certificate
	bestDepth := 1 << 30
	for _, g := range s.groups {
		if g.Attestation.Type != AttestationX509 || g.Attestation.X509.SigningCertificates == nil {
			continue
		}
		sc := g.Attestation.X509.SigningCertificates
		for _, c := range []*X509CertificateWithInfo{sc.Primary, sc.Secondary} {
			if c == nil {
				continue
			}
			signer, err := parsePEMOrBase64(c.Certificate)
			if err != nil {
				continue
			}
			roots := x509.NewCertPool()
			roots.AddCert(signer)
			chains, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
			if err != nil {
				continue
			}
			for _, ch := range chains {
				if d := len(ch) - 1; d < bestDepth || (d == bestDepth && best != nil && keyOf(g.EnrollmentGroupID) < keyOf(best.EnrollmentGroupID)) {
					best, bestSigner, bestDepth = g, signer, d
				}
			}
		}
	}
	if best == nil {
		return nil, errf(401, 401002, "no enrollment or enrollment group matches the certificate chain of %s", regID)
	}
	return &match{regID: regID, enrollment: *best, leaf: leaf, signer: bestSigner, disabled: !best.enabled()}, nil
}

// ---- registration ----

// throttle takes a token from the registration bucket; it returns the seconds to wait when empty.
func (s *Server) throttle() (int, bool) {
	if s.cfg.RegistrationRate <= 0 {
		return 0, true
	}
	s.limMu.Lock()
	defer s.limMu.Unlock()
	now := s.now()
	s.tokens = min(float64(s.cfg.RegistrationBurst), s.tokens+now.Sub(s.tokenTime).Seconds()*s.cfg.RegistrationRate)
	s.tokenTime = now
	if s.tokens >= 1 {
		s.tokens--
		return 0, true
	}
	wait := (1 - s.tokens) / s.cfg.RegistrationRate
	secs := int(wait)
	if float64(secs) < wait {
		secs++
	}
	return max(secs, 1), false
}

// reply is a DPS answer: status, JSON body, retry-after (seconds, < 0: none).
type reply struct {
	status     int
	body       any
	retryAfter int
}

func errorReply(e *apiError) reply {
	ra := -1
	if e.status == 429 {
		ra = e.retryAfter
	}
	return reply{status: e.status, retryAfter: ra, body: wire.DPSError{
		ErrorCode: e.code, TrackingID: newID(), Message: e.msg, TimestampUTC: timestamp(time.Now()),
	}}
}

// register runs a registration request for an authenticated device.
func (s *Server) register(m *match, body []byte) reply {
	s.registerRequests.Add(1)
	var req wire.DPSRegistrationRequest
	if len(strings.TrimSpace(string(body))) > 0 {
		if err := json.Unmarshal(body, &req); err != nil {
			return errorReply(errf(400, 400004, "request body: %v", err))
		}
	}
	if req.RegistrationID != "" && !strings.EqualFold(req.RegistrationID, m.regID) {
		return errorReply(errf(400, 400004, "body registrationId %q is not %q", req.RegistrationID, m.regID))
	}
	if len(req.Payload) > 0 {
		var obj map[string]any
		if json.Unmarshal(req.Payload, &obj) != nil {
			return errorReply(errf(400, 400004, "payload must be a JSON object"))
		}
	}
	if ra, ok := s.throttle(); !ok {
		s.throttled.Add(1)
		e := errf(429, 429001, "registration rate limit exceeded; retry after %d s", ra)
		e.retryAfter = ra
		return errorReply(e)
	}
	var st wire.DPSRegistrationState
	var aerr *apiError
	if !m.disabled {
		st, aerr = s.assign(m, req.Payload)
	}
	now := s.now()
	op := &operation{id: newID(), regID: keyOf(m.regID), created: now,
		notBefore: now.Add(time.Duration(s.cfg.RetryAfter) * time.Second)}
	switch {
	case m.disabled:
		s.log.Info("DPS registration of a disabled enrollment", zap.String("registration_id", m.regID), zap.String("enrollment", m.enrollment.id()))
		op.result = wire.DPSOperationStatus{OperationID: op.id, Status: wire.DPSStatusDisabled, RegistrationState: &wire.DPSRegistrationState{
			RegistrationID: m.regID, Status: wire.DPSStatusDisabled, ErrorCode: 401003,
			ErrorMessage: "enrollment " + m.enrollment.id() + " is disabled", LastUpdatedDateTimeUTC: timestamp(now)}}
	case aerr != nil:
		op.result = wire.DPSOperationStatus{OperationID: op.id, Status: wire.DPSStatusFailed, RegistrationState: &wire.DPSRegistrationState{
			RegistrationID: m.regID, Status: wire.DPSStatusFailed, ErrorCode: aerr.code, ErrorMessage: aerr.msg,
			LastUpdatedDateTimeUTC: timestamp(now)}}
	default:
		s.registrations.Add(1)
		if m.tpmAuthKey != "" {
			// Only in the operation's result: the stored registration state (what the service
			// API shows) has no tpm part, as in Azure.
			st.TPM = &wire.DPSTPMResult{AuthenticationKey: m.tpmAuthKey}
		}
		op.result = wire.DPSOperationStatus{OperationID: op.id, Status: st.Status, RegistrationState: &st}
	}
	s.mu.Lock()
	for id, o := range s.ops {
		if now.Sub(o.created) > 10*time.Minute {
			delete(s.ops, id)
		}
	}
	s.ops[op.id] = op
	s.mu.Unlock()
	return reply{status: 202, retryAfter: s.cfg.RetryAfter,
		body: wire.DPSOperationStatus{OperationID: op.id, Status: wire.DPSStatusAssigning}}
}

// poll answers an operation status request.
func (s *Server) poll(regID, opID string) reply {
	s.polls.Add(1)
	s.mu.Lock()
	op := s.ops[opID]
	s.mu.Unlock()
	if op == nil || op.regID != keyOf(regID) {
		return errorReply(errf(404, 404203, "operation %s not found", opID))
	}
	if s.now().Before(op.notBefore) {
		s.earlyPolls.Add(1)
	}
	return reply{status: 200, retryAfter: -1, body: op.result}
}

// allocate picks the hub for a registration.
func (s *Server) allocate(e *Enrollment, regID string) (string, *apiError) {
	cands := e.IoTHubs
	if len(cands) == 0 && e.IoTHubHostName != "" {
		cands = []string{e.IoTHubHostName}
	}
	if len(cands) == 0 {
		cands = s.cfg.Hubs
	}
	var hubs []string
	for _, c := range cands {
		for _, h := range s.cfg.Hubs {
			if strings.EqualFold(c, h) {
				hubs = append(hubs, h)
			}
		}
	}
	if len(hubs) == 0 {
		return "", errf(400, 400208, "none of the enrollment's hubs %v is linked to this DPS (%v)", cands, s.cfg.Hubs)
	}
	if e.AllocationPolicy == AllocationStatic {
		return hubs[0], nil
	}
	h := fnv.New32a()
	_, _ = h.Write([]byte(keyOf(regID)))
	return hubs[int(h.Sum32()%uint32(len(hubs)))], nil
}

// assign applies the enrollment's allocation and reprovision policies, creates or updates the
// device in the registry and records the registration.
func (s *Server) assign(m *match, payload json.RawMessage) (wire.DPSRegistrationState, *apiError) {
	e := &m.enrollment
	deviceID := m.regID
	if !e.isGroup() && e.DeviceID != "" {
		deviceID = e.DeviceID
	}
	k := keyOf(m.regID)
	s.mu.Lock()
	prev := s.regs[k]
	var prevCopy *Registration
	if prev != nil {
		c := *prev
		prevCopy = &c
	}
	s.mu.Unlock()

	now := s.now()
	_, getErr := s.cfg.Registry.Get(deviceID)
	exists := getErr == nil
	hub, aerr := s.allocate(e, m.regID)
	if aerr != nil {
		return wire.DPSRegistrationState{}, aerr
	}
	substatus := wire.SubstatusInitialAssignment
	applyTwin := true
	created := timestamp(now)
	if prevCopy != nil && prevCopy.State.Status == wire.DPSStatusAssigned {
		created = prevCopy.State.CreatedDateTimeUTC
		prevHub := strings.TrimSuffix(prevCopy.State.AssignedHub, s.suffix())
		switch {
		case !e.ReprovisionPolicy.update():
			hub, substatus, applyTwin = prevHub, prevCopy.State.Substatus, !exists
			if substatus == "" {
				substatus = wire.SubstatusInitialAssignment
			}
		case e.ReprovisionPolicy.migrate():
			applyTwin = !exists
			if !strings.EqualFold(hub, prevHub) {
				substatus = wire.SubstatusDeviceDataMigrated
			}
		default:
			applyTwin = true
			substatus = wire.SubstatusDeviceDataReset
			if !strings.EqualFold(hub, prevHub) && strings.EqualFold(hub, s.cfg.Hubs[0]) {
				substatus = wire.SubstatusReprovisionedToInitialAssignment
			}
		}
	}
	gen, err := s.ensureDevice(m, deviceID)
	if err == nil && applyTwin && s.cfg.ApplyInitialTwin != nil {
		if terr := s.cfg.ApplyInitialTwin(deviceID, e.InitialTwin); terr != nil {
			return wire.DPSRegistrationState{}, errf(500, 500000, "applying the initial twin to %s: %v", deviceID, terr)
		}
	}
	if err != nil {
		return wire.DPSRegistrationState{}, errf(500, 500000, "creating device %s in hub %s: %v", deviceID, hub, err)
	}
	st := wire.DPSRegistrationState{
		RegistrationID: m.regID, CreatedDateTimeUTC: created, AssignedHub: hub + s.suffix(),
		DeviceID: deviceID, Status: wire.DPSStatusAssigned, Substatus: substatus,
		LastUpdatedDateTimeUTC: timestamp(now), ETag: newETag(), Payload: payload,
	}
	rec := &Registration{State: st, Hub: hub, GenerationID: gen}
	if e.isGroup() {
		rec.EnrollmentGroupID = e.EnrollmentGroupID
	}
	switch e.Attestation.Type {
	case AttestationSymmetricKey:
		if e.isGroup() {
			st.SymmetricKey = &wire.DPSGroupRef{EnrollmentGroupID: e.EnrollmentGroupID}
		}
	case AttestationX509:
		x := &wire.DPSX509Result{CertificateInfo: certInfo(m.leaf)}
		if e.isGroup() {
			x.EnrollmentGroupID = e.EnrollmentGroupID
			x.SigningCertificateInfo = certInfo(m.signer)
		}
		st.X509 = x
	}
	rec.State = st
	if applyTwin {
		rec.InitialTwin = e.InitialTwin
	} else if prevCopy != nil {
		rec.InitialTwin = prevCopy.InitialTwin
	}
	err = s.store(bucketRegs, k, rec)
	if err == nil {
		s.mu.Lock()
		s.regs[k] = rec
		s.placed[deviceID] = placement{hub: hub, generationID: gen, regKey: k}
		s.mu.Unlock()
	}
	if err != nil {
		return wire.DPSRegistrationState{}, errf(500, 500000, "%v", err)
	}
	s.log.Info("device assigned", zap.String("registration_id", m.regID), zap.String("device", deviceID),
		zap.String("hub", hub), zap.String("substatus", substatus), zap.String("attestation", e.Attestation.Type))
	return st, nil
}

// ensureDevice creates the device in the registry, or updates its authentication to what it
// attested with: its symmetric keys, or its leaf certificate's thumbprint (selfSigned, even for
// CA groups, as DPS does).
func (s *Server) ensureDevice(m *match, deviceID string) (string, error) {
	var auth registry.Authentication
	if m.leaf != nil {
		auth = registry.Authentication{Type: registry.AuthSelfSigned, X509Thumbprint: registry.X509Thumbprint{
			PrimaryThumbprint: pki.ThumbprintSHA256(m.leaf), SecondaryThumbprint: pki.ThumbprintSHA1(m.leaf)}}
	} else {
		auth = registry.Authentication{Type: registry.AuthSAS, SymmetricKey: registry.SymmetricKey{
			PrimaryKey: m.key, SecondaryKey: m.otherKey}}
	}
	d, err := s.cfg.Registry.Get(deviceID)
	if err != nil {
		if !errors.Is(err, wire.ErrDeviceNotFound) {
			return "", err
		}
		d, err = s.cfg.Registry.Create(registry.Device{DeviceID: deviceID, Status: registry.StatusEnabled, Authentication: auth})
		if errors.Is(err, wire.ErrDeviceAlreadyExists) {
			return s.ensureDevice(m, deviceID)
		}
		return d.GenerationID, err
	}
	if d.Authentication == auth {
		return d.GenerationID, nil
	}
	d.Authentication = auth
	d, err = s.cfg.Registry.Update(d, "*")
	return d.GenerationID, err
}
