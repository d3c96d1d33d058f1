package firmware

import (
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// The signing side of firmware updates (hubby firmware keygen, sign, verify): key files in the
// forms the agent reads, manifests made from an image, and the agent's decision on a manifest.

// ErrKeyFile is wrapped by every key file error.
var ErrKeyFile = errors.New("firmware: key file")

// MarshalPrivateKey is the PEM "PRIVATE KEY" (PKCS #8) form of a signing key.
func MarshalPrivateKey(k ed25519.PrivateKey) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		panic(err) // an ed25519.PrivateKey always marshals
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// MarshalPublicKey is the PEM "PUBLIC KEY" (PKIX) form, as the agent's firmware.publicKeyFile
// reads it.
func MarshalPublicKey(k ed25519.PublicKey) []byte {
	der, err := x509.MarshalPKIXPublicKey(k)
	if err != nil {
		panic(err) // an ed25519.PublicKey always marshals
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

// EncodePublicKey is the base64 form, as the agent's firmware.publicKey takes it.
func EncodePublicKey(k ed25519.PublicKey) string { return base64.StdEncoding.EncodeToString(k) }

// ParsePublicKey reads an Ed25519 public key in either form the agent accepts: PEM
// "PUBLIC KEY", or base64 of the 32 bytes (surrounding space ignored).
func ParsePublicKey(b []byte) (ed25519.PublicKey, error) {
	if blk, _ := pem.Decode(b); blk != nil {
		if blk.Type != "PUBLIC KEY" {
			return nil, fmt.Errorf("%w: PEM block %q, want PUBLIC KEY", ErrKeyFile, blk.Type)
		}
		k, err := x509.ParsePKIXPublicKey(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrKeyFile, err)
		}
		pub, ok := k.(ed25519.PublicKey)
		if !ok {
			return nil, fmt.Errorf("%w: not an Ed25519 public key", ErrKeyFile)
		}
		return pub, nil
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(raw) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("%w: public key must be PEM (PUBLIC KEY) or base64 of 32 bytes", ErrKeyFile)
	}
	return ed25519.PublicKey(raw), nil
}

// ParsePrivateKey reads a PEM "PRIVATE KEY" (PKCS #8) Ed25519 key.
func ParsePrivateKey(b []byte) (ed25519.PrivateKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%w: not a PEM PRIVATE KEY", ErrKeyFile)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyFile, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%w: not an Ed25519 private key", ErrKeyFile)
	}
	return priv, nil
}

// ReadPrivateKeyFile reads a signing key, refusing a file that others than its owner can read
// or write (mode bits 077), as ssh does: a key others could read may already be someone else's.
func ReadPrivateKeyFile(path string) (ed25519.PrivateKey, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyFile, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyFile, err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s is mode %04o, readable or writable by others; chmod 600 it", ErrKeyFile, path, perm)
	}
	b, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKeyFile, err)
	}
	k, err := ParsePrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// ManifestFor describes the image r holds (its size and SHA-256), unsigned. The image is read
// once, at most MaxImageSize bytes.
func ManifestFor(r io.Reader, version, url string) (Manifest, error) {
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(r, MaxImageSize+1))
	if err != nil {
		return Manifest{}, fmt.Errorf("firmware: read image: %w", err)
	}
	if n == 0 || n > MaxImageSize {
		return Manifest{}, fmt.Errorf("%w: image size %d out of range (1 to %d)", ErrManifest, n, int64(MaxImageSize))
	}
	return Manifest{Version: version, URL: url, Size: n, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// Policy is what an agent is configured to accept (its firmware section).
type Policy struct {
	// PublicKey, when set, must have signed the manifest; nil accepts only unsigned manifests.
	PublicKey      ed25519.PublicKey
	AllowDowngrade bool
	AllowHTTP      bool
}

// Check is the agent's decision on a manifest before anything is downloaded: well formed, signed
// by the configured key, and (given the running version) not a downgrade. It is what
// Updater.Start checks, in the same order and with the same errors, for tools that want the
// answer without a device. running "" skips the downgrade check.
func (p Policy) Check(m Manifest, running string) error {
	if err := m.Validate(p.AllowHTTP); err != nil {
		return err
	}
	if err := m.VerifySignature(p.PublicKey); err != nil {
		return err
	}
	if running != "" && !p.AllowDowngrade && CompareVersions(m.Version, running) < 0 {
		return fmt.Errorf("%w: %s is older than the running %s", ErrDowngrade, m.Version, running)
	}
	return nil
}
