package dps_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"go.uber.org/zap/zaptest"

	"github.com/iothubby/iothubby/pkg/dps"
	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/tpm"
	"github.com/iothubby/iothubby/pkg/tpm/activation"
)

// openSimTPM opens the in-process reference TPM (one per process: tests using it run one
// after the other).
func openSimTPM(t *testing.T) *tpm.Device {
	t.Helper()
	dev, err := tpm.Open(ctxT(t), tpm.Config{Backend: tpm.BackendSimulator, StateDir: t.TempDir()}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dev.Close() })
	return dev
}

func enrollTPM(t *testing.T, srv *hubsim.Server, regID string, ek []byte) {
	t.Helper()
	if _, err := srv.DPS().PutEnrollment(hubapi.Enrollment{RegistrationID: regID,
		Attestation: &hubapi.AttestationMechanism{Type: "tpm", TPM: &hubapi.TPMAttestation{EndorsementKey: base64.StdEncoding.EncodeToString(ek)}}}, false, ""); err != nil {
		t.Fatal(err)
	}
}

// recordingTPM passes everything to a real TPM, counting imports and optionally altering the
// blobs on their way in.
type recordingTPM struct {
	dps.TPM
	imports atomic.Int32
	alter   func(n int32, blob []byte) []byte
}

func (r *recordingTPM) ImportActivation(ctx context.Context, blob []byte) error {
	n := r.imports.Add(1)
	if r.alter != nil {
		blob = r.alter(n, bytes.Clone(blob))
	}
	return r.TPM.ImportActivation(ctx, blob)
}

// reencode parses a blob, lets change alter its fields, and encodes it again. A blob that does
// not parse is returned as it is (the import then refuses it, and the case's assertion fails).
func reencode(b []byte, change func(*activation.Blob)) []byte {
	p, err := activation.Parse(b)
	if err != nil {
		return b
	}
	change(p)
	return p.Marshal()
}

// trailerLen is the length of a blob's trailing data field (0 if it does not parse).
func trailerLen(b []byte) int {
	p, err := activation.Parse(b)
	if err != nil {
		return 0
	}
	return len(p.EncURIData)
}

// The full TPM flow against hubsim over HTTPS with Microsoft's reference TPM: the 401
// challenge is imported, the second request and the polls are signed in the TPM, the final
// blob is imported, and the key the TPM then holds is the hub device's primary key.
func TestTPMRegisterWithSimulator(t *testing.T) {
	srv := start(t, nil)
	dev := openSimTPM(t)
	regID := dev.RegistrationID()
	enrollTPM(t, srv, regID, dev.EndorsementKey())
	rec := &recordingTPM{TPM: dev}
	cfg := clientCfg(srv, dps.HTTPS, regID, nil)
	cfg.TPM = rec
	res, err := dps.Register(ctxT(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.DeviceID != regID || rec.imports.Load() != 2 {
		t.Fatalf("result %+v after %d imports (want the device %s and 2 imports)", res, rec.imports.Load(), regID)
	}
	d, err := srv.Registry().Get(regID)
	if err != nil {
		t.Fatal(err)
	}
	hubKey, err := sas.ParseKey(d.Authentication.SymmetricKey.PrimaryKey)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("localhost/devices/" + regID + "\n1900000000")
	got, err := dev.Sign(ctxT(t), msg)
	if err != nil {
		t.Fatal(err)
	}
	m := hmac.New(sha256.New, hubKey)
	m.Write(msg)
	if !hmac.Equal(got, m.Sum(nil)) {
		t.Fatal("the TPM's key is not the hub device's primary key")
	}
}

// Blobs altered on the way in are refused by the TPM, and the registration fails with an
// error that says which step refused it; nothing is retried in a loop.
func TestTPMRegisterRefusesBadBlobs(t *testing.T) {
	srv := start(t, nil)
	dev := openSimTPM(t)
	regID := dev.RegistrationID()
	enrollTPM(t, srv, regID, dev.EndorsementKey())
	cases := []struct {
		name  string
		alter func(n int32, b []byte) []byte
		want  error
	}{
		{"tampered credential in the challenge", func(n int32, b []byte) []byte {
			if n == 1 {
				b[40] ^= 1
			}
			return b
		}, tpm.ErrActivateCredential},
		{"tampered duplicate in the final blob", func(n int32, b []byte) []byte {
			if n == 2 {
				return reencode(b, func(p *activation.Blob) { p.Duplicate[len(p.Duplicate)-1] ^= 1 })
			}
			return b
		}, tpm.ErrImport},
		{"truncated challenge", func(n int32, b []byte) []byte { return b[:len(b)/2] }, nil},
		{"challenge without its trailing field", func(n int32, b []byte) []byte {
			return b[:len(b)-2-trailerLen(b)]
		}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rec := &recordingTPM{TPM: dev, alter: c.alter}
			cfg := clientCfg(srv, dps.HTTPS, regID, nil)
			cfg.TPM = rec
			_, err := dps.Register(ctxT(t), cfg)
			if !errors.Is(err, dps.ErrRefused) {
				t.Fatalf("got %v, want a refusal", err)
			}
			if c.want != nil && !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			if c.want == nil && !strings.Contains(err.Error(), "malformed") {
				t.Fatalf("the error does not say the blob is malformed: %v", err)
			}
			t.Logf("%s: %v", c.name, err)
		})
	}
}

// An enrollment for another endorsement key: DPS answers the first request with a 401 that
// carries no challenge, and the registration is refused without touching the TPM.
func TestTPMRegisterOtherEK(t *testing.T) {
	srv := start(t, nil)
	dev := openSimTPM(t)
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	other := tpm2.RSAEKTemplate
	other.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	enrollTPM(t, srv, dev.RegistrationID(), tpm2.Marshal(tpm2.New2B(other)))
	rec := &recordingTPM{TPM: dev}
	cfg := clientCfg(srv, dps.HTTPS, dev.RegistrationID(), nil)
	cfg.TPM = rec
	_, err = dps.Register(ctxT(t), cfg)
	if !errors.Is(err, dps.ErrRefused) || !strings.Contains(err.Error(), "401") || rec.imports.Load() != 0 {
		t.Fatalf("got %v after %d imports; want a 401 refusal and no import", err, rec.imports.Load())
	}
}
