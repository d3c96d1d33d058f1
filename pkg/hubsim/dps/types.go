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

// The enrollment documents (Enrollment, AttestationMechanism and the rest) are hubapi's, defined
// once for hubsim and the service client.

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
	Mode             string              `json:"mode"`
	Enrollments      []hubapi.Enrollment `json:"enrollments"`
	EnrollmentGroups []hubapi.Enrollment `json:"enrollmentGroups"`
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
