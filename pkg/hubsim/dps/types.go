// Package dps is hubsim's Device Provisioning Service: enrollments (individual and group) with
// symmetric-key and X.509 attestation, persisted in a bbolt file; the DPS service REST API as
// Microsoft's azure-iot-provisioning-service sends it (provisioningserviceowner SAS auth); and
// the device registration endpoints over HTTPS (PUT register, GET operations) and over MQTT (a
// small MQTT 3.1.1 session on the hub's TLS listener, handed over by the broker when the CONNECT
// user name has the DPS shape). On assignment the device is created or updated in the hub's
// registry. protocol-device.md §2–§7 and protocol-service.md §3 are the sources.
package dps

import (
	"encoding/json"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/wire"
)

// The enrollment documents are hubapi's, defined once for hubsim and the service client; these
// names keep this package's API as it was.
type (
	// AttestationMechanism is DPS's AttestationMechanism.
	AttestationMechanism = hubapi.AttestationMechanism
	// TPMAttestation is a TPM individual enrollment's attestation.
	TPMAttestation = hubapi.TPMAttestation
	// X509Attestation holds client certificates (individual) or signing certificates (group).
	X509Attestation = hubapi.X509Attestation
	// X509Certificates is a primary and an optional secondary certificate.
	X509Certificates = hubapi.X509Certificates
	// X509CertificateWithInfo is a PEM certificate and what the service computed from it.
	X509CertificateWithInfo = hubapi.X509CertificateWithInfo
	// SymmetricKeyAttestation holds two base64 keys.
	SymmetricKeyAttestation = hubapi.SymmetricKeyAttestation
	// ReprovisionPolicy says what a repeated registration does.
	ReprovisionPolicy = hubapi.ReprovisionPolicy
	// Enrollment is an IndividualEnrollment or an EnrollmentGroup in Azure's JSON shape.
	Enrollment = hubapi.Enrollment
)

// Attestation types and allocation policies.
const (
	AttestationSymmetricKey = hubapi.AttestationSymmetricKey
	AttestationX509         = hubapi.AttestationX509
	AttestationTPM          = hubapi.AttestationTPM
	AllocationHashed        = hubapi.AllocationHashed
	AllocationStatic        = hubapi.AllocationStatic
	AllocationGeoLatency    = hubapi.AllocationGeoLatency
	AllocationCustom        = hubapi.AllocationCustom
)

// Registration is what DPS remembers of one registration ID: the state the service API shows,
// the enrollment it matched, and the initial twin applied to its device (kept here so that a
// twin store can read it: see Server.InitialTwin).
type Registration struct {
	State             wire.DPSRegistrationState `json:"state"`
	EnrollmentGroupID string                    `json:"enrollmentGroupId,omitempty"`
	// InitialTwin is the enrollment's initialTwin ({"tags":{},"properties":{"desired":{}}}) as
	// applied at the last initial assignment or reset.
	InitialTwin json.RawMessage `json:"initialTwin,omitempty"`
	// Hub and GenerationID are where DPS placed the device (the hub's name without a port).
	Hub          string `json:"hub,omitempty"`
	GenerationID string `json:"generationId,omitempty"`
}

// BulkOperation is the body of POST /enrollments/ and POST /enrollmentGroups.
type BulkOperation struct {
	Mode             string       `json:"mode"`
	Enrollments      []Enrollment `json:"enrollments"`
	EnrollmentGroups []Enrollment `json:"enrollmentGroups"`
}

// BulkResult is a bulk operation's answer.
type BulkResult struct {
	IsSuccessful bool        `json:"isSuccessful"`
	Errors       []BulkError `json:"errors"`
}

// BulkError is one failed item of a bulk operation.
type BulkError struct {
	RegistrationID    string `json:"registrationId,omitempty"`
	EnrollmentGroupID string `json:"enrollmentGroupId,omitempty"`
	ErrorCode         int    `json:"errorCode"`
	ErrorStatus       string `json:"errorStatus"`
}
