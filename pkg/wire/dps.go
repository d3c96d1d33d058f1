package wire

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Device Provisioning Service (DPS) MQTT grammar (protocol-device.md §2).
//
//	subscribe  $dps/registrations/res/#
//	register   $dps/registrations/PUT/iotdps-register/?$rid={rid}
//	poll       $dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}
//	response   $dps/registrations/res/{status}/?$rid={rid}[&retry-after={seconds}]
//
// The user name is {idScope}/registrations/{registrationId}/api-version={v}[&ClientVersion=...],
// with no '?' before api-version (unlike the hub's).

// DPSResponseFilter is the filter a device subscribes to for DPS replies.
const DPSResponseFilter = "$dps/registrations/res/#"

// DPSAPIVersion is the DPS device API version the agent sends (as the Node, C# and Python SDKs).
const DPSAPIVersion = "2019-03-31"

const (
	dpsPrefix      = "$dps/registrations/"
	dpsRegisterPfx = dpsPrefix + "PUT/iotdps-register/"
	dpsPollPfx     = dpsPrefix + "GET/iotdps-get-operationstatus/"
	dpsResPfx      = dpsPrefix + "res/"
)

// DPSKind says what a DPS topic carries.
type DPSKind uint8

// DPS topic kinds.
const (
	DPSUnknown  DPSKind = iota
	DPSRegister         // device to DPS
	DPSPoll             // device to DPS
	DPSResponse         // DPS to device
)

// DPSTopic is a parsed DPS topic.
type DPSTopic struct {
	Kind        DPSKind
	RequestID   string
	OperationID string
	// Status and RetryAfter (seconds; HasRetryAfter when present): responses.
	Status        int
	RetryAfter    int
	HasRetryAfter bool
}

// DPSRegisterTopic is the topic of a registration request.
func DPSRegisterTopic(rid string) string { return dpsRegisterPfx + "?$rid=" + rid }

// DPSPollTopic is the topic of an operation status request.
func DPSPollTopic(rid, operationID string) string {
	return dpsPollPfx + "?$rid=" + rid + "&operationId=" + operationID
}

// DPSResponseTopic is the topic of a reply: $rid first, retry-after after it when retryAfter >= 0.
func DPSResponseTopic(status int, rid string, retryAfter int) string {
	t := dpsResPfx + strconv.Itoa(status) + "/?$rid=" + rid
	if retryAfter >= 0 {
		t += "&retry-after=" + strconv.Itoa(retryAfter)
	}
	return t
}

// IsDPSTopic reports whether a topic is in the $dps/ namespace.
func IsDPSTopic(topic string) bool { return strings.HasPrefix(topic, "$dps/") }

// ParseDPSTopic parses a DPS topic. Register and poll topics need a $rid; poll topics an
// operationId; responses a three-digit status.
func ParseDPSTopic(topic string) (DPSTopic, error) {
	var t DPSTopic
	if len(topic) > MaxTopicLength {
		return t, fmt.Errorf("%w: longer than %d bytes", ErrTopic, MaxTopicLength)
	}
	var q string
	switch {
	case strings.HasPrefix(topic, dpsRegisterPfx+"?"):
		t.Kind, q = DPSRegister, topic[len(dpsRegisterPfx)+1:]
	case strings.HasPrefix(topic, dpsPollPfx+"?"):
		t.Kind, q = DPSPoll, topic[len(dpsPollPfx)+1:]
	case strings.HasPrefix(topic, dpsResPfx):
		rest := topic[len(dpsResPfx):]
		st, params, ok := strings.Cut(rest, "/")
		if !ok {
			return DPSTopic{}, fmt.Errorf("%w: DPS response without parameters", ErrTopic)
		}
		n, err := parseStatus(st)
		if err != nil {
			return DPSTopic{}, err
		}
		params, ok = strings.CutPrefix(params, "?")
		if !ok {
			return DPSTopic{}, fmt.Errorf("%w: DPS response parameters must start with '?'", ErrTopic)
		}
		t.Kind, t.Status, q = DPSResponse, n, params
	default:
		return DPSTopic{}, fmt.Errorf("%w: %q", ErrTopic, clip(topic))
	}
	m, err := parseParams(q)
	if err != nil {
		return DPSTopic{}, err
	}
	t.RequestID = m["$rid"]
	if t.RequestID == "" {
		return DPSTopic{}, fmt.Errorf("%w: DPS topic without $rid", ErrTopic)
	}
	switch t.Kind {
	case DPSPoll:
		t.OperationID = m["operationId"]
		if t.OperationID == "" {
			return DPSTopic{}, fmt.Errorf("%w: DPS poll without operationId", ErrTopic)
		}
	case DPSResponse:
		if v, ok := m["retry-after"]; ok {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > 86400 {
				return DPSTopic{}, fmt.Errorf("%w: retry-after %q", ErrTopic, clip(v))
			}
			t.RetryAfter, t.HasRetryAfter = n, true
		}
	}
	return t, nil
}

