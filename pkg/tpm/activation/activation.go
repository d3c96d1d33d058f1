// Package activation is the codec for the TPM activation blob that the Device Provisioning
// Service sends as `authenticationKey`, both in the 401 challenge and in the final
// registrationState.tpm. Build makes a blob in software for an endorsement key and a storage
// root key (what hubsim does); Parse splits one into the six fields a TPM consumes (what the
// agent does).
//
// The wire layout is six size-prefixed fields, each size a big-endian uint16:
//
//	TPM2B_ID_OBJECT        credential: the inner wrapper key, made to the EK, bound to Name(SRK)
//	TPM2B_ENCRYPTED_SECRET credential seed, RSA-OAEP (or ECDH) to the EK, label "IDENTITY"
//	TPM2B_PRIVATE          the HMAC identity key, inner (AES-128-CFB) and outer wrapped to the SRK
//	TPM2B_ENCRYPTED_SECRET duplication seed to the SRK, label "DUPLICATE"
//	TPM2B_PUBLIC           public area of the HMAC identity key
//	TPM2B_DATA             trailing data; required, contents ignored by every client
//
// The device runs ActivateCredential (SRK activated, EK as key) to recover the inner key, then
// Import under the SRK with that inner key, then Load. The key bytes never exist on the device
// outside the TPM.
package activation

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"

	"github.com/google/go-tpm/tpm2"
)

// Blob is an activation blob split into its six fields. Each field holds the contents of the
// size-prefixed TPM structure, without its 2-byte size.
type Blob struct {
	// CredentialBlob is the TPM2B_ID_OBJECT from MakeCredential to the EK, bound to Name(SRK).
	CredentialBlob []byte
	// Secret is the TPM2B_ENCRYPTED_SECRET: the credential seed, encrypted to the EK.
	Secret []byte
	// Duplicate is the TPM2B_PRIVATE: the HMAC key, inner and outer wrapped to the SRK.
	Duplicate []byte
	// InSymSeed is the TPM2B_ENCRYPTED_SECRET: the duplication seed, encrypted to the SRK.
	InSymSeed []byte
	// IDKeyPublic is the TPMT_PUBLIC of the HMAC identity key.
	IDKeyPublic []byte
	// EncURIData is the trailing data field; clients ignore its contents.
	EncURIData []byte
}

// ErrMalformed wraps every parse failure.
var ErrMalformed = errors.New("activation: malformed blob")

// MaxBlobSize bounds what Parse accepts. An RSA-2048 blob is about 800 bytes; RSA-4096 keys
// make it about 1.3 KB.
const MaxBlobSize = 8 << 10

var fieldNames = [6]string{
	"credential blob (TPM2B_ID_OBJECT)",
	"credential secret (TPM2B_ENCRYPTED_SECRET)",
	"duplicate (TPM2B_PRIVATE)",
	"import seed (TPM2B_ENCRYPTED_SECRET)",
	"identity key public area (TPM2B_PUBLIC)",
	"trailing data field (TPM2B_DATA)",
}

