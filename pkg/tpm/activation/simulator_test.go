//go:build cgo

package activation_test

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"testing"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/iothubby/iothubby/pkg/tpm/activation"
)

// TestReferenceTPM hands blobs from Build to Microsoft's reference TPM (the in-process
// simulator) and runs the device's steps: ActivateCredential, Import, Load, HMAC. The golden
// test proves the bytes are stable; this one proves a TPM accepts them.
func TestReferenceTPM(t *testing.T) {
	sim, err := simulator.GetWithFixedSeedInsecure(7)
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	tpm := transport.FromReadWriter(sim)

	primary := func(h tpm2.TPMHandle, tmpl tpm2.TPMTPublic) (tpm2.NamedHandle, []byte) {
		rsp, err := tpm2.CreatePrimary{PrimaryHandle: h, InPublic: tpm2.New2B(tmpl)}.Execute(tpm)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(tpm) })
		return tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, tpm2.Marshal(rsp.OutPublic)
	}
	ek, ekPub := primary(tpm2.TPMRHEndorsement, tpm2.RSAEKTemplate)
	srk, srkPub := primary(tpm2.TPMRHOwner, tpm2.RSASRKTemplate)
	if len(ekPub) != 316 || !bytes.HasPrefix(ekPub, []byte{0x01, 0x3a, 0x00, 0x01, 0x00, 0x0b, 0x00, 0x03, 0x00, 0xb2}) {
		t.Fatalf("EK TPM2B_PUBLIC is %d bytes: %x…", len(ekPub), ekPub[:10])
	}
	// Another SRK: an owner primary with a different unique value.
	otherTmpl := tpm2.RSASRKTemplate
	otherTmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: []byte("other")})
	other, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(otherTmpl)}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	otherSRKPub := tpm2.Marshal(other.OutPublic)
	// The simulator holds three objects at once: keep only the EK and the SRK loaded.
	if _, err := (tpm2.FlushContext{FlushHandle: other.ObjectHandle}).Execute(tpm); err != nil {
		t.Fatal(err)
	}

	activate := func(blob *activation.Blob) ([]byte, error) {
		sess, cleanup, err := tpm2.PolicySession(tpm, tpm2.TPMAlgSHA256, 16)
		if err != nil {
			t.Fatal(err)
		}
		defer cleanup()
		if _, err := (tpm2.PolicySecret{
			AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
			PolicySession: sess.Handle(),
		}).Execute(tpm); err != nil {
			t.Fatal(err)
		}
		rsp, err := tpm2.ActivateCredential{
			ActivateHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
			KeyHandle:      tpm2.AuthHandle{Handle: ek.Handle, Name: ek.Name, Auth: sess},
			CredentialBlob: tpm2.TPM2BIDObject{Buffer: blob.CredentialBlob},
			Secret:         tpm2.TPM2BEncryptedSecret{Buffer: blob.Secret},
		}.Execute(tpm)
		if err != nil {
			return nil, err
		}
		return rsp.CertInfo.Buffer, nil
	}
	importAndSign := func(blob *activation.Blob, inner, msg []byte) ([]byte, error) {
		imp, err := tpm2.Import{
			ParentHandle:  tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
			EncryptionKey: tpm2.TPM2BData{Buffer: inner},
			ObjectPublic:  tpm2.BytesAs2B[tpm2.TPMTPublic](blob.IDKeyPublic),
			Duplicate:     tpm2.TPM2BPrivate{Buffer: blob.Duplicate},
			InSymSeed:     tpm2.TPM2BEncryptedSecret{Buffer: blob.InSymSeed},
			Symmetric: tpm2.TPMTSymDef{
				Algorithm: tpm2.TPMAlgAES,
				KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(128)),
				Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
			},
		}.Execute(tpm)
		if err != nil {
			return nil, err
		}
		ld, err := tpm2.Load{
			ParentHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
			InPrivate:    imp.OutPrivate,
			InPublic:     tpm2.BytesAs2B[tpm2.TPMTPublic](blob.IDKeyPublic),
		}.Execute(tpm)
		if err != nil {
			return nil, err
		}
		defer tpm2.FlushContext{FlushHandle: ld.ObjectHandle}.Execute(tpm)
		mac, err := tpm2.Hmac{
			Handle:  tpm2.AuthHandle{Handle: ld.ObjectHandle, Name: ld.Name, Auth: tpm2.PasswordAuth(nil)},
			Buffer:  tpm2.TPM2BMaxBuffer{Buffer: msg},
			HashAlg: tpm2.TPMAlgSHA256,
		}.Execute(tpm)
		if err != nil {
			return nil, err
		}
		return mac.OutHMAC.Buffer, nil
	}

	key := make([]byte, 32)
	rand.Read(key)
	built, err := activation.Build(rand.Reader, ekPub, srkPub, key)
	if err != nil {
		t.Fatal(err)
	}
	blob, err := activation.Parse(built.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	inner, err := activate(blob)
	if err != nil {
		t.Fatalf("ActivateCredential: %v", err)
	}
	msg := []byte("scope/registrations/device\n1900000000")
	got, err := importAndSign(blob, inner, msg)
	if err != nil {
		t.Fatalf("Import/Load/HMAC: %v", err)
	}
	m := hmac.New(sha256.New, key)
	m.Write(msg)
	if !hmac.Equal(got, m.Sum(nil)) {
		t.Fatal("the TPM's HMAC differs from HMAC-SHA256 with the delivered key")
	}

	// Tampering with the credential breaks ActivateCredential's integrity check.
	tampered := *blob
	tampered.CredentialBlob = bytes.Clone(blob.CredentialBlob)
	tampered.CredentialBlob[len(tampered.CredentialBlob)-1] ^= 1
	if _, err := activate(&tampered); err == nil {
		t.Fatal("a tampered credential activated")
	}
	// A blob made for another SRK binds its credential to that SRK's Name, so the TPM's
	// ActivateCredential (with its own SRK as the activated object) refuses it.
	forOther, err := activation.Build(rand.Reader, ekPub, otherSRKPub, key)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := activate(forOther); err == nil {
		t.Fatal("a credential bound to another SRK's Name activated")
	}
	// A duplicate wrapped to another SRK, delivered with a credential for this one, gets past
	// ActivateCredential and fails at Import.
	mixed := *blob
	mixed.Duplicate, mixed.InSymSeed, mixed.IDKeyPublic = forOther.Duplicate, forOther.InSymSeed, forOther.IDKeyPublic
	if in, err := activate(&mixed); err != nil {
		t.Fatalf("mixed blob: ActivateCredential: %v", err)
	} else if _, err := importAndSign(&mixed, in, msg); err == nil {
		t.Fatal("a duplicate wrapped to another SRK imported")
	}
	// A tampered duplicate fails Import.
	tampered = *blob
	tampered.Duplicate = bytes.Clone(blob.Duplicate)
	tampered.Duplicate[len(tampered.Duplicate)-1] ^= 1
	if _, err := importAndSign(&tampered, inner, msg); err == nil {
		t.Fatal("a tampered duplicate imported")
	}
}