// DPSUsername is a parsed DPS MQTT user name.
type DPSUsername struct {
	IDScope        string
	RegistrationID string
	APIVersion     string
	ClientVersion  string
}

// ErrDPSUsername wraps DPS user name errors.
var ErrDPSUsername = errors.New("wire: bad DPS MQTT user name")

// IsDPSUsername reports whether an MQTT user name has the DPS shape
// {idScope}/registrations/{registrationId}/..., as opposed to a hub's {host}/{deviceId}/....
func IsDPSUsername(u string) bool {
	parts := strings.SplitN(u, "/", 4)
	return len(parts) == 4 && parts[0] != "" && parts[1] == "registrations" && parts[2] != ""
}

// DPSUsernameString builds the user name the agent sends.
func DPSUsernameString(idScope, registrationID, clientVersion string) string {
	s := idScope + "/registrations/" + registrationID + "/api-version=" + DPSAPIVersion
	if clientVersion != "" {
		s += "&ClientVersion=" + escapeValue(clientVersion)
	}
	return s
}

func escapeValue(s string) string {
	var b strings.Builder
	escape(&b, s)
	return b.String()
}

// ParseDPSUsername parses {idScope}/registrations/{registrationId}/api-version=...; a '?' before
// the parameters is tolerated, any api-version accepted, unknown parameters ignored.
func ParseDPSUsername(u string) (DPSUsername, error) {
	var d DPSUsername
	parts := strings.SplitN(u, "/", 4)
	if len(parts) != 4 || parts[1] != "registrations" {
		return d, fmt.Errorf("%w: want {idScope}/registrations/{registrationId}/api-version={version}", ErrDPSUsername)
	}
	d.IDScope, d.RegistrationID = parts[0], parts[2]
	if d.IDScope == "" {
		return d, fmt.Errorf("%w: empty ID scope", ErrDPSUsername)
	}
	if err := ValidateRegistrationID(d.RegistrationID); err != nil {
		return d, fmt.Errorf("%w: %v", ErrDPSUsername, err)
	}
	q := strings.TrimPrefix(parts[3], "?")
	for seg := range strings.SplitSeq(q, "&") {
		k, v, _ := strings.Cut(seg, "=")
		if dv, err := unescape(v); err == nil {
			v = dv
		}
		switch k {
		case "api-version":
			d.APIVersion = v
		case "ClientVersion":
			d.ClientVersion = v
		}
	}
	if d.APIVersion == "" {
		return d, fmt.Errorf("%w: no api-version", ErrDPSUsername)
	}
	return d, nil
}

