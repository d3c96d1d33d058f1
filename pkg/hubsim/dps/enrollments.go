package dps

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"slices"
	"strings"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Enrollments and enrollment groups: validation, the service API's reads and writes, and the
// registration states it shows.

// normalizeEnrollment validates e and fills service-computed fields (keys, certificate info).
func normalizeEnrollment(e *hubapi.Enrollment, group bool) *apiError {
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
	case "", hubapi.AllocationHashed, hubapi.AllocationStatic, hubapi.AllocationGeoLatency, hubapi.AllocationCustom:
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
	case hubapi.AttestationSymmetricKey:
		if a.SymmetricKey == nil {
			a.SymmetricKey = &hubapi.SymmetricKeyAttestation{}
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
	case hubapi.AttestationX509:
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
		for _, c := range []*hubapi.X509CertificateWithInfo{certs.Primary, certs.Secondary} {
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
	case hubapi.AttestationTPM:
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

func (s *Server) maps(group bool) (map[string]*hubapi.Enrollment, []byte) {
	if group {
		return s.groups, bucketGroups
	}
	return s.enrollments, bucketEnrollments
}

// PutEnrollment creates or updates an individual enrollment (group false) or an enrollment
// group. ifMatch, when set, must match the stored etag.
func (s *Server) PutEnrollment(e hubapi.Enrollment, group bool, ifMatch string) (hubapi.Enrollment, error) {
	if err := normalizeEnrollment(&e, group); err != nil {
		return hubapi.Enrollment{}, err
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	m, bucket := s.maps(group)
	k := keyOf(e.ID())
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
			return hubapi.Enrollment{}, errf(412, 412002, "etag %s does not match", ifMatch)
		}
		e.CreatedDateTimeUTC = oldCreated
	} else {
		if ifMatch != "" && ifMatch != "*" && ifMatch != `"*"` {
			return hubapi.Enrollment{}, errf(404, 404201, "enrollment %s does not exist", e.ID())
		}
		e.CreatedDateTimeUTC = now
	}
	e.LastUpdatedDateTimeUTC = now
	e.ETag = newETag()
	e.RegistrationState = nil
	if err := s.store(bucket, k, &e); err != nil {
		return hubapi.Enrollment{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	m[k] = &e
	return s.withState(e), nil
}

// withState adds the registration state to an individual enrollment's view. Call with s.mu.
func (s *Server) withState(e hubapi.Enrollment) hubapi.Enrollment {
	if !e.IsGroup() {
		if r := s.regs[keyOf(e.RegistrationID)]; r != nil {
			st := r.State
			e.RegistrationState = &st
		}
	}
	return e
}

// GetEnrollment returns an enrollment or group.
func (s *Server) GetEnrollment(id string, group bool) (hubapi.Enrollment, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, _ := s.maps(group)
	e := m[keyOf(id)]
	if e == nil {
		return hubapi.Enrollment{}, errf(404, 404201, "enrollment %s not found", id)
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
func (s *Server) ListEnrollments(group bool) []hubapi.Enrollment {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, _ := s.maps(group)
	out := make([]hubapi.Enrollment, 0, len(m))
	for _, e := range m {
		out = append(out, s.withState(*e))
	}
	slices.SortFunc(out, func(a, b hubapi.Enrollment) int { return strings.Compare(keyOf(a.ID()), keyOf(b.ID())) })
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
