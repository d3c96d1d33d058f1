package tpm

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Sign returns HMAC-SHA256 of msg computed inside the TPM with the identity key at
// 0x81000100 (TPM2_HMAC; a message longer than the TPM's input buffer goes through
// TPM2_HMAC_Start, TPM2_SequenceUpdate and TPM2_SequenceComplete). It implements sas.Signer.
// Before an identity key was imported it fails with ErrNoIdentityKey.
func (d *Device) Sign(ctx context.Context, msg []byte) ([]byte, error) {
	if err := d.acquire(ctx); err != nil {
		return nil, err
	}
	defer d.release()
	if !d.hasKey.Load() {
		return nil, ErrNoIdentityKey
	}
	tpm := d.with(ctx)
	key := tpm2.AuthHandle{Handle: IdentityKeyHandle, Name: d.idName, Auth: tpm2.PasswordAuth(nil)}
	var (
		mac []byte
		err error
	)
	if len(msg) <= d.inputBuffer {
		var rsp *tpm2.HmacResponse
		rsp, err = tpm2.Hmac{Handle: key, Buffer: tpm2.TPM2BMaxBuffer{Buffer: msg}, HashAlg: tpm2.TPMAlgSHA256}.Execute(tpm)
		if err == nil {
			mac = rsp.OutHMAC.Buffer
		}
	} else {
		mac, err = d.hmacSequence(tpm, key, msg)
	}
	if err != nil {
		if errors.Is(err, tpm2.TPMRCHandle) {
			return nil, fmt.Errorf("%w (it was removed from the TPM behind this process's back): %w", ErrNoIdentityKey, err)
		}
		return nil, fmt.Errorf("tpm: HMAC with the identity key: %w", err)
	}
	return mac, nil
}

// hmacSequence computes the HMAC of a message longer than one input buffer.
func (d *Device) hmacSequence(tpm transport.TPM, key tpm2.AuthHandle, msg []byte) ([]byte, error) {
	start, err := tpm2.HmacStart{Handle: key, HashAlg: tpm2.TPMAlgSHA256}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	seq := tpm2.AuthHandle{Handle: start.SequenceHandle, Auth: tpm2.PasswordAuth(nil)}
	done := false
	defer func() {
		if !done { // SequenceComplete flushes the sequence; anything else leaves it loaded
			d.flush(tpm, start.SequenceHandle, "HMAC sequence")
		}
	}()
	for len(msg) > d.inputBuffer {
		if _, err := (tpm2.SequenceUpdate{SequenceHandle: seq, Buffer: tpm2.TPM2BMaxBuffer{Buffer: msg[:d.inputBuffer]}}).Execute(tpm); err != nil {
			return nil, err
		}
		msg = msg[d.inputBuffer:]
	}
	rsp, err := tpm2.SequenceComplete{SequenceHandle: seq, Buffer: tpm2.TPM2BMaxBuffer{Buffer: msg}, Hierarchy: tpm2.TPMRHNull}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	done = true
	return rsp.Result.Buffer, nil
}
