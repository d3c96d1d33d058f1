package dps

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/tpm/activation"
	"github.com/iothubby/iothubby/pkg/wire"
)

// TPM attestation over HTTPS (protocol-device.md §3.1, §4.6):
//
//  1. The device PUTs register with its endorsement key (EK) and storage root key (SRK) and no
//     Authorization. DPS checks the EK against the individual enrollment and answers 401 with an
//     activation blob that delivers a fresh HMAC key K1 into that TPM (only the TPM holding the
//     EK can activate it, and only under that SRK).
//  2. The device repeats the PUT with a SAS token signed in the TPM with K1 (skn=registration);
//     its polls carry the same token. DPS verifies it with K1.
//  3. The final result carries a second blob delivering a new key K2; hubsim registers the hub
//     device with K2 as its symmetric key, so the SAS tokens the TPM signs for the hub verify.
//
// K1 lives only in memory, per registration ID, for tpmChallengeTTL; K2 only in the registry.

const (
	// maxTPMKeyBytes bounds a decoded endorsement or storage root key. An RSA-4096 key's
	// TPM2B_PUBLIC is under 600 bytes.
	maxTPMKeyBytes = 2048
	// tpmKeyBytes is the size of the HMAC keys DPS delivers to the TPM (K1 and K2).
	tpmKeyBytes = 32
	// tpmChallengeTTL is how long the key of a TPM challenge (K1) authenticates the device.
	tpmChallengeTTL = 5 * time.Minute
	// tpmKeyName is the keyName of the challenge, and the skn the device's DPS token carries.
	tpmKeyName = "registration"
)

// tpmChallenge is an outstanding TPM challenge: the key K1 sent to the TPM that owns ek.
type tpmChallenge struct {
	key     sas.Key
	ek      []byte
	expires time.Time
}

// errTPMOverMQTT refuses a TPM registration over MQTT: DPS attests TPMs over HTTPS (and AMQP)
// only, because the challenge needs an unauthenticated first request.
func errTPMOverMQTT() *apiError {
	return errf(400, 400004, "TPM attestation is not supported over MQTT; use HTTPS")
}

// decodeTPMKey decodes one base64 TPM2B_PUBLIC of a tpm object and checks that it is a key a
// blob can be made to: an RSA or ECC restricted decryption key.
func decodeTPMKey(field, b64 string) ([]byte, *apiError) {
	if b64 == "" {
		return nil, errf(400, 400004, "%s is required", field)
	}
	if len(b64) > base64.StdEncoding.EncodedLen(maxTPMKeyBytes) {
		return nil, errf(400, 400004, "%s is longer than %d bytes", field, maxTPMKeyBytes)
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, errf(400, 400004, "%s is not base64", field)
	}
	if _, err := activation.ParsePublic(raw); err != nil {
		return nil, errf(400, 400004, "%s is not the TPM2B_PUBLIC of an RSA or ECC storage key: %s",
			field, strings.TrimPrefix(err.Error(), "activation: "))
	}
	return raw, nil
}

// parseTPMRequest parses the body of a TPM register request: JSON with a registrationId, a tpm
// object whose endorsementKey and storageRootKey both decode as TPM2B_PUBLIC keys, and an
// optional payload object (checked by register).
func parseTPMRequest(body []byte) (req wire.DPSRegistrationRequest, ek, srk []byte, aerr *apiError) {
	if len(bytes.TrimSpace(body)) == 0 {
		return req, nil, nil, errf(400, 400004, "a TPM registration needs a body with tpm.endorsementKey and tpm.storageRootKey")
	}
	if err := json.Unmarshal(body, &req); err != nil {
		return req, nil, nil, errf(400, 400004, "request body: %v", err)
	}
	if req.TPM == nil {
		return req, nil, nil, errf(400, 400004, "the enrollment uses TPM attestation: the body needs tpm.endorsementKey and tpm.storageRootKey")
	}
	if ek, aerr = decodeTPMKey("tpm.endorsementKey", req.TPM.EndorsementKey); aerr != nil {
		return req, nil, nil, aerr
	}
	if srk, aerr = decodeTPMKey("tpm.storageRootKey", req.TPM.StorageRootKey); aerr != nil {
		return req, nil, nil, aerr
	}
	return req, ek, srk, nil
}

