package hubapi

import (
	"encoding/json"

	"github.com/iothubby/iothubby/pkg/wire"
)

// The DPS service API's enrollment documents (protocol-service.md §3): one Enrollment type
// serves IndividualEnrollment (RegistrationID set) and EnrollmentGroup (EnrollmentGroupID set),
// since Azure's two shapes share every field but the ID and the registration state.

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

// UpdatesHubAssignment reports whether a repeated registration may move the device to another
// hub (Azure's default, and the answer for a nil policy, is true).
func (p *ReprovisionPolicy) UpdatesHubAssignment() bool {
	return p == nil || p.UpdateHubAssignment == nil || *p.UpdateHubAssignment
}

// MigratesDeviceData reports whether a reprovisioned device keeps its twin (default true).
func (p *ReprovisionPolicy) MigratesDeviceData() bool {
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

// IsGroup reports whether e is an enrollment group.
func (e *Enrollment) IsGroup() bool { return e.EnrollmentGroupID != "" }

// ID is the enrollment's key (registration ID or group ID).
func (e *Enrollment) ID() string {
	if e.IsGroup() {
		return e.EnrollmentGroupID
	}
	return e.RegistrationID
}

// Enabled reports whether the enrollment may provision.
func (e *Enrollment) Enabled() bool { return e.ProvisioningStatus != "disabled" }
