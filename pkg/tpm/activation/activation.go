// Package activation is the codec for the TPM activation blob that the Device Provisioning
// Service sends as `authenticationKey`, both in the 401 challenge and in the final
// registrationState.tpm. Build makes a blob in software for an endorsement key and a storage
// root key (what hubsim does); Parse splits one into the six fields a TPM consumes (what the
// agent does). Both follow protocol-device.md §4.3 and §4.6.
package activation

import (
	"errors"
	"io"
)

// Blob is an activation blob split into its six fields. Each field holds the contents of the
// size-prefixed TPM structure, without its 2-byte size.
type Blob struct {
	// CredentialBlob is the TPM2B_ID_OBJECT from MakeCredential to the EK, bound to Name(SRK).
	CredentialBlob []byte
	// Secret is the TPM2B_ENCRYPTED_SECRET: the credential seed, RSA-OAEP to the EK.
	Secret []byte
	// Duplicate is the TPM2B_PRIVATE: the HMAC key, inner and outer wrapped to the SRK.
	Duplicate []byte
	// InSymSeed is the TPM2B_ENCRYPTED_SECRET: the duplication seed, RSA-OAEP to the SRK.
	InSymSeed []byte
	// IDKeyPublic is the TPMT_PUBLIC of the HMAC identity key.
	IDKeyPublic []byte
	// EncURIData is the trailing data field; clients ignore its contents.
	EncURIData []byte
}

// ErrMalformed wraps every parse failure.
var ErrMalformed = errors.New("activation: malformed blob")

// Parse splits an activation blob. It fails on a truncated blob, a missing trailing field or
// trailing garbage. Stub: implemented in the next commit.
func Parse(b []byte) (*Blob, error) { return nil, ErrMalformed }

// Marshal encodes the blob in the wire layout.
func (b *Blob) Marshal() []byte { return nil }

// Build makes the activation blob that delivers key (the HMAC identity key) to the TPM that
// owns the endorsement key ek, imported under its storage root key srk. ek and srk are the
// TPM2B_PUBLIC bytes the device sent (with the 2-byte size prefix). rand supplies every random
// byte (crypto/rand.Reader in production; a fixed stream for golden vectors).
func Build(rand io.Reader, ek, srk, key []byte) (*Blob, error) { return nil, errors.New("todo") }