// normalizeTPM checks a TPM enrollment's attestation and stores its keys in canonical base64.
func normalizeTPM(a *hubapi.TPMAttestation) *apiError {
	if a == nil {
		return errf(400, 400004, "attestation.tpm.endorsementKey is required")
	}
	ek, aerr := decodeTPMKey("attestation.tpm.endorsementKey", strings.TrimSpace(a.EndorsementKey))
	if aerr != nil {
		return aerr
	}
	a.EndorsementKey = base64.StdEncoding.EncodeToString(ek)
	if srk := strings.TrimSpace(a.StorageRootKey); srk != "" {
		raw, aerr := decodeTPMKey("attestation.tpm.storageRootKey", srk)
		if aerr != nil {
			return aerr
		}
		a.StorageRootKey = base64.StdEncoding.EncodeToString(raw)
	} else {
		a.StorageRootKey = ""
	}
	return nil
}

// hasTPM reports whether a register body carries a tpm object.
func hasTPM(body []byte) bool {
	var peek struct {
		TPM json.RawMessage `json:"tpm"`
	}
	return json.Unmarshal(body, &peek) == nil && len(peek.TPM) > 0 && string(peek.TPM) != "null"
}

// isTPMEnrollment reports whether regID has a TPM individual enrollment.
func (s *Server) isTPMEnrollment(regID string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.enrollments[keyOf(regID)]
	return e != nil && e.Attestation != nil && e.Attestation.Type == hubapi.AttestationTPM
}

// wantsTPM reports whether an HTTPS register request takes the TPM flow: its body has a tpm
// object, or its registration ID has a TPM enrollment.
func (s *Server) wantsTPM(regID string, body []byte) bool {
	return hasTPM(body) || s.isTPMEnrollment(regID)
}

// tpmEnrollment returns regID's TPM individual enrollment if ek is its endorsement key.
func (s *Server) tpmEnrollment(regID string, ek []byte) (*hubapi.Enrollment, *apiError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.enrollments[keyOf(regID)]
	if e == nil {
		return nil, errf(401, 401002, "no individual enrollment for registration %s (TPM attestation needs one)", regID)
	}
	if e.Attestation == nil || e.Attestation.Type != hubapi.AttestationTPM || e.Attestation.TPM == nil {
		return nil, errf(401, 401002, "enrollment %s does not use TPM attestation", regID)
	}
	if !enrolledEK(e, ek) {
		return nil, errf(401, 401002, "the endorsement key is not the one enrolled for %s", regID)
	}
	c := *e
	return &c, nil
}

// enrolledEK reports whether ek is the endorsement key of TPM enrollment e.
func enrolledEK(e *hubapi.Enrollment, ek []byte) bool {
	enrolled, err := base64.StdEncoding.DecodeString(e.Attestation.TPM.EndorsementKey)
	return err == nil && bytes.Equal(enrolled, ek)
}

// authTPMLocked verifies a TPM device's DPS token (skn and sr already checked) with the key of
// its outstanding challenge. Call with s.mu held.
func (s *Server) authTPMLocked(regID string, e *hubapi.Enrollment, tok *sas.Token, now time.Time) (*match, *apiError) {
	ch := s.tpmChallenges[keyOf(regID)]
	if ch == nil || !now.Before(ch.expires) {
		return nil, errf(401, 401002, "no TPM challenge is outstanding for %s (they last %s): send the register request without Authorization first", regID, tpmChallengeTTL)
	}
	if !enrolledEK(e, ch.ek) {
		return nil, errf(401, 401002, "the endorsement key enrolled for %s changed since its TPM challenge: register again", regID)
	}
	if tok.Verify(ch.key, now) != nil {
		return nil, errf(401, 401002, "token signature does not match the key DPS sent to the TPM of %s", regID)
	}
	return &match{regID: regID, enrollment: *e, tpm: true, disabled: !e.Enabled()}, nil
}

