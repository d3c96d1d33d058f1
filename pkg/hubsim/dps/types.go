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

	"github.com/iothubby/iothubby/pkg/wire"
)

// Attestation types.
const (
	AttestationSymmetricKey = "symmetricKey"
	AttestationX509         = "x509"
	AttestationTPM          = "tpm"
)

// Allocation policies.
const (
	AllocationHashed     = "hashed"
	AllocationStatic     = "static"
	AllocationGeoLatency = "geoLatency"
	AllocationCustom     = "custom"
)

// AttestationMechanism is DPS's AttestationMechanism.
type AttestationMechanism struct {
	Type         string                   `json:"type"`
	TPM          *TPMAttestation          `json:"tpm,omitempty"`
	X509         *X509Attestation         `json:"x509,omitempty"`
	SymmetricKey *SymmetricKeyAttestation `json:"symmetricKey,omitempty"`
}

// TPMAttestation is a TPM individual enrollment's attestation: base64 of the marshalled
// TPM2B_PUBLIC of the device's endorsement key, and optionally of its storage root key
// (protocol-device.md §4.2). Both are public keys; nothing in it is secret.
type TPMAttestation struct {
	EndorsementKey string `json:"endorsementKey"`
	StorageRootKey string `json:"storageRootKey,omitempty"`
}

// X509Attestation holds client certificates (individual) or signing certificates (group).
type X509Attestation struct {
	ClientCertificates  *X509Certificates `json:"clientCertificates,omitempty"`
	SigningCertificates *X509Certificates `json:"signingCertificates,omitempty"`
	CAReferences        json.RawMessage   `json:"caReferences,omitempty"`
}

// X509Certificates is a primary and an optional secondary certificate.
type X509Certificates struct {
	Primary   *X509CertificateWithInfo `json:"primary,omitempty"`
	Secondary *X509CertificateWithInfo `json:"secondary,omitempty"`
}

// X509CertificateWithInfo is a PEM certificate and what the service computed from it.
type X509CertificateWithInfo struct {
	Certificate string                    `json:"certificate,omitempty"`
	Info        *wire.X509CertificateInfo `json:"info,omitempty"`
}

// SymmetricKeyAttestation holds two base64 keys.
type SymmetricKeyAttestation struct {
	PrimaryKey   string `json:"primaryKey"`
	SecondaryKey string `json:"secondaryKey"`
}

// ReprovisionPolicy says what a repeated registration does.
type ReprovisionPolicy struct {
	UpdateHubAssignment *bool `json:"updateHubAssignment,omitempty"`
	MigrateDeviceData   *bool `json:"migrateDeviceData,omitempty"`
}

func (p *ReprovisionPolicy) update() bool {
	return p == nil || p.UpdateHubAssignment == nil || *p.UpdateHubAssignment
}

func (p *ReprovisionPolicy) migrate() bool {
	return p == nil || p.MigrateDeviceData == nil || *p.MigrateDeviceData
}

// Enrollment is an IndividualEnrollment (RegistrationID set) or an EnrollmentGroup
// (EnrollmentGroupID set), in Azure's JSON shape.
type Enrollment struct {
	RegistrationID             string                     `json:"registrationId,omitempty"`
	EnrollmentGroupID          string                     `json:"enrollmentGroupId,omitempty"`
	DeviceID                   string                     `json:"deviceId,omitempty"`
	RegistrationState          *wire.DPSRegistrationState `json:"registrationState,omitempty"`
	OptionalDeviceInformation  json.RawMessage            `json:"optionalDeviceInformation,omitempty"`
	Attestation                *AttestationMechanism      `json:"attestation"`
	Capabilities               json.RawMessage            `json:"capabilities,omitempty"`
	IoTHubHostName             string                     `json:"iotHubHostName,omitempty"`
	InitialTwin                json.RawMessage            `json:"initialTwin,omitempty"`
	ETag                       string                     `json:"etag,omitempty"`
	ProvisioningStatus         string                     `json:"provisioningStatus"`
	ReprovisionPolicy          *ReprovisionPolicy         `json:"reprovisionPolicy,omitempty"`
	CreatedDateTimeUTC         string                     `json:"createdDateTimeUtc,omitempty"`
	LastUpdatedDateTimeUTC     string                     `json:"lastUpdatedDateTimeUtc,omitempty"`
	AllocationPolicy           string                     `json:"allocationPolicy,omitempty"`
	IoTHubs                    []string                   `json:"iotHubs,omitempty"`
	CustomAllocationDefinition json.RawMessage            `json:"customAllocationDefinition,omitempty"`
}

// isGroup reports whether e is an enrollment group.
func (e *Enrollment) isGroup() bool { return e.EnrollmentGroupID != "" }

// id is the enrollment's key (registration ID or group ID).
func (e *Enrollment) id() string {
	if e.isGroup() {
		return e.EnrollmentGroupID
	}
	return e.RegistrationID
}

// enabled reports whether the enrollment may provision.
func (e *Enrollment) enabled() bool { return e.ProvisioningStatus != "disabled" }

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