// ValidateRegistrationID checks a DPS registration ID: 1 to 128 characters, ASCII letters,
// digits and "-._:", not starting or ending with one of the special characters other than '-'.
func ValidateRegistrationID(id string) error {
	if id == "" || len(id) > 128 {
		return fmt.Errorf("registration ID must be 1 to 128 characters, got %d", len(id))
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if alnum || c == '-' {
			continue
		}
		if c == '.' || c == '_' || c == ':' {
			if i == 0 || i == len(id)-1 {
				return fmt.Errorf("registration ID %q must not start or end with %q", clip(id), c)
			}
			continue
		}
		return fmt.Errorf("registration ID %q has %q: only letters, digits, '-', '.', '_' and ':' are allowed", clip(id), c)
	}
	return nil
}

// DPSRegistrationRequest is the body of a register request.
type DPSRegistrationRequest struct {
	RegistrationID string          `json:"registrationId"`
	TPM            *DPSTPMKeys     `json:"tpm,omitempty"`
	Payload        json.RawMessage `json:"payload,omitempty"`
}

// DPSTPMKeys is the tpm part of a register request over HTTPS: base64 of the marshalled
// TPM2B_PUBLIC of the endorsement key and of the storage root key (protocol-device.md §4.2).
type DPSTPMKeys struct {
	EndorsementKey string `json:"endorsementKey"`
	StorageRootKey string `json:"storageRootKey,omitempty"`
}

// DPSTPMChallenge is the body of the 401 that answers a TPM register request without an
// Authorization header: an activation blob for the device's TPM (protocol-device.md §3.1).
type DPSTPMChallenge struct {
	ErrorCode         int    `json:"errorCode,omitempty"`
	Message           string `json:"message,omitempty"`
	AuthenticationKey string `json:"authenticationKey"`
	KeyName           string `json:"keyName,omitempty"`
}

// DPSTPMResult is the tpm part of a registration state: the activation blob carrying the key
// the device signs its IoT Hub tokens with.
type DPSTPMResult struct {
	AuthenticationKey string `json:"authenticationKey,omitempty"`
}

// DPS registration statuses.
const (
	DPSStatusUnassigned = "unassigned"
	DPSStatusAssigning  = "assigning"
	DPSStatusAssigned   = "assigned"
	DPSStatusFailed     = "failed"
	DPSStatusDisabled   = "disabled"
)

// DPS substatuses.
const (
	SubstatusInitialAssignment                = "initialAssignment"
	SubstatusDeviceDataMigrated               = "deviceDataMigrated"
	SubstatusDeviceDataReset                  = "deviceDataReset"
	SubstatusReprovisionedToInitialAssignment = "reprovisionedToInitialAssignment"
)

// DPSOperationStatus is RegistrationOperationStatus: the body of 202 and 200 replies.
type DPSOperationStatus struct {
	OperationID       string                `json:"operationId"`
	Status            string                `json:"status"`
	RegistrationState *DPSRegistrationState `json:"registrationState,omitempty"`
}

// DPSRegistrationState is DeviceRegistrationResult.
type DPSRegistrationState struct {
	RegistrationID         string          `json:"registrationId"`
	CreatedDateTimeUTC     string          `json:"createdDateTimeUtc,omitempty"`
	AssignedHub            string          `json:"assignedHub,omitempty"`
	DeviceID               string          `json:"deviceId,omitempty"`
	Status                 string          `json:"status"`
	Substatus              string          `json:"substatus,omitempty"`
	ErrorCode              int             `json:"errorCode,omitempty"`
	ErrorMessage           string          `json:"errorMessage,omitempty"`
	LastUpdatedDateTimeUTC string          `json:"lastUpdatedDateTimeUtc,omitempty"`
	ETag                   string          `json:"etag,omitempty"`
	Payload                json.RawMessage `json:"payload,omitempty"`
	SymmetricKey           *DPSGroupRef    `json:"symmetricKey,omitempty"`
	X509                   *DPSX509Result  `json:"x509,omitempty"`
	TPM                    *DPSTPMResult   `json:"tpm,omitempty"`
}

