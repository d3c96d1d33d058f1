package dps

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/rest"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// MaxBodySize bounds request bodies.
const MaxBodySize = 1 << 20

const contentType = "application/json; charset=utf-8"

// Segments splits a request path into percent-decoded segments; false when the path does not
// decode.
func Segments(r *http.Request) ([]string, bool) {
	seg, err := rest.Segments(r)
	return seg, err == nil
}

// Owns reports whether a request path belongs to DPS (its service API, its device endpoint, or
// hubsim's /hubsim/dps additions) rather than to the hub.
func Owns(seg []string) bool {
	if len(seg) == 0 {
		return false
	}
	switch strings.ToLower(seg[0]) {
	case "enrollments", "enrollmentgroups", "registrations":
		return true
	case "hubsim":
		return len(seg) >= 2 && seg[1] == "dps"
	}
	return isDevicePath(seg)
}

// isDevicePath matches the device registration endpoint: /{idScope}/registrations/{id}/register,
// .../operations/{op} and /{idScope}/registrations/{id}, never a hub API path.
func isDevicePath(seg []string) bool {
	if len(seg) < 3 || seg[1] != "registrations" {
		return false
	}
	switch strings.ToLower(seg[0]) {
	case "devices", "twins", "jobs", "statistics", "configurations", "hubsim", "registrations", "enrollments", "enrollmentgroups":
		return false
	}
	return len(seg) == 3 || (len(seg) == 4 && seg[3] == "register") || (len(seg) == 5 && seg[3] == "operations")
}

// ServeHTTP serves the DPS service API, the device registration endpoint and /hubsim/dps.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	seg, ok := Segments(r)
	if !ok {
		s.writeReply(w, errorReply(errf(400, 400004, "path is not valid percent-encoding")))
		return
	}
	var rep reply
	switch {
	case isDevicePath(seg):
		rep = s.serveDevice(r, seg)
	default:
		if err := s.authorize(r); err != nil {
			s.log.Info("DPS service request refused", zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.String("reason", err.msg))
			rep = errorReply(err)
			break
		}
		rep = s.serveService(w, r, seg)
	}
	s.writeReply(w, rep)
	s.log.Debug("DPS request", zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.Int("status", rep.status))
}

func (s *Server) writeReply(w http.ResponseWriter, rep reply) {
	if rep.status == 0 {
		return // already written
	}
	w.Header().Set("Content-Type", contentType)
	if rep.retryAfter >= 0 && (rep.status == 202 || rep.status == 429 || rep.status >= 500) {
		w.Header().Set("Retry-After", strconv.Itoa(rep.retryAfter))
	}
	switch b := rep.body.(type) {
	case wire.DPSError:
		w.Header().Set("x-ms-error-code", strconv.Itoa(b.ErrorCode))
	case wire.DPSTPMChallenge:
		w.Header().Set("x-ms-error-code", strconv.Itoa(b.ErrorCode))
	}
	if rep.status == 204 {
		w.WriteHeader(204)
		return
	}
	b, _ := json.Marshal(rep.body)
	w.WriteHeader(rep.status)
	_, _ = w.Write(b)
}

// authorize checks a DPS service SAS token (provisioningserviceowner).
func (s *Server) authorize(r *http.Request) *apiError {
	hdr := r.Header.Get("Authorization")
	if hdr == "" {
		return errf(401, 401002, "missing Authorization header")
	}
	tok, err := sas.Parse(hdr)
	if err != nil {
		return errf(401, 401002, "malformed Authorization header: %v", err)
	}
	if !sas.ResourceCovers(tok.Resource, s.cfg.ServiceHostName) {
		return errf(401, 401002, "token resource %q is not this DPS (%s)", tok.Resource, s.cfg.ServiceHostName)
	}
	if tok.KeyName != PolicyName {
		return errf(401, 401002, "unknown shared access policy %q", tok.KeyName)
	}
	if err := tok.Verify(s.policyKey, s.now()); err != nil {
		if errors.Is(err, sas.ErrExpired) {
			return errf(401, 401002, "token expired")
		}
		return errf(401, 401002, "token signature does not match policy %s", PolicyName)
	}
	return nil
}

func readBody(r *http.Request) ([]byte, *apiError) {
	if r.ContentLength > MaxBodySize { // refused at once, not after waiting for the body
		return nil, errf(413, 413001, "body larger than %d bytes (Content-Length %d)", MaxBodySize, r.ContentLength)
	}
	b, err := io.ReadAll(io.LimitReader(r.Body, MaxBodySize+1))
	if err != nil {
		return nil, errf(400, 400004, "reading the body: %v", err)
	}
	if len(b) > MaxBodySize {
		return nil, errf(413, 413001, "body larger than %d bytes", MaxBodySize)
	}
	if !utf8.Valid(b) {
		return nil, errf(400, 400004, "body is not valid UTF-8")
	}
	return b, nil
}

