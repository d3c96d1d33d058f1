package hubapi

import (
	"encoding/json"
	"testing"

	"github.com/iothubby/iothubby/pkg/wire"
)

// TestEnrollmentWireShape pins the JSON of individual enrollments and enrollment groups as the
// DPS service API answers them (hubsim's dps.Enrollment), byte for byte, and that each reads back to the same bytes.
func TestEnrollmentWireShape(t *testing.T) {
	yes, no := true, false
	info := &wire.X509CertificateInfo{SubjectName: "CN=dev-x", SHA1Thumbprint: "ABABABABABABABABABABABABABABABABABABABAB",
		SHA256Thumbprint: "CDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCD", IssuerName: "CN=root",
		NotBeforeUTC: "2026-01-01T00:00:00Z", NotAfterUTC: "2027-01-01T00:00:00Z", SerialNumber: "0A", Version: 3}
	for name, e := range map[string]Enrollment{
		"enrollment-symkey": {
			RegistrationID: "reg-1", DeviceID: "dev-1",
			RegistrationState: &wire.DPSRegistrationState{RegistrationID: "reg-1", CreatedDateTimeUTC: "2026-12-02T04:05:06.1234567Z",
				AssignedHub: "localhost", DeviceID: "dev-1", Status: "assigned", Substatus: "initialAssignment",
				LastUpdatedDateTimeUTC: "2026-12-02T04:05:06.1234567Z", ETag: "ImE="},
			Attestation: &AttestationMechanism{Type: AttestationSymmetricKey, SymmetricKey: &SymmetricKeyAttestation{
				PrimaryKey: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", SecondaryKey: "HxkeHRwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE="}},
			Capabilities:       json.RawMessage(`{"iotEdge":false}`),
			InitialTwin:        json.RawMessage(`{"tags":{"site":"lab"},"properties":{"desired":{"interval":5}}}`),
			ETag:               "MQ==",
			ProvisioningStatus: "enabled",
			ReprovisionPolicy:  &ReprovisionPolicy{UpdateHubAssignment: &yes, MigrateDeviceData: &no},
			CreatedDateTimeUTC: "2026-12-02T04:05:06.1234567Z", LastUpdatedDateTimeUTC: "2026-12-02T04:05:07.1234567Z",
			AllocationPolicy: AllocationHashed, IoTHubs: []string{"localhost"},
		},
		"enrollment-tpm": {
			RegistrationID: "tpm-1",
			Attestation:    &AttestationMechanism{Type: AttestationTPM, TPM: &TPMAttestation{EndorsementKey: "AToAAQALAAMAsgAg", StorageRootKey: "ARgAAQALAAMAcgAA"}},
			ETag:           "Mg==", ProvisioningStatus: "disabled",
		},
		"enrollment-x509": {
			RegistrationID: "dev-x",
			Attestation: &AttestationMechanism{Type: AttestationX509, X509: &X509Attestation{ClientCertificates: &X509Certificates{
				Primary: &X509CertificateWithInfo{Info: info}}}},
			OptionalDeviceInformation: json.RawMessage(`{"model":"m1"}`),
			IoTHubHostName:            "localhost",
			ProvisioningStatus:        "enabled",
		},
		"group-symkey": {
			EnrollmentGroupID:  "grp-1",
			Attestation:        &AttestationMechanism{Type: AttestationSymmetricKey, SymmetricKey: &SymmetricKeyAttestation{PrimaryKey: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", SecondaryKey: "HxkeHRwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE="}},
			ETag:               "Mw==",
			ProvisioningStatus: "enabled",
			AllocationPolicy:   AllocationStatic, IoTHubs: []string{"localhost"},
			CustomAllocationDefinition: json.RawMessage(`{"webhookUrl":"https://example.invalid/alloc","apiVersion":"2021-10-01"}`),
		},
		"group-x509": {
			EnrollmentGroupID: "grp-x",
			Attestation: &AttestationMechanism{Type: AttestationX509, X509: &X509Attestation{
				SigningCertificates: &X509Certificates{Primary: &X509CertificateWithInfo{Info: info}, Secondary: &X509CertificateWithInfo{Certificate: "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n"}},
				CAReferences:        json.RawMessage(`{"primary":"my-ca"}`)}},
			ProvisioningStatus: "enabled",
		},
		"enrollment-zero": {},
	} {
		goldenJSON(t, name, e)
		b, _ := json.Marshal(e)
		var back Enrollment
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatalf("%s: unmarshal its own JSON: %v", name, err)
		}
		if b2, _ := json.Marshal(back); string(b2) != string(b) {
			t.Errorf("%s does not survive a round trip:\n%s\n%s", name, b, b2)
		}
	}
}
