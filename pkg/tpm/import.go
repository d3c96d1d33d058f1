package tpm

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/tpm/activation"
)

// ImportActivation imports the HMAC identity key that a DPS activation blob (the decoded
// authenticationKey) carries, replacing the key at 0x81000100, as in protocol-device.md §4.4:
// ActivateCredential (SRK activated, EK authorized by PolicySecret(TPM_RH_ENDORSEMENT))
// recovers the inner wrapper key, Import under the SRK unwraps the identity key, Load and
// EvictControl persist it. The key never leaves the TPM.
//
// Errors: a malformed blob wraps activation.ErrMalformed; a blob made for another TPM's
// endorsement key wraps ErrActivateCredential; one whose key was wrapped to another storage
// root key wraps ErrImport.
func (d *Device) ImportActivation(ctx context.Context, blob []byte) error {
	b, err := activation.Parse(blob)
	if err != nil {
		return fmt.Errorf("tpm: %w", err)
	}
	if err := d.acquire(ctx); err != nil {
		return err
	}
	defer d.release()
	tpm := d.with(ctx)

	inner, err := d.activateCredential(tpm, b)
	if err != nil {
		return err
	}
	defer clear(inner)

	d.log.Debug("tpm: Import under the storage root key")
	imp, err := tpm2.Import{
		ParentHandle:  d.srkAuth(),
		EncryptionKey: tpm2.TPM2BData{Buffer: inner},
		ObjectPublic:  tpm2.BytesAs2B[tpm2.TPMTPublic](b.IDKeyPublic),
		Duplicate:     tpm2.TPM2BPrivate{Buffer: b.Duplicate},
		InSymSeed:     tpm2.TPM2BEncryptedSecret{Buffer: b.InSymSeed},
		Symmetric:     importSymmetric,
	}.Execute(tpm)
	if err != nil {
		return tpmRefusal(ErrImport, err)
	}
	name, err := d.persistIdentityKey(tpm, b.IDKeyPublic, imp.OutPrivate.Buffer)
	if err != nil {
		return err
	}
	d.idName = name
	d.hasKey.Store(true)
	d.log.Debug("tpm: identity key imported", zap.Stringer("handle", hexHandle(IdentityKeyHandle)))
	if d.state != nil {
		if err := d.state.saveIdentity(b.IDKeyPublic, imp.OutPrivate.Buffer); err != nil {
			return fmt.Errorf("tpm: the identity key is in the simulator but will not survive a restart: %w", err)
		}
	}
	return nil
}

// activateCredential runs PolicySecret(TPM_RH_ENDORSEMENT) in a fresh policy session and
// ActivateCredential, returning the inner wrapper key. The session is flushed on every path.
func (d *Device) activateCredential(tpm transport.TPM, b *activation.Blob) (inner []byte, err error) {
	d.log.Debug("tpm: policy session for the endorsement key")
	sess, closeSess, err := tpm2.PolicySession(tpm, tpm2.TPMAlgSHA256, 32)
	if err != nil {
		return nil, fmt.Errorf("tpm: starting a policy session: %w", err)
	}
	defer func() {
		if cerr := closeSess(); cerr != nil {
			d.log.Debug("tpm: flushing the policy session failed", zap.Error(cerr))
		}
	}()
	if _, err := (tpm2.PolicySecret{
		AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		PolicySession: sess.Handle(),
	}).Execute(tpm); err != nil {
		return nil, fmt.Errorf("tpm: PolicySecret(TPM_RH_ENDORSEMENT): %w", hint(err))
	}
	d.log.Debug("tpm: ActivateCredential")
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: d.srkAuth(),
		KeyHandle:      tpm2.AuthHandle{Handle: EKHandle, Name: d.ekName, Auth: sess},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: b.CredentialBlob},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: b.Secret},
	}.Execute(tpm)
	if err != nil {
		return nil, tpmRefusal(ErrActivateCredential, err)
	}
	return rsp.CertInfo.Buffer, nil
}

// persistIdentityKey loads an identity key (TPMT_PUBLIC and TPM2B_PRIVATE contents) under the
// SRK and makes it the key at IdentityKeyHandle, evicting the old one. It returns its Name.
func (d *Device) persistIdentityKey(tpm transport.TPM, pub, priv []byte) (tpm2.TPM2BName, error) {
	d.log.Debug("tpm: Load under the storage root key")
	ld, err := tpm2.Load{
		ParentHandle: d.srkAuth(),
		InPrivate:    tpm2.TPM2BPrivate{Buffer: priv},
		InPublic:     tpm2.BytesAs2B[tpm2.TPMTPublic](pub),
	}.Execute(tpm)
	if err != nil {
		return tpm2.TPM2BName{}, fmt.Errorf("tpm: loading the identity key: %w", err)
	}
	defer d.flush(tpm, ld.ObjectHandle, "loaded identity key")

	// Evict the old key. go-tpm needs its Name, hence ReadPublic; "not found" is fine.
	if old, err := (tpm2.ReadPublic{ObjectHandle: IdentityKeyHandle}).Execute(tpm); err == nil {
		d.log.Debug("tpm: evicting the old identity key")
		if _, err := (tpm2.EvictControl{
			Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			ObjectHandle:     tpm2.NamedHandle{Handle: IdentityKeyHandle, Name: old.Name},
			PersistentHandle: IdentityKeyHandle,
		}).Execute(tpm); err != nil && !errors.Is(err, tpm2.TPMRCHandle) {
			return tpm2.TPM2BName{}, fmt.Errorf("tpm: evicting the old identity key at 0x%x: %w", uint32(IdentityKeyHandle), hint(err))
		}
		d.hasKey.Store(false)
	} else if !errors.Is(err, tpm2.TPMRCHandle) {
		return tpm2.TPM2BName{}, fmt.Errorf("tpm: reading the old identity key at 0x%x: %w", uint32(IdentityKeyHandle), err)
	}

	if _, err := (tpm2.EvictControl{
		Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		ObjectHandle:     tpm2.NamedHandle{Handle: ld.ObjectHandle, Name: ld.Name},
		PersistentHandle: IdentityKeyHandle,
	}).Execute(tpm); err != nil {
		return tpm2.TPM2BName{}, fmt.Errorf("tpm: persisting the identity key at 0x%x: %w", uint32(IdentityKeyHandle), hint(err))
	}
	return ld.Name, nil
}

// srkAuth is the SRK with its (empty) password.
func (d *Device) srkAuth() tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: SRKHandle, Name: d.srkName, Auth: tpm2.PasswordAuth(nil)}
}

// tpmRefusal wraps a TPM response code that blames the blob (integrity, value, size, key or
// scheme errors) in sentinel. Authorization failures, missing handles, TPM warnings (out of
// memory, retry) and transport failures are not the blob's fault and are wrapped plainly.
func tpmRefusal(sentinel, err error) error {
	var rc tpm2.TPMRC
	if !errors.As(err, &rc) || rc.IsWarning() {
		return fmt.Errorf("tpm: %w", hint(err))
	}
	for _, notBlob := range []tpm2.TPMRC{tpm2.TPMRCBadAuth, tpm2.TPMRCAuthFail, tpm2.TPMRCPolicyFail, tpm2.TPMRCHandle, tpm2.TPMRCInitialize} {
		if errors.Is(err, notBlob) {
			return fmt.Errorf("tpm: %w", hint(err))
		}
	}
	return fmt.Errorf("%w: %w", sentinel, err)
}
