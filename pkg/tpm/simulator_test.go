//go:build cgo

package tpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"go.uber.org/zap"
)

// The in-process simulator is one per process: these tests never run in parallel.

func simulatorOpener(dir string) opener {
	return func(t *testing.T, ctx context.Context, log *zap.Logger) (*Device, error) {
		return Open(ctx, Config{Backend: BackendSimulator, StateDir: dir}, log)
	}
}

func TestSimulator(t *testing.T) {
	dir := t.TempDir()
	runDeviceSuite(t, simulatorOpener(dir))

	for name, want := range map[string]os.FileMode{seedFile: 0o600, identityKeyFile: 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s has mode %v, want %v", name, fi.Mode().Perm(), want)
		}
	}
}

func TestSimulatorOnePerProcess(t *testing.T) {
	d := mustOpen(t, simulatorOpener(t.TempDir()))
	_, err := Open(testContext(t), Config{Backend: BackendSimulator, StateDir: t.TempDir()}, nil)
	if !errors.Is(err, ErrSimulatorBusy) || !strings.Contains(err.Error(), "already open in this process") {
		t.Errorf("second Open: %v, want ErrSimulatorBusy", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d = mustOpen(t, simulatorOpener(t.TempDir()))
	d.Close()
}

func TestSimulatorSeed(t *testing.T) {
	dirA, dirB := t.TempDir(), t.TempDir()
	ek := func(dir string) []byte {
		d := mustOpen(t, simulatorOpener(dir))
		defer d.Close()
		return d.EndorsementKey()
	}
	a1, b, a2 := ek(dirA), ek(dirB), ek(dirA)
	if !bytes.Equal(a1, a2) {
		t.Error("same state directory, different EK")
	}
	if bytes.Equal(a1, b) {
		t.Error("two state directories (two random seeds), same EK")
	}
	// A seed written by hand is used as is.
	dirC := t.TempDir()
	if err := os.WriteFile(filepath.Join(dirC, seedFile), []byte("42\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c1 := ek(dirC)
	if err := os.WriteFile(filepath.Join(dirC, seedFile), []byte("43"), 0o600); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(c1, ek(dirC)) {
		t.Error("seeds 42 and 43 gave the same EK")
	}
}

func TestSimulatorBadState(t *testing.T) {
	ctx := testContext(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, seedFile), []byte("not a number"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, Config{Backend: BackendSimulator, StateDir: dir}, nil); err == nil || !strings.Contains(err.Error(), "seed") {
		t.Errorf("Open with a bad seed file: %v", err)
	}

	// An identity key saved under another seed does not load: Open says which file to remove.
	dir = t.TempDir()
	d := mustOpen(t, simulatorOpener(dir))
	if err := d.ImportActivation(ctx, blobFor(t, d.EndorsementKey(), d.StorageRootKey(), testKey("k"))); err != nil {
		t.Fatal(err)
	}
	d.Close()
	if err := os.WriteFile(filepath.Join(dir, seedFile), []byte("7"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Open(ctx, Config{Backend: BackendSimulator, StateDir: dir}, nil)
	if err == nil || !strings.Contains(err.Error(), filepath.Join(dir, identityKeyFile)) {
		t.Errorf("Open with an identity key from another seed: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, identityKeyFile), []byte{0, 1}, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, Config{Backend: BackendSimulator, StateDir: dir}, nil); err == nil || !strings.Contains(err.Error(), identityKeyFile) {
		t.Errorf("Open with a truncated identity key file: %v", err)
	}
	// Failed Opens released the simulator.
	if err := os.Remove(filepath.Join(dir, identityKeyFile)); err != nil {
		t.Fatal(err)
	}
	d = mustOpen(t, simulatorOpener(dir))
	if d.HasIdentityKey() {
		t.Error("identity key without an identity key file")
	}
	d.Close()
}

func BenchmarkSign(b *testing.B) {
	ctx := context.Background()
	d, err := Open(ctx, Config{Backend: BackendSimulator, StateDir: b.TempDir()}, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	if err := d.ImportActivation(ctx, blobFor(b, d.EndorsementKey(), d.StorageRootKey(), testKey("bench"))); err != nil {
		b.Fatal(err)
	}
	for _, size := range []int{64, 3000} {
		msg := bytes.Repeat([]byte("x"), size)
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			b.SetBytes(int64(size))
			for b.Loop() {
				if _, err := d.Sign(ctx, msg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// faultTPM answers TPM_RC_FAILURE to the first command with code failCC, without passing it
// on.
type faultTPM struct {
	transport.TPMCloser
	failCC tpm2.TPMCC
	failed bool
}

func (f *faultTPM) Send(cmd []byte) ([]byte, error) {
	if !f.failed && len(cmd) >= 10 && tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:10])) == f.failCC {
		f.failed = true
		return []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x01}, nil
	}
	return f.TPMCloser.Send(cmd)
}

// OpenTransport takes any transport; a failure in the middle of a command sequence leaves
// nothing loaded (the flushes on error paths).
func TestOpenTransportFaults(t *testing.T) {
	ctx := testContext(t)
	for _, cc := range []tpm2.TPMCC{tpm2.TPMCCSequenceUpdate, tpm2.TPMCCSequenceComplete, tpm2.TPMCCImport, tpm2.TPMCCActivateCredential, tpm2.TPMCCEvictControl} {
		t.Run(fmt.Sprintf("0x%x", uint32(cc)), func(t *testing.T) {
			sim, err := simulator.GetWithFixedSeedInsecure(1)
			if err != nil {
				t.Fatal(err)
			}
			ft := &faultTPM{TPMCloser: transport.FromReadWriteCloser(sim)}
			d, err := OpenTransport(ctx, ft, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if len(d.EndorsementKey()) != 316 {
				t.Fatalf("EK of %d bytes", len(d.EndorsementKey()))
			}
			ft.failCC = cc
			key := testKey("fault")
			err = d.ImportActivation(ctx, blobFor(t, d.EndorsementKey(), d.StorageRootKey(), key))
			if cc == tpm2.TPMCCActivateCredential || cc == tpm2.TPMCCImport || cc == tpm2.TPMCCEvictControl {
				if err == nil {
					t.Fatal("ImportActivation succeeded through a failing command")
				}
				noLoadedHandles(t, d)
				if err := d.ImportActivation(ctx, blobFor(t, d.EndorsementKey(), d.StorageRootKey(), key)); err != nil {
					t.Fatal(err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			long := bytes.Repeat([]byte("y"), 2500)
			_, err = d.Sign(ctx, long)
			if cc == tpm2.TPMCCSequenceUpdate || cc == tpm2.TPMCCSequenceComplete {
				if err == nil {
					t.Fatal("Sign succeeded through a failing command")
				}
				noLoadedHandles(t, d)
			}
			signEquals(t, d, key, long)
		})
	}
}
