package tpm

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base32"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/tpm/activation"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Device satisfies what pkg/sas and pkg/dps need from it.
var _ sas.Signer = (*Device)(nil)

// ekPrefix starts the TPM2B_PUBLIC of the TCG RSA-2048 EK: size 0x013a, RSA, SHA-256,
// attributes 0x000300b2, a 32-byte authPolicy.
var ekPrefix = []byte{0x01, 0x3a, 0x00, 0x01, 0x00, 0x0b, 0x00, 0x03, 0x00, 0xb2, 0x00, 0x20}

// srkPrefix starts the SRK's: size 0x011a, RSA, SHA-256, attributes 0x00030472, no
// authPolicy, AES-128-CFB, NULL scheme, 2048 bits, exponent 0, a 256-byte modulus.
var srkPrefix = []byte{0x01, 0x1a, 0x00, 0x01, 0x00, 0x0b, 0x00, 0x03, 0x04, 0x72, 0x00, 0x00,
	0x00, 0x06, 0x00, 0x80, 0x00, 0x43, 0x00, 0x10, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00}

var regIDPattern = regexp.MustCompile(`^[a-z2-7]{52}$`)

// opener opens a Device on the TPM under test: the same TPM (and state) every call. At most
// one Device is open at a time (the simulator is one per process; swtpm serves one client).
type opener func(t *testing.T, ctx context.Context, log *zap.Logger) (*Device, error)

