package tpm

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/iothubby/iothubby/internal/atomicfile"
)

// The simulator's state directory holds two files, both mode 0600:
//
//	seed          the int64 the simulator's hierarchy seeds derive from, in decimal
//	identity-key  the imported identity key as the TPM returned it: TPM2B_PUBLIC followed by
//	              TPM2B_PRIVATE, the private part wrapped by the SRK (no secret in clear)
const (
	seedFile        = "seed"
	identityKeyFile = "identity-key"
)

// stateDir is the simulator's state directory.
type stateDir struct{ dir string }

func openStateDir(dir string) (*stateDir, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("tpm: simulator state directory: %w", err)
	}
	return &stateDir{dir: dir}, nil
}

// seed reads the seed, or makes a random one and saves it on first use.
func (s *stateDir) seed() (seed int64, created bool, err error) {
	path := filepath.Join(s.dir, seedFile)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		seed, err := parseSeed(b)
		if err != nil {
			return 0, false, fmt.Errorf("tpm: simulator seed file %s: %w", path, err)
		}
		return seed, false, nil
	case errors.Is(err, fs.ErrNotExist):
		var r [8]byte
		if _, err := rand.Read(r[:]); err != nil {
			return 0, false, fmt.Errorf("tpm: simulator seed: %w", err)
		}
		seed = int64(binary.BigEndian.Uint64(r[:]))
		if err := atomicfile.WriteFile(path, []byte(strconv.FormatInt(seed, 10)+"\n"), 0o600); err != nil {
			return 0, false, fmt.Errorf("tpm: saving the simulator seed: %w", err)
		}
		return seed, true, nil
	default:
		return 0, false, fmt.Errorf("tpm: simulator seed file: %w", err)
	}
}

func parseSeed(b []byte) (int64, error) {
	seed, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, errors.New("not a decimal int64")
	}
	return seed, nil
}

// loadIdentity returns the saved identity key, or ok false if none was saved.
func (s *stateDir) loadIdentity() (pub, priv []byte, ok bool, err error) {
	path := filepath.Join(s.dir, identityKeyFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, false, nil
	}
	if err != nil {
		return nil, nil, false, fmt.Errorf("tpm: simulator identity key: %w", err)
	}
	pub, priv, err = parseIdentityFile(b)
	if err != nil {
		return nil, nil, false, fmt.Errorf("tpm: simulator identity key file %s: %w", path, err)
	}
	return pub, priv, true, nil
}

// saveIdentity replaces the saved identity key. pub and priv are the contents of the
// TPM2B_PUBLIC and TPM2B_PRIVATE, without their sizes.
func (s *stateDir) saveIdentity(pub, priv []byte) error {
	b, err := marshalIdentityFile(pub, priv)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(s.dir, identityKeyFile), b, 0o600); err != nil {
		return fmt.Errorf("tpm: saving the simulator identity key: %w", err)
	}
	return nil
}

func (s *stateDir) path(name string) string { return filepath.Join(s.dir, name) }

func marshalIdentityFile(pub, priv []byte) ([]byte, error) {
	if len(pub) == 0 || len(pub) > 0xffff || len(priv) == 0 || len(priv) > 0xffff {
		return nil, fmt.Errorf("tpm: identity key parts of %d and %d bytes do not fit TPM2B fields", len(pub), len(priv))
	}
	b := make([]byte, 0, 4+len(pub)+len(priv))
	b = binary.BigEndian.AppendUint16(b, uint16(len(pub)))
	b = append(b, pub...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(priv)))
	return append(b, priv...), nil
}

// parseIdentityFile splits TPM2B_PUBLIC ‖ TPM2B_PRIVATE. Both must be non-empty and nothing
// may follow; whether they make a key is for TPM2_Load to say.
func parseIdentityFile(b []byte) (pub, priv []byte, err error) {
	next := func(what string) ([]byte, error) {
		if len(b) < 2 {
			return nil, fmt.Errorf("truncated before the %s size", what)
		}
		n := int(binary.BigEndian.Uint16(b))
		b = b[2:]
		if n == 0 {
			return nil, fmt.Errorf("empty %s", what)
		}
		if n > len(b) {
			return nil, fmt.Errorf("%s of %d bytes but %d left", what, n, len(b))
		}
		f := b[:n:n]
		b = b[n:]
		return f, nil
	}
	if pub, err = next("TPM2B_PUBLIC"); err != nil {
		return nil, nil, err
	}
	if priv, err = next("TPM2B_PRIVATE"); err != nil {
		return nil, nil, err
	}
	if len(b) != 0 {
		return nil, nil, fmt.Errorf("%d bytes after the TPM2B_PRIVATE", len(b))
	}
	return pub, priv, nil
}
