package dps

import (
	"encoding/json"
	"errors"
	"hash/fnv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Registration and assignment: throttling, the register operation and its polls, allocation
// to a hub, and creating or updating the device in the registry.

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
		s.log.Info("DPS registration of a disabled enrollment", zap.String("registration_id", m.regID), zap.String("enrollment", m.enrollment.ID()))
		op.result = wire.DPSOperationStatus{OperationID: op.id, Status: wire.DPSStatusDisabled, RegistrationState: &wire.DPSRegistrationState{
			RegistrationID: m.regID, Status: wire.DPSStatusDisabled, ErrorCode: 401003,
			ErrorMessage: "enrollment " + m.enrollment.ID() + " is disabled", LastUpdatedDateTimeUTC: timestamp(now)}}
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
func (s *Server) allocate(e *hubapi.Enrollment, regID string) (string, *apiError) {
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
	if e.AllocationPolicy == hubapi.AllocationStatic {
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
	if !e.IsGroup() && e.DeviceID != "" {
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
		case !e.ReprovisionPolicy.UpdatesHubAssignment():
			hub, substatus, applyTwin = prevHub, prevCopy.State.Substatus, !exists
			if substatus == "" {
				substatus = wire.SubstatusInitialAssignment
			}
		case e.ReprovisionPolicy.MigratesDeviceData():
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
	if e.IsGroup() {
		rec.EnrollmentGroupID = e.EnrollmentGroupID
	}
	switch e.Attestation.Type {
	case hubapi.AttestationSymmetricKey:
		if e.IsGroup() {
			st.SymmetricKey = &wire.DPSGroupRef{EnrollmentGroupID: e.EnrollmentGroupID}
		}
	case hubapi.AttestationX509:
		x := &wire.DPSX509Result{CertificateInfo: certInfo(m.leaf)}
		if e.IsGroup() {
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