// DPSGroupRef names the enrollment group a device matched.
type DPSGroupRef struct {
	EnrollmentGroupID string `json:"enrollmentGroupId,omitempty"`
}

// DPSX509Result is the x509 part of a registration state.
type DPSX509Result struct {
	CertificateInfo        *X509CertificateInfo `json:"certificateInfo,omitempty"`
	EnrollmentGroupID      string               `json:"enrollmentGroupId,omitempty"`
	SigningCertificateInfo *X509CertificateInfo `json:"signingCertificateInfo,omitempty"`
}

// X509CertificateInfo is what DPS shows of a certificate.
type X509CertificateInfo struct {
	SubjectName      string `json:"subjectName"`
	SHA1Thumbprint   string `json:"sha1Thumbprint"`
	SHA256Thumbprint string `json:"sha256Thumbprint"`
	IssuerName       string `json:"issuerName"`
	NotBeforeUTC     string `json:"notBeforeUtc"`
	NotAfterUTC      string `json:"notAfterUtc"`
	SerialNumber     string `json:"serialNumber"`
	Version          int    `json:"version"`
}

// DPSError is ProvisioningServiceErrorDetails: a six-digit errorCode whose first three digits
// are the HTTP status.
type DPSError struct {
	Status       int    `json:"-"`
	ErrorCode    int    `json:"errorCode"`
	TrackingID   string `json:"trackingId"`
	Message      string `json:"message"`
	TimestampUTC string `json:"timestampUtc,omitempty"`
	// RetryAfter is the reply's retry-after in seconds (0 when absent).
	RetryAfter int `json:"-"`
}

func (e *DPSError) Error() string {
	return fmt.Sprintf("dps: status %d, error %d: %s", e.Status, e.ErrorCode, e.Message)
}

// Retryable reports whether a client should try again later (429 and 5xx).
func (e *DPSError) Retryable() bool { return e.Status == 429 || e.Status >= 500 }

// MaxDPSReplySize bounds the reply bodies ParseDPSReply accepts.
const MaxDPSReplySize = 64 * 1024

// ParseDPSReply interprets a DPS reply (MQTT or HTTPS): status 200 and 202 give the operation
// status (which must carry an operationId and a known status; an assigned 200 must name the hub
// and device); any other status gives a *DPSError, whose code falls back to status*1000 when
// the body has none.
func ParseDPSReply(status int, body []byte) (*DPSOperationStatus, error) {
	if len(body) > MaxDPSReplySize {
		return nil, fmt.Errorf("dps: reply of %d bytes is over %d", len(body), MaxDPSReplySize)
	}
	if status != 200 && status != 202 {
		e := &DPSError{Status: status}
		if len(body) > 0 && utf8.Valid(body) {
			_ = json.Unmarshal(body, e)
		}
		if e.ErrorCode/1000 != status {
			if e.ErrorCode == 0 {
				e.ErrorCode = status * 1000
			}
		}
		if e.Message == "" {
			e.Message = fmt.Sprintf("HTTP status %d", status)
		}
		e.Status = status
		return nil, e
	}
	var op DPSOperationStatus
	if err := json.Unmarshal(body, &op); err != nil {
		return nil, fmt.Errorf("dps: reply body: %w", err)
	}
	if op.OperationID == "" {
		return nil, errors.New("dps: reply without operationId")
	}
	switch op.Status {
	case DPSStatusUnassigned, DPSStatusAssigning, DPSStatusAssigned, DPSStatusFailed, DPSStatusDisabled:
	default:
		return nil, fmt.Errorf("dps: reply status %q", clip(op.Status))
	}
	if op.Status == DPSStatusAssigned {
		rs := op.RegistrationState
		if rs == nil || rs.AssignedHub == "" || rs.DeviceID == "" {
			return nil, errors.New("dps: assigned reply without assignedHub and deviceId")
		}
	}
	return &op, nil
}