// Parse splits an activation blob. It fails with an error wrapping ErrMalformed on a truncated
// blob, an empty required field, a missing trailing field, bytes after the trailing field, or an
// identity key public area that is not a keyed-hash TPMT_PUBLIC. Parse checks structure only:
// whether the blob was made for this TPM is for ActivateCredential and Import to decide.
func Parse(b []byte) (*Blob, error) {
	if len(b) > MaxBlobSize {
		return nil, fmt.Errorf("%w: %d bytes, more than the %d allowed", ErrMalformed, len(b), MaxBlobSize)
	}
	var fields [6][]byte
	rest := b
	for i := range fields {
		if len(rest) < 2 {
			if i == len(fields)-1 && len(rest) == 0 {
				return nil, fmt.Errorf("%w: the %s is missing (the blob ends after field 5)", ErrMalformed, fieldNames[i])
			}
			return nil, fmt.Errorf("%w: truncated at field %d, the %s: no room for its size", ErrMalformed, i+1, fieldNames[i])
		}
		n := int(binary.BigEndian.Uint16(rest))
		rest = rest[2:]
		if n > len(rest) {
			return nil, fmt.Errorf("%w: truncated at field %d, the %s: size %d but %d bytes left", ErrMalformed, i+1, fieldNames[i], n, len(rest))
		}
		if n == 0 && i < len(fields)-1 {
			return nil, fmt.Errorf("%w: field %d, the %s, is empty", ErrMalformed, i+1, fieldNames[i])
		}
		fields[i] = bytes.Clone(rest[:n])
		rest = rest[n:]
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d unexpected bytes after the trailing data field", ErrMalformed, len(rest))
	}
	blob := &Blob{
		CredentialBlob: fields[0],
		Secret:         fields[1],
		Duplicate:      fields[2],
		InSymSeed:      fields[3],
		IDKeyPublic:    fields[4],
		EncURIData:     fields[5],
	}
	pub, err := unmarshalExact[tpm2.TPMTPublic](blob.IDKeyPublic)
	if err != nil {
		return nil, fmt.Errorf("%w: the %s does not parse: %v", ErrMalformed, fieldNames[4], err)
	}
	if pub.Type != tpm2.TPMAlgKeyedHash {
		return nil, fmt.Errorf("%w: the identity key is of type %v, not a keyed hash (HMAC) key", ErrMalformed, pub.Type)
	}
	for i, f := range [][]byte{blob.CredentialBlob, blob.Duplicate} {
		// Both start with a TPM2B_DIGEST integrity HMAC followed by encrypted bytes.
		if len(f) < 2 || int(binary.BigEndian.Uint16(f))+2 > len(f) {
			return nil, fmt.Errorf("%w: the %s has a bad integrity HMAC size", ErrMalformed, fieldNames[2*i])
		}
	}
	return blob, nil
}

// Marshal encodes the blob in the wire layout.
func (b *Blob) Marshal() []byte {
	fields := [6][]byte{b.CredentialBlob, b.Secret, b.Duplicate, b.InSymSeed, b.IDKeyPublic, b.EncURIData}
	n := 0
	for _, f := range fields {
		n += 2 + len(f)
	}
	out := make([]byte, 0, n)
	for _, f := range fields {
		out = binary.BigEndian.AppendUint16(out, uint16(len(f)))
		out = append(out, f...)
	}
	return out
}

// ParsePublic decodes a TPM2B_PUBLIC as devices send their endorsement and storage root keys
// (2-byte size, then TPMT_PUBLIC, nothing after) and checks that it is an RSA or ECC key that
// can receive an encrypted seed: a restricted decryption key with a symmetric algorithm.
func ParsePublic(tpm2b []byte) (*tpm2.TPMTPublic, error) {
	if len(tpm2b) < 2 {
		return nil, errors.New("activation: public key too short for a TPM2B_PUBLIC")
	}
	n := int(binary.BigEndian.Uint16(tpm2b))
	if n != len(tpm2b)-2 {
		return nil, fmt.Errorf("activation: TPM2B_PUBLIC size field says %d bytes but %d follow", n, len(tpm2b)-2)
	}
	pub, err := unmarshalExact[tpm2.TPMTPublic](tpm2b[2:])
	if err != nil {
		return nil, fmt.Errorf("activation: not a TPMT_PUBLIC: %w", err)
	}
	if pub.Type != tpm2.TPMAlgRSA && pub.Type != tpm2.TPMAlgECC {
		return nil, fmt.Errorf("activation: key type %v is neither RSA nor ECC", pub.Type)
	}
	if !pub.ObjectAttributes.Restricted || !pub.ObjectAttributes.Decrypt {
		return nil, errors.New("activation: key is not a restricted decryption (storage) key")
	}
	if _, err := tpm2.ImportEncapsulationKey(pub); err != nil {
		return nil, fmt.Errorf("activation: unusable key: %w", err)
	}
	return pub, nil
}