func readJSON(r *http.Request, v any) *apiError {
	b, aerr := readBody(r)
	if aerr != nil {
		return aerr
	}
	if len(strings.TrimSpace(string(b))) == 0 {
		return errf(400, 400004, "request body is empty")
	}
	if err := json.Unmarshal(b, v); err != nil {
		return errf(400, 400004, "request body: %v", err)
	}
	return nil
}

func asReply(v any, err error) reply {
	if err != nil {
		var ae *apiError
		if errors.As(err, &ae) {
			return errorReply(ae)
		}
		return errorReply(errf(500, 500000, "%v", err))
	}
	return reply{status: 200, body: v, retryAfter: -1}
}

func notFound(r *http.Request) reply {
	return errorReply(errf(404, 404000, "no such resource: %s %s", r.Method, r.URL.Path))
}

func (s *Server) serveService(w http.ResponseWriter, r *http.Request, seg []string) reply {
	head := strings.ToLower(seg[0])
	if head == "hubsim" {
		if len(seg) == 3 && seg[2] == "stats" && r.Method == http.MethodGet {
			return reply{status: 200, body: s.Stats(), retryAfter: -1}
		}
		return notFound(r)
	}
	if head == "registrations" {
		switch {
		case len(seg) == 2 && r.Method == http.MethodGet:
			st, err := s.RegistrationState(seg[1])
			return asReply(st, err)
		case len(seg) == 2 && r.Method == http.MethodDelete:
			if err := s.DeleteRegistrationState(seg[1], r.Header.Get("If-Match")); err != nil {
				return asReply(nil, err)
			}
			return reply{status: 204, retryAfter: -1}
		case len(seg) == 3 && strings.EqualFold(seg[2], "query") && r.Method == http.MethodPost:
			return s.page(w, r, s.GroupRegistrations(seg[1]))
		}
		return notFound(r)
	}
	group := head == "enrollmentgroups"
	switch {
	case len(seg) == 1 && r.Method == http.MethodPost:
		return s.bulk(r, group)
	case len(seg) == 2 && strings.EqualFold(seg[1], "query") && r.Method == http.MethodPost:
		return s.page(w, r, s.ListEnrollments(group))
	case len(seg) == 2 && r.Method == http.MethodPut:
		var e hubapi.Enrollment
		if aerr := readJSON(r, &e); aerr != nil {
			return errorReply(aerr)
		}
		if group {
			if e.EnrollmentGroupID == "" {
				e.EnrollmentGroupID = seg[1]
			}
			if !strings.EqualFold(e.EnrollmentGroupID, seg[1]) {
				return errorReply(errf(400, 400004, "enrollmentGroupId %q is not the path's %q", e.EnrollmentGroupID, seg[1]))
			}
		} else {
			if e.RegistrationID == "" {
				e.RegistrationID = seg[1]
			}
			if !strings.EqualFold(e.RegistrationID, seg[1]) {
				return errorReply(errf(400, 400004, "registrationId %q is not the path's %q", e.RegistrationID, seg[1]))
			}
		}
		return asReply(s.PutEnrollment(e, group, r.Header.Get("If-Match")))
	case len(seg) == 2 && r.Method == http.MethodGet:
		return asReply(s.GetEnrollment(seg[1], group))
	case len(seg) == 2 && r.Method == http.MethodDelete:
		if err := s.DeleteEnrollment(seg[1], group, r.Header.Get("If-Match")); err != nil {
			return asReply(nil, err)
		}
		return reply{status: 204, retryAfter: -1}
	case len(seg) == 3 && strings.EqualFold(seg[2], "attestationmechanism") && r.Method == http.MethodPost:
		e, err := s.GetEnrollment(seg[1], group)
		if err != nil {
			return asReply(nil, err)
		}
		return asReply(e.Attestation, nil)
	}
	return notFound(r)
}

// page answers a query with x-ms-max-item-count paging; x-ms-continuation is an offset and is
// left out on the last page (an empty header makes Microsoft's SDK loop forever).
func (s *Server) page(w http.ResponseWriter, r *http.Request, all any) reply {
	b, aerr := readBody(r)
	if aerr != nil {
		return errorReply(aerr)
	}
	if len(strings.TrimSpace(string(b))) > 0 {
		var q struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(b, &q); err != nil {
			return errorReply(errf(400, 400004, "query body: %v", err))
		}
	}
	raw, _ := json.Marshal(all)
	var items []json.RawMessage
	_ = json.Unmarshal(raw, &items)
	offset := 0
	if c := r.Header.Get("x-ms-continuation"); c != "" {
		n, err := strconv.Atoi(c)
		if err != nil || n < 0 {
			return errorReply(errf(400, 400004, "bad x-ms-continuation"))
		}
		offset = min(n, len(items))
	}
	size := len(items)
	if c := r.Header.Get("x-ms-max-item-count"); c != "" {
		n, err := strconv.Atoi(c)
		if err != nil || n <= 0 {
			return errorReply(errf(400, 400004, "bad x-ms-max-item-count"))
		}
		size = n
	}
	end := min(offset+size, len(items))
	if end < len(items) {
		w.Header().Set("x-ms-continuation", strconv.Itoa(end))
	}
	out := items[offset:end]
	if out == nil {
		out = []json.RawMessage{}
	}
	return reply{status: 200, body: out, retryAfter: -1}
}