func mustOpen(t *testing.T, open opener) *Device {
	t.Helper()
	d, err := open(t, testContext(t), zap.NewNop())
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return d
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func hmacSHA256(key, msg []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(msg)
	return m.Sum(nil)
}

func testKey(label string) []byte {
	k := sha256.Sum256([]byte(label))
	return k[:]
}

// blobFor builds the marshalled activation blob that delivers key to ek/srk.
func blobFor(t testing.TB, ek, srk, key []byte) []byte {
	t.Helper()
	b, err := activation.Build(rand.Reader, ek, srk, key)
	if err != nil {
		t.Fatalf("activation.Build: %v", err)
	}
	return b.Marshal()
}

// softwareKey returns the TPM2B_PUBLIC of an RSA key made in software with tmpl's
// parameters: an endorsement or storage root key of some other TPM.
func softwareKey(t *testing.T, tmpl tpm2.TPMTPublic) []byte {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	return tpm2.Marshal(tpm2.New2B(tmpl))
}

func signEquals(t *testing.T, d *Device, key, msg []byte) {
	t.Helper()
	got, err := d.Sign(testContext(t), msg)
	if err != nil {
		t.Fatalf("Sign(%d bytes): %v", len(msg), err)
	}
	if want := hmacSHA256(key, msg); !bytes.Equal(got, want) {
		t.Fatalf("Sign(%d bytes) = %x, want HMAC-SHA256 %x", len(msg), got, want)
	}
}

// runDeviceSuite runs the behaviour every backend must have, on a fresh TPM (no identity
// key yet). The subtests share the TPM and run in order. It returns the EK and the identity
// key the TPM holds at the end.
func runDeviceSuite(t *testing.T, open opener) (ek, key []byte) {
	var srk []byte
	var regID string
	key1, key2 := testKey("identity key one"), testKey("identity key two")

	t.Run("keys", func(t *testing.T) {
		d := mustOpen(t, open)
		defer d.Close()
		ek, srk, regID = d.EndorsementKey(), d.StorageRootKey(), d.RegistrationID()
		if len(ek) != 316 || !bytes.HasPrefix(ek, ekPrefix) {
			t.Errorf("EK: %d bytes starting %x, want 316 starting %x", len(ek), ek[:min(len(ek), 12)], ekPrefix)
		}
		if len(srk) != 284 || !bytes.HasPrefix(srk, srkPrefix) {
			t.Errorf("SRK: %d bytes starting %x, want 284 starting %x", len(srk), srk[:min(len(srk), len(srkPrefix))], srkPrefix)
		}
		if _, err := activation.ParsePublic(ek); err != nil {
			t.Errorf("EK: %v", err)
		}
		if _, err := activation.ParsePublic(srk); err != nil {
			t.Errorf("SRK: %v", err)
		}
		sum := sha256.Sum256(ek)
		want := strings.ToLower(strings.TrimRight(base32.StdEncoding.EncodeToString(sum[:]), "="))
		if regID != want || !regIDPattern.MatchString(regID) {
			t.Errorf("registration ID %q, want %q (52 lower-case base32 characters)", regID, want)
		}
		if d.HasIdentityKey() {
			t.Error("a fresh TPM has an identity key")
		}
		if _, err := d.Sign(testContext(t), []byte("hello")); !errors.Is(err, ErrNoIdentityKey) {
			t.Errorf("Sign before import: %v, want ErrNoIdentityKey", err)
		}
		// The accessors hand out copies.
		d.EndorsementKey()[0] ^= 0xff
		if !bytes.Equal(d.EndorsementKey(), ek) {
			t.Error("EndorsementKey returned the Device's own slice")
		}
		if s := fmt.Sprintf("%v %#v %s", d, d, d); !strings.Contains(s, regID) || strings.Contains(s, "0x") {
			t.Errorf("String/GoString: %q", s)
		}
	})
	if t.Failed() {
		return ek, nil
	}

	t.Run("reopen keeps the keys", func(t *testing.T) {
		d := mustOpen(t, open)
		defer d.Close()
		if !bytes.Equal(d.EndorsementKey(), ek) || !bytes.Equal(d.StorageRootKey(), srk) || d.RegistrationID() != regID {
			t.Fatal("EK, SRK or registration ID changed across Close/Open")
		}
	})

	t.Run("import and sign", func(t *testing.T) {
		core, logs := observer.New(zapcore.DebugLevel)
		d, err := open(t, testContext(t), zap.New(core))
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if err := d.ImportActivation(testContext(t), blobFor(t, ek, srk, key1)); err != nil {
			t.Fatalf("ImportActivation: %v", err)
		}
		if !d.HasIdentityKey() {
			t.Fatal("no identity key after import")
		}
		signEquals(t, d, key1, []byte("hello"))
		signEquals(t, d, key1, nil)
		long := make([]byte, 3000)
		rand.Read(long)
		signEquals(t, d, key1, long) // HMAC_Start + SequenceUpdate + SequenceComplete
		for _, n := range []int{d.inputBuffer - 1, d.inputBuffer, d.inputBuffer + 1, 2 * d.inputBuffer, 2*d.inputBuffer + 1} {
			signEquals(t, d, key1, long[:n])
		}
		mac, _ := d.Sign(testContext(t), []byte("hello"))
		checkLogs(t, logs, key1, mac)
		noLoadedHandles(t, d)
	})

	t.Run("reopen keeps the identity key", func(t *testing.T) {
		d := mustOpen(t, open)
		defer d.Close()
		if !d.HasIdentityKey() {
			t.Fatal("no identity key after reopening")
		}
		signEquals(t, d, key1, []byte("hello"))
	})

	t.Run("a second blob replaces the key", func(t *testing.T) {
		d := mustOpen(t, open)
		defer d.Close()
		if err := d.ImportActivation(testContext(t), blobFor(t, ek, srk, key2)); err != nil {
			t.Fatalf("ImportActivation: %v", err)
		}
		signEquals(t, d, key2, []byte("hello"))
	})

	t.Run("refused blobs", func(t *testing.T) {
		d := mustOpen(t, open)
		defer d.Close()
		ctx := testContext(t)
		otherEK := softwareKey(t, tpm2.RSAEKTemplate)
		otherSRK := softwareKey(t, srkTemplate)

		err := d.ImportActivation(ctx, blobFor(t, otherEK, srk, key1))
		if !errors.Is(err, ErrActivateCredential) || errors.Is(err, ErrImport) {
			t.Errorf("blob for another EK: %v, want ErrActivateCredential", err)
		}
		// The credential is bound to Name(SRK): ActivateCredential, not Import, notices.
		err = d.ImportActivation(ctx, blobFor(t, ek, otherSRK, key1))
		if !errors.Is(err, ErrActivateCredential) {
			t.Errorf("blob for this EK and another SRK: %v, want ErrActivateCredential", err)
		}
		// A credential for this TPM carrying a key wrapped to another SRK gets to Import.
		right, err := activation.Parse(blobFor(t, ek, srk, key1))
		if err != nil {
			t.Fatal(err)
		}
		wrong, err := activation.Parse(blobFor(t, ek, otherSRK, key1))
		if err != nil {
			t.Fatal(err)
		}
		mixed := *right
		mixed.Duplicate, mixed.InSymSeed, mixed.IDKeyPublic = wrong.Duplicate, wrong.InSymSeed, wrong.IDKeyPublic
		err = d.ImportActivation(ctx, mixed.Marshal())
		if !errors.Is(err, ErrImport) || errors.Is(err, ErrActivateCredential) {
			t.Errorf("key wrapped to another SRK: %v, want ErrImport", err)
		}
		// An altered duplicate fails Import's integrity check.
		altered := *right
		altered.Duplicate = bytes.Clone(right.Duplicate)
		altered.Duplicate[len(altered.Duplicate)-1] ^= 1
		if err := d.ImportActivation(ctx, altered.Marshal()); !errors.Is(err, ErrImport) {
			t.Errorf("altered duplicate: %v, want ErrImport", err)
		}
		full := right.Marshal()
		for _, n := range []int{0, 1, 100, len(full) - 1} {
			if err := d.ImportActivation(ctx, full[:n]); !errors.Is(err, activation.ErrMalformed) {
				t.Errorf("blob truncated to %d bytes: %v, want activation.ErrMalformed", n, err)
			}
		}
		// None of that touched the key in place, or left a session or object loaded.
		signEquals(t, d, key2, []byte("hello"))
		noLoadedHandles(t, d)
	})

	t.Run("concurrent use", func(t *testing.T) {
		d := mustOpen(t, open)
		defer d.Close()
		ctx := testContext(t)
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for i := range 8 {
			wg.Go(func() {
				msg := bytes.Repeat([]byte{byte(i)}, 100*i+1)
				for range 3 {
					got, err := d.Sign(ctx, msg)
					if err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(got, hmacSHA256(key2, msg)) {
						errs <- fmt.Errorf("goroutine %d: wrong HMAC", i)
						return
					}
				}
			})
		}
		wg.Go(func() {
			if !bytes.Equal(d.EndorsementKey(), ek) || d.RegistrationID() != regID || !d.HasIdentityKey() {
				errs <- errors.New("accessors changed under load")
			}
		})
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})

	t.Run("context and close", func(t *testing.T) {
		d := mustOpen(t, open)
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		if _, err := d.Sign(ctx, []byte("hello")); !errors.Is(err, context.Canceled) {
			t.Errorf("Sign with a cancelled context: %v", err)
		}
		if err := d.ImportActivation(ctx, blobFor(t, ek, srk, key1)); !errors.Is(err, context.Canceled) {
			t.Errorf("ImportActivation with a cancelled context: %v", err)
		}
		signEquals(t, d, key2, []byte("still works"))
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if err := d.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if _, err := d.Sign(testContext(t), []byte("hello")); !errors.Is(err, ErrClosed) {
			t.Errorf("Sign after Close: %v, want ErrClosed", err)
		}
		if err := d.ImportActivation(testContext(t), blobFor(t, ek, srk, key1)); !errors.Is(err, ErrClosed) {
			t.Errorf("ImportActivation after Close: %v, want ErrClosed", err)
		}
	})
	return ek, key2
}

// noLoadedHandles fails if a transient object or a session is left in the TPM.
func noLoadedHandles(t *testing.T, d *Device) {
	t.Helper()
	if err := d.acquire(testContext(t)); err != nil {
		t.Fatal(err)
	}
	defer d.release()
	tpm := d.with(testContext(t))
	for _, first := range []tpm2.TPMHandle{0x80000000, 0x02000000, 0x03000000} { // transient, HMAC and policy sessions
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(first), PropertyCount: 64}.Execute(tpm)
		if err != nil {
			t.Fatal(err)
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range hs.Handle {
			if h>>24 == first>>24 {
				t.Errorf("handle 0x%08x left loaded", uint32(h))
			}
		}
	}
}

// checkLogs fails if a log line carries the key or a MAC in any common encoding.
func checkLogs(t *testing.T, logs *observer.ObservedLogs, secrets ...[]byte) {
	t.Helper()
	if logs.Len() == 0 {
		t.Error("no debug logs at all")
	}
	for _, e := range logs.All() {
		line := e.Message + fmt.Sprint(e.ContextMap())
		for _, s := range secrets {
			for _, enc := range []string{hex.EncodeToString(s), base64.StdEncoding.EncodeToString(s), base64.RawURLEncoding.EncodeToString(s), fmt.Sprint(s)} {
				if strings.Contains(line, enc) {
					t.Errorf("log line carries secret material: %q", line)
				}
			}
		}
	}
}