// unmarshalExact decodes b as a T and fails if bytes are left over.
func unmarshalExact[T tpm2.Marshallable, P interface {
	*T
	tpm2.Unmarshallable
}](b []byte) (t *T, err error) {
	// go-tpm's reflective (un)marshaller can panic on some hostile inputs; a parser must not.
	defer func() {
		if r := recover(); r != nil {
			t, err = nil, fmt.Errorf("unmarshal: %v", r)
		}
	}()
	v, err := tpm2.Unmarshal[T, P](b)
	if err != nil {
		return nil, err
	}
	// Unmarshal ignores what follows the structure; re-encoding tells whether it used it all.
	if enc := tpm2.Marshal(*v); !bytes.Equal(enc, b) {
		if len(enc) < len(b) {
			return nil, fmt.Errorf("%d bytes after the structure", len(b)-len(enc))
		}
		return nil, errors.New("not in canonical form")
	}
	return v, nil
}

// IdentityKeyPolicy is the authPolicy of the identity key: PolicyCommandCode(TPM_CC_Duplicate),
// as in Microsoft's DPS. Any policy works; it only has to be the one in the public area.
var IdentityKeyPolicy = mustHex("bef56b8c1cc84e11edd717528d2cd99356bd2bbf8f015209c3f84aeeaba8e8a2")

// innerKeyBytes is the size of the inner wrapper key: the SDKs hard-code AES-128 for Import.
const innerKeyBytes = 16

// trailer is what Build encrypts into the trailing field; clients ignore it.
var trailer = []byte("iothubby")

// Build makes the activation blob that delivers key (the HMAC identity key) to the TPM that
// owns the endorsement key ek, to be imported under its storage root key srk. ek and srk are
// the TPM2B_PUBLIC bytes the device sent (with the 2-byte size prefix). rand supplies every
// random byte the blob needs (crypto/rand.Reader in production; a fixed stream for golden
// vectors); note that RSA-OAEP also draws from it.
func Build(rand io.Reader, ek, srk, key []byte) (*Blob, error) {
	if len(key) == 0 || len(key) > 64 {
		return nil, fmt.Errorf("activation: identity key must be 1 to 64 bytes, not %d", len(key))
	}
	ekPub, err := ParsePublic(ek)
	if err != nil {
		return nil, fmt.Errorf("endorsement key: %w", err)
	}
	srkPub, err := ParsePublic(srk)
	if err != nil {
		return nil, fmt.Errorf("storage root key: %w", err)
	}
	ekKEM, err := tpm2.ImportEncapsulationKey(ekPub)
	if err != nil {
		return nil, fmt.Errorf("activation: endorsement key: %w", err)
	}
	srkKEM, err := tpm2.ImportEncapsulationKey(srkPub)
	if err != nil {
		return nil, fmt.Errorf("activation: storage root key: %w", err)
	}
	srkName, err := tpm2.ObjectName(srkPub)
	if err != nil {
		return nil, fmt.Errorf("activation: storage root key name: %w", err)
	}

	inner := make([]byte, innerKeyBytes)
	seedValue := make([]byte, sha256.Size)
	if _, err := io.ReadFull(rand, inner); err != nil {
		return nil, fmt.Errorf("activation: random: %w", err)
	}
	if _, err := io.ReadFull(rand, seedValue); err != nil {
		return nil, fmt.Errorf("activation: random: %w", err)
	}

	// The identity key: an HMAC-SHA256 keyed-hash object. fixedTPM and fixedParent must be
	// clear or the TPM refuses to import a duplicate of it. unique binds the key to the public
	// area: Load checks SHA-256(seedValue || key).
	unique := sha256.Sum256(append(bytes.Clone(seedValue), key...))
	idPub := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			UserWithAuth: true,
			NoDA:         true,
			SignEncrypt:  true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: IdentityKeyPolicy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{
				Scheme:  tpm2.TPMAlgHMAC,
				Details: tpm2.NewTPMUSchemeKeyedHash(tpm2.TPMAlgHMAC, &tpm2.TPMSSchemeHMAC{HashAlg: tpm2.TPMAlgSHA256}),
			},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: unique[:]}),
	}
	idPubBytes := tpm2.Marshal(idPub)
	idName, err := tpm2.ObjectName(&idPub)
	if err != nil {
		return nil, fmt.Errorf("activation: identity key name: %w", err)
	}
	sensitive := tpm2.Marshal(tpm2.TPM2BSensitive(tpm2.New2B(tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgKeyedHash,
		SeedValue:     tpm2.TPM2BDigest{Buffer: seedValue},
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BSensitiveData{Buffer: key}),
	})))

	// Inner wrapper (TPM 2.0 Part 1, "Inner Duplication Wrapper"): integrity over the
	// sensitive area and the object's Name, then AES-128-CFB with the inner key, IV zero.
	innerHash := sha256.New()
	innerHash.Write(sensitive)
	innerHash.Write(idName.Buffer)
	encSensitive := tpm2.Marshal(tpm2.TPM2BDigest{Buffer: innerHash.Sum(nil)})
	encSensitive = append(encSensitive, sensitive...)
	if err := cfbEncrypt(inner, encSensitive); err != nil {
		return nil, err
	}

	// Outer wrapper to the SRK ("Outer Duplication Wrapper"): a seed encapsulated to the SRK,
	// symmetric key and HMAC key derived from it with the SRK's Name algorithm.
	dupSeed, inSymSeed, err := srkKEM.Encapsulate(rand, "DUPLICATE")
	if err != nil {
		return nil, fmt.Errorf("activation: encrypting the import seed to the storage root key: %w", err)
	}
	dupSensitive, outerHMAC, err := protect(srkKEM, dupSeed, idName.Buffer, encSensitive)
	if err != nil {
		return nil, err
	}
	duplicate := tpm2.Marshal(tpm2.TPM2BDigest{Buffer: outerHMAC})
	duplicate = append(duplicate, dupSensitive...)

	// The credential: the inner key, made to the EK and bound to Name(SRK), because the device
	// activates it with the SRK as the activated object.
	idObject, secret, err := tpm2.CreateCredential(rand, ekKEM, srkName.Buffer, inner)
	if err != nil {
		return nil, fmt.Errorf("activation: making the credential to the endorsement key: %w", err)
	}

	encURI := bytes.Clone(trailer)
	if err := cfbEncrypt(inner, encURI); err != nil {
		return nil, err
	}
	return &Blob{
		CredentialBlob: idObject,
		Secret:         secret,
		Duplicate:      duplicate,
		InSymSeed:      inSymSeed,
		IDKeyPublic:    idPubBytes,
		EncURIData:     encURI,
	}, nil
}