func (s *Server) bulk(r *http.Request, group bool) reply {
	var op BulkOperation
	if aerr := readJSON(r, &op); aerr != nil {
		return errorReply(aerr)
	}
	items := op.Enrollments
	if group {
		items = op.EnrollmentGroups
	}
	if len(items) == 0 || len(items) > 10 {
		return errorReply(errf(400, 400004, "a bulk operation takes 1 to 10 items, got %d", len(items)))
	}
	mode := strings.ToLower(op.Mode)
	switch mode {
	case "create", "update", "updateifmatchetag", "delete":
	default:
		return errorReply(errf(400, 400004, "mode %q is not create, update, updateIfMatchETag or delete", op.Mode))
	}
	res := BulkResult{IsSuccessful: true, Errors: []BulkError{}}
	for _, e := range items {
		var err error
		id := e.RegistrationID
		if group {
			id = e.EnrollmentGroupID
		}
		switch mode {
		case "create":
			if _, gerr := s.GetEnrollment(id, group); gerr == nil {
				err = errf(409, 409201, "enrollment %s already exists", id)
			} else {
				_, err = s.PutEnrollment(e, group, "")
			}
		case "update":
			_, err = s.PutEnrollment(e, group, "*")
		case "updateifmatchetag":
			tag := e.ETag
			if tag == "" {
				tag = `"missing"`
			}
			_, err = s.PutEnrollment(e, group, tag)
		case "delete":
			err = s.DeleteEnrollment(id, group, "")
		}
		if err != nil {
			res.IsSuccessful = false
			be := BulkError{ErrorCode: 500000, ErrorStatus: err.Error()}
			var ae *apiError
			if errors.As(err, &ae) {
				be.ErrorCode, be.ErrorStatus = ae.code, ae.msg
			}
			if group {
				be.EnrollmentGroupID = id
			} else {
				be.RegistrationID = id
			}
			res.Errors = append(res.Errors, be)
		}
	}
	return reply{status: 200, body: res, retryAfter: -1}
}

// serveDevice is the device registration endpoint:
//
//	PUT  /{idScope}/registrations/{registrationId}/register
//	GET  /{idScope}/registrations/{registrationId}/operations/{operationId}
//	POST /{idScope}/registrations/{registrationId}
//
// A register request whose body has a tpm object, or whose registration ID has a TPM
// enrollment, takes the TPM flow (registerTPM); its polls authenticate like any SAS token.
func (s *Server) serveDevice(r *http.Request, seg []string) reply {
	scope, regID := seg[0], seg[2]
	cr := Credentials{Token: r.Header.Get("Authorization")}
	if cr.Token == "" && r.TLS != nil {
		cr.Certs = r.TLS.PeerCertificates
	}
	route := ""
	switch {
	case len(seg) == 4 && seg[3] == "register" && r.Method == http.MethodPut:
		route = "register"
	case len(seg) == 5 && seg[3] == "operations" && r.Method == http.MethodGet:
		route = "poll"
	case len(seg) == 3 && r.Method == http.MethodPost:
		route = "status"
	default:
		return notFound(r)
	}
	var body []byte
	if route == "register" {
		var aerr *apiError
		if body, aerr = readBody(r); aerr != nil {
			return errorReply(aerr)
		}
		if s.wantsTPM(regID, body) {
			rep := s.registerTPM(scope, regID, cr.Token, body)
			if de, ok := rep.body.(wire.DPSError); ok {
				s.log.Info("DPS registration refused", zap.String("registration_id", regID), zap.String("transport", "https"),
					zap.String("attestation", hubapi.AttestationTPM), zap.Int("status", rep.status), zap.String("reason", de.Message))
			}
			return rep
		}
	}
	m, aerr := s.authenticate(scope, regID, cr)
	if aerr != nil {
		s.log.Info("DPS registration refused", zap.String("registration_id", regID), zap.String("transport", "https"), zap.String("reason", aerr.msg))
		return errorReply(aerr)
	}
	if route != "status" {
		if rep, ok := s.faultReply(r.Context(), regID); ok {
			return rep
		}
	}
	switch route {
	case "register":
		return s.register(m, body)
	case "poll":
		return s.poll(regID, seg[4])
	default:
		st, err := s.RegistrationState(regID)
		return asReply(st, err)
	}
}

// DeadlineFor is how long a DPS MQTT session may stay idle: 1.5 × keep-alive (keep-alive 0
// counts as 1767 s, IoT Hub's cap).
func DeadlineFor(keepAlive uint16) time.Duration {
	if keepAlive == 0 || keepAlive > 1178 {
		keepAlive = 1178
	}
	return time.Duration(keepAlive) * 1500 * time.Millisecond
}
