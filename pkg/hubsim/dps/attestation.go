package dps

import (
	"crypto/x509"
	"slices"
	"strings"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Attestation: which enrollment a registering device matches, by SAS token (individual or
// group-derived key, or TPM), or by X.509 certificate chain.

// match is an authenticated device: the enrollment it matched and what it attested with.
type match struct {
	regID      string
	enrollment hubapi.Enrollment
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
		if e.Attestation.Type == hubapi.AttestationTPM {
			return s.authTPMLocked(regID, e, tok, now)
		}
		if e.Attestation.Type != hubapi.AttestationSymmetricKey {
			return nil, errf(401, 401002, "enrollment %s does not use symmetric keys", regID)
		}
		sk := e.Attestation.SymmetricKey
		for _, pair := range [][2]string{{sk.PrimaryKey, sk.SecondaryKey}, {sk.SecondaryKey, sk.PrimaryKey}} {
			if verify(pair[0]) {
				return &match{regID: regID, enrollment: *e, key: pair[0], otherKey: pair[1], disabled: !e.Enabled()}, nil
			}
		}
		return nil, errf(401, 401002, "token signature does not match enrollment %s", regID)
	}
	ids := make([]string, 0, len(s.groups))
	for k, g := range s.groups {
		if g.Attestation.Type == hubapi.AttestationSymmetricKey {
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
				return &match{regID: regID, enrollment: *g, key: pair[0], otherKey: pair[1], disabled: !g.Enabled()}, nil
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
	if e := s.enrollments[keyOf(regID)]; e != nil && e.Attestation.Type == hubapi.AttestationX509 {
		tp := pki.ThumbprintSHA256(leaf)
		cc := e.Attestation.X509.ClientCertificates
		for _, c := range []*hubapi.X509CertificateWithInfo{cc.Primary, cc.Secondary} {
			if c != nil && c.Info != nil && c.Info.SHA256Thumbprint == tp {
				return &match{regID: regID, enrollment: *e, leaf: leaf, disabled: !e.Enabled()}, nil
			}
		}
		return nil, errf(401, 401002, "certificate does not match enrollment %s", regID)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	var best *hubapi.Enrollment
	var bestSigner *x509.Certificate
	bestDepth := 1 << 30
	for _, g := range s.groups {
		if g.Attestation.Type != hubapi.AttestationX509 || g.Attestation.X509.SigningCertificates == nil {
			continue
		}
		sc := g.Attestation.X509.SigningCertificates
		for _, c := range []*hubapi.X509CertificateWithInfo{sc.Primary, sc.Secondary} {
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
	return &match{regID: regID, enrollment: *best, leaf: leaf, signer: bestSigner, disabled: !best.Enabled()}, nil
}