// protect applies an outer wrapper with the parent's Name algorithm and symmetric definition:
// encrypt with KDFa(seed, "STORAGE", name) and MAC with KDFa(seed, "INTEGRITY").
func protect(parent tpm2.LabeledEncapsulationKey, seed, name, plain []byte) (enc, mac []byte, err error) {
	h, err := parent.NameAlg().Hash()
	if err != nil {
		return nil, nil, fmt.Errorf("activation: parent name algorithm: %w", err)
	}
	sym := parent.SymmetricParameters()
	if sym == nil || sym.Algorithm != tpm2.TPMAlgAES {
		return nil, nil, errors.New("activation: the storage root key's symmetric algorithm is not AES")
	}
	bits, err := sym.KeyBits.AES()
	if err != nil {
		return nil, nil, fmt.Errorf("activation: the storage root key's AES key size: %w", err)
	}
	mode, err := sym.Mode.AES()
	if err != nil || *mode != tpm2.TPMAlgCFB {
		return nil, nil, errors.New("activation: the storage root key's symmetric mode is not CFB")
	}
	enc = bytes.Clone(plain)
	if err := cfbEncrypt(tpm2.KDFa(h, seed, "STORAGE", name, nil, int(*bits)), enc); err != nil {
		return nil, nil, err
	}
	m := hmac.New(h.New, tpm2.KDFa(h, seed, "INTEGRITY", nil, nil, h.Size()*8))
	m.Write(enc)
	m.Write(name)
	return enc, m.Sum(nil), nil
}

// cfbEncrypt encrypts b in place with AES-CFB under key and a zero IV, as TPM wrappers do.
func cfbEncrypt(key, b []byte) error {
	c, err := aes.NewCipher(key)
	if err != nil {
		return fmt.Errorf("activation: %w", err)
	}
	//lint:ignore SA1019 TPM 2.0 wrappers are defined as AES-CFB with a zero IV.
	cipher.NewCFBEncrypter(c, make([]byte, aes.BlockSize)).XORKeyStream(b, b) //nolint:staticcheck
	return nil
}

func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}
