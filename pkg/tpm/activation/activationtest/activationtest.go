// Package activationtest is a software stand-in for the two keys of a TPM that DPS attestation
// uses, for tests: RSA-2048 keys in the TCG endorsement-key and storage-root-key templates,
// marshalled as a device sends them, whose private halves undo an activation blob without a
// TPM. Unwrap does in software what ActivateCredential and Import do in the TPM and checks
// every integrity value on the way, so a test can see exactly which key a blob delivers.
package activationtest

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"

	"github.com/iothubby/iothubby/pkg/tpm/activation"
)

// SoftTPM holds an endorsement key and a storage root key with their private halves.
type SoftTPM struct {
	EKPrivate, SRKPrivate *rsa.PrivateKey
	// EK and SRK are the marshalled TPM2B_PUBLIC of each key, as a device sends them.
	EK, SRK []byte
}

// New makes a SoftTPM with fresh RSA-2048 keys.
func New() (*SoftTPM, error) {
	ek, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	srk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	return FromKeys(ek, srk), nil
}

// FromKeys makes a SoftTPM from existing keys (golden vectors keep theirs in testdata).
func FromKeys(ek, srk *rsa.PrivateKey) *SoftTPM {
	return &SoftTPM{EKPrivate: ek, SRKPrivate: srk,
		EK: RSAPublic(tpm2.RSAEKTemplate, &ek.PublicKey), SRK: RSAPublic(tpm2.RSASRKTemplate, &srk.PublicKey)}
}

// RSAPublic wraps an RSA public key in a TPM2B_PUBLIC with tmpl's attributes, as a TPM would.
func RSAPublic(tmpl tpm2.TPMTPublic, k *rsa.PublicKey) []byte {
	tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	return tpm2.Marshal(tpm2.New2B(tmpl))
}

// Unwrap recovers the HMAC key a blob delivers to this TPM. It fails if the credential's seed
// is not encrypted to the EK, the credential is not bound to Name(SRK), the duplicate is not
// wrapped to the SRK, any integrity value is wrong, or the identity key's public area does not
// match its sensitive part (unique = SHA-256(seedValue || key), no fixedTPM/fixedParent, the
// documented policy).
func (d *SoftTPM) Unwrap(b *activation.Blob) ([]byte, error) {
	srkPub, err := activation.ParsePublic(d.SRK)
	if err != nil {
		return nil, err
	}
	srkName, err := tpm2.ObjectName(srkPub)
	if err != nil {
		return nil, err
	}
	// ActivateCredential: the seed from the EK, the credential bound to Name(SRK).
	seed, err := rsa.DecryptOAEP(sha256.New(), nil, d.EKPrivate, b.Secret, []byte("IDENTITY\x00"))
	if err != nil {
		return nil, fmt.Errorf("credential secret: not encrypted to this EK: %w", err)
	}
	cred, err := unwrapOuter("credential", seed, srkName.Buffer, b.CredentialBlob)
	if err != nil {
		return nil, err
	}
	if len(cred) != 18 || binary.BigEndian.Uint16(cred) != 16 {
		return nil, fmt.Errorf("credential is not a 16-byte TPM2B_DIGEST: %d bytes", len(cred))
	}
	inner := cred[2:]
	// Import: the outer wrapper from the SRK's seed, then the inner wrapper with the credential.
	idPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](b.IDKeyPublic)
	if err != nil {
		return nil, fmt.Errorf("identity key public area: %w", err)
	}
	idName, err := tpm2.ObjectName(idPub)
	if err != nil {
		return nil, err
	}
	dupSeed, err := rsa.DecryptOAEP(sha256.New(), nil, d.SRKPrivate, b.InSymSeed, []byte("DUPLICATE\x00"))
	if err != nil {
		return nil, fmt.Errorf("import seed: not encrypted to this SRK: %w", err)
	}
	encSensitive, err := unwrapOuter("duplicate", dupSeed, idName.Buffer, b.Duplicate)
	if err != nil {
		return nil, err
	}
	plain := cfb(inner, encSensitive)
	if len(plain) < 2 || int(binary.BigEndian.Uint16(plain))+2 > len(plain) {
		return nil, errors.New("inner wrapper: bad integrity size")
	}
	n := int(binary.BigEndian.Uint16(plain))
	integrity, sensitive := plain[2:2+n], plain[2+n:]
	h := sha256.New()
	h.Write(sensitive)
	h.Write(idName.Buffer)
	if !hmac.Equal(h.Sum(nil), integrity) {
		return nil, errors.New("inner wrapper: integrity does not match")
	}
	s, err := tpm2.Unmarshal[tpm2.TPM2BSensitive](sensitive)
	if err != nil {
		return nil, fmt.Errorf("sensitive area: %w", err)
	}
	sc, err := s.Contents()
	if err != nil {
		return nil, err
	}
	bits, err := sc.Sensitive.Bits()
	if err != nil {
		return nil, err
	}
	unique, err := idPub.Unique.KeyedHash()
	if err != nil {
		return nil, err
	}
	if want := sha256.Sum256(append(bytes.Clone(sc.SeedValue.Buffer), bits.Buffer...)); !bytes.Equal(unique.Buffer, want[:]) {
		return nil, errors.New("identity key: unique is not SHA-256(seedValue || key)")
	}
	if !bytes.Equal(idPub.AuthPolicy.Buffer, activation.IdentityKeyPolicy) || idPub.ObjectAttributes.FixedTPM || idPub.ObjectAttributes.FixedParent {
		return nil, errors.New("identity key: wrong policy or attributes")
	}
	return bits.Buffer, nil
}

// unwrapOuter checks the HMAC of an outer wrapper (TPM2B_DIGEST(hmac) || enc) and decrypts enc.
func unwrapOuter(what string, seed, name, wrapped []byte) ([]byte, error) {
	if len(wrapped) < 2 || int(binary.BigEndian.Uint16(wrapped))+2 > len(wrapped) {
		return nil, fmt.Errorf("%s: bad HMAC size", what)
	}
	n := int(binary.BigEndian.Uint16(wrapped))
	mac, enc := wrapped[2:2+n], wrapped[2+n:]
	m := hmac.New(sha256.New, tpm2.KDFa(crypto.SHA256, seed, "INTEGRITY", nil, nil, 256))
	m.Write(enc)
	m.Write(name)
	if !hmac.Equal(m.Sum(nil), mac) {
		return nil, fmt.Errorf("%s: outer HMAC does not match", what)
	}
	return cfb(tpm2.KDFa(crypto.SHA256, seed, "STORAGE", name, nil, 128), enc), nil
}

// cfb decrypts AES-CFB with a zero IV, as TPM wrappers use.
func cfb(key, enc []byte) []byte {
	c, err := aes.NewCipher(key)
	if err != nil {
		panic(err) // keys here are 16 bytes by construction
	}
	out := bytes.Clone(enc)
	//lint:ignore SA1019 TPM 2.0 credential wrappers are AES-CFB by specification
	cipher.NewCFBDecrypter(c, make([]byte, aes.BlockSize)).XORKeyStream(out, out)
	return out
}