// newTPMKey returns tpmKeyBytes random bytes.
func newTPMKey() ([]byte, error) {
	k := make([]byte, tpmKeyBytes)
	_, err := rand.Read(k)
	return k, err
}

// registerTPM answers an HTTPS register request of the TPM flow: without a token, the
// challenge; with one, the registration proper.
func (s *Server) registerTPM(scope, regID, token string, body []byte) reply {
	if !strings.EqualFold(scope, s.cfg.IDScope) {
		return errorReply(errf(401, 401002, "unknown ID scope %q", scope))
	}
	if err := wire.ValidateRegistrationID(regID); err != nil {
		return errorReply(errf(400, 400004, "%v", err))
	}
	req, ek, srk, aerr := parseTPMRequest(body)
	if aerr != nil {
		return errorReply(aerr)
	}
	if req.RegistrationID != "" && !strings.EqualFold(req.RegistrationID, regID) {
		return errorReply(errf(400, 400004, "body registrationId %q is not %q", req.RegistrationID, regID))
	}
	e, aerr := s.tpmEnrollment(regID, ek)
	if aerr != nil {
		return errorReply(aerr)
	}
	if token == "" {
		return s.challengeTPM(regID, e, ek, srk)
	}
	m, aerr := s.authenticate(scope, regID, Credentials{Token: token})
	if aerr != nil {
		return errorReply(aerr)
	}
	if !m.tpm {
		// authenticate found the TPM enrollment tpmEnrollment returned a moment ago gone or
		// replaced by another kind.
		return errorReply(errf(401, 401002, "enrollment %s does not use TPM attestation", regID))
	}
	if !m.disabled {
		// K2: the key the device will sign its hub tokens with, delivered in the final result
		// and stored as the hub device's primary key.
		k2, err := newTPMKey()
		if err != nil {
			return errorReply(errf(500, 500000, "random: %v", err))
		}
		blob, err := activation.Build(rand.Reader, ek, srk, k2)
		if err != nil {
			return errorReply(errf(500, 500000, "building the activation blob: %v", err))
		}
		m.key, m.otherKey = base64.StdEncoding.EncodeToString(k2), registry.GenerateKey()
		m.tpmAuthKey = base64.StdEncoding.EncodeToString(blob.Marshal())
	}
	return s.register(m, body)
}

// challengeTPM makes K1, remembers it for regID (replacing an earlier challenge) and answers
// 401 with the activation blob that delivers it to the device's TPM.
func (s *Server) challengeTPM(regID string, e *hubapi.Enrollment, ek, srk []byte) reply {
	s.registerRequests.Add(1)
	k1, err := newTPMKey()
	if err != nil {
		return errorReply(errf(500, 500000, "random: %v", err))
	}
	blob, err := activation.Build(rand.Reader, ek, srk, k1)
	if err != nil {
		return errorReply(errf(500, 500000, "building the activation blob: %v", err))
	}
	now := s.now()
	s.mu.Lock()
	for k, ch := range s.tpmChallenges {
		if !now.Before(ch.expires) {
			delete(s.tpmChallenges, k)
		}
	}
	s.tpmChallenges[keyOf(regID)] = &tpmChallenge{key: k1, ek: bytes.Clone(ek), expires: now.Add(tpmChallengeTTL)}
	s.mu.Unlock()
	s.log.Info("DPS TPM challenge issued", zap.String("registration_id", regID), zap.String("enrollment", e.ID()))
	return reply{status: 401, retryAfter: -1, body: wire.DPSTPMChallenge{
		ErrorCode: 401002,
		Message: "TPM challenge: activate authenticationKey in the TPM, then repeat the request with a SAS token " +
			"signed by the activated key (skn=" + tpmKeyName + ")",
		AuthenticationKey: base64.StdEncoding.EncodeToString(blob.Marshal()),
		KeyName:           tpmKeyName,
	}}
}
