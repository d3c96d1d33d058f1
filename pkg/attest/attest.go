// Package attest holds a device's credential: what signs its SAS tokens (a symmetric key) or
// what it presents in the TLS handshake (an X.509 certificate and key). Keys are loaded from
// strings or files; a key file readable by group or others is refused unless explicitly allowed,
// as ssh does. A Credential never prints its secret.
//
// DPS attestation uses the same credentials: an individual key, a key derived from an enrollment
// group key and the registration ID (FromGroupKey), or an X.509 chain whose leaf CN is the
// registration ID, or a key held in a TPM (FromTPM), which signs inside the TPM and never leaves it.
package attest

import (
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"

	"github.com/iothubby/iothubby/pkg/sas"
)

// Kind is the kind of credential.
type Kind uint8

// Credential kinds.
const (
	SymmetricKey Kind = iota + 1
	X509
	// TPM is an HMAC key inside a TPM: it signs SAS tokens like a symmetric key, but the key
	// never leaves the TPM.
	TPM
)

func (k Kind) String() string {
	switch k {
	case SymmetricKey:
		return "symmetric-key"
	case X509:
		return "x509"
	case TPM:
		return "tpm"
	}
	return "unknown"
}

// ErrInsecureKeyFile is returned for a key file whose mode lets group or others read it.
var ErrInsecureKeyFile = errors.New("attest: key file is readable by group or others")

// FileOptions control how key files are read.
type FileOptions struct {
	// AllowInsecureKeyFile accepts key files readable by group or others. Leave it false
	// outside development: a readable key can be copied by any local user.
	AllowInsecureKeyFile bool
}

// Credential is a device's identity secret. Use Signer or Certificate according to Kind.
type Credential struct {
	kind   Kind
	key    sas.Key
	cert   *tls.Certificate
	signer sas.Signer
}

// Kind returns the credential's kind.
func (c *Credential) Kind() Kind { return c.kind }

// Signer returns the SAS signer of a symmetric-key or TPM credential, nil for X.509.
func (c *Credential) Signer() sas.Signer {
	switch c.kind {
	case SymmetricKey:
		return c.key
	case TPM:
		return c.signer
	}
	return nil
}

// Certificate returns the TLS client certificate of an X.509 credential, nil otherwise.
func (c *Credential) Certificate() *tls.Certificate { return c.cert }

// String describes the credential without its secret.
func (c *Credential) String() string { return "attest.Credential(" + c.kind.String() + ")" }

// GoString describes the credential without its secret.
func (c *Credential) GoString() string { return c.String() }

// FromKey wraps a decoded symmetric key.
func FromKey(k sas.Key) (*Credential, error) {
	if len(k) == 0 {
		return nil, errors.New("attest: empty symmetric key")
	}
	return &Credential{kind: SymmetricKey, key: k}, nil
}

// FromTPM wraps a signer that computes HMAC-SHA256 inside a TPM (pkg/tpm.Device).
func FromTPM(s sas.Signer) (*Credential, error) {
	if s == nil {
		return nil, errors.New("attest: nil TPM signer")
	}
	return &Credential{kind: TPM, signer: s}, nil
}

// FromBase64Key decodes a symmetric key as Azure shows it (base64).
func FromBase64Key(b64 string) (*Credential, error) {
	k, err := sas.ParseKey(strings.TrimSpace(b64))
	if err != nil {
		return nil, fmt.Errorf("attest: symmetric key: %w", err)
	}
	return FromKey(k)
}

// FromKeyFile reads a base64 symmetric key from a file (surrounding white space is ignored).
func FromKeyFile(path string, opts FileOptions) (*Credential, error) {
	b, err := ReadSecretFile(path, opts)
	if err != nil {
		return nil, err
	}
	k, err := sas.ParseKey(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("attest: symmetric key file %s: %w", path, err)
	}
	return FromKey(k)
}

// FromX509Files loads a PEM certificate chain (leaf first) and its PEM private key.
func FromX509Files(certFile, keyFile string, opts FileOptions) (*Credential, error) {
	if certFile == "" || keyFile == "" {
		return nil, errors.New("attest: X.509 needs both a certificate file and a key file")
	}
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("attest: certificate: %w", err)
	}
	keyPEM, err := ReadSecretFile(keyFile, opts)
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		// tls's errors name the problem without echoing key material.
		return nil, fmt.Errorf("attest: X.509 key pair %s / %s: %w", certFile, keyFile, err)
	}
	return &Credential{kind: X509, cert: &cert}, nil
}

// ReadSecretFile reads a file holding a secret (key, connection string), refusing one that
// group or others can read unless opts allow it.
func ReadSecretFile(path string, opts FileOptions) ([]byte, error) {
	if err := CheckKeyFileMode(path, opts); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	return b, nil
}

// CheckKeyFileMode refuses a file whose permission bits let group or others read or write it
// (mode & 0o077 != 0), unless opts.AllowInsecureKeyFile. It is a no-op on Windows.
func CheckKeyFileMode(path string, opts FileOptions) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("attest: %w", err)
	}
	if fi.IsDir() {
		return fmt.Errorf("attest: %s is a directory", path)
	}
	if runtime.GOOS == "windows" || opts.AllowInsecureKeyFile {
		return nil
	}
	if mode := fi.Mode().Perm(); mode&0o077 != 0 {
		return fmt.Errorf("%w: %s has mode %04o; run chmod 600 on it (or allow insecure key files explicitly)",
			ErrInsecureKeyFile, path, mode)
	}
	return nil
}

// FromGroupKey derives a device's credential from a DPS enrollment-group key (base64) and its
// registration ID: base64(HMAC-SHA256(groupKey, registrationID)). The group key itself is not
// kept.
func FromGroupKey(groupB64, registrationID string) (*Credential, error) {
	if registrationID == "" {
		return nil, errors.New("attest: a group key needs a registration ID to derive the device key")
	}
	k, err := sas.ParseKey(strings.TrimSpace(groupB64))
	if err != nil {
		return nil, fmt.Errorf("attest: group key: %w", err)
	}
	return FromKey(sas.DeriveDeviceKey(k, registrationID))
}

// FromGroupKeyFile is FromGroupKey with the group key read from a file (mode 0600).
func FromGroupKeyFile(path, registrationID string, opts FileOptions) (*Credential, error) {
	b, err := ReadSecretFile(path, opts)
	if err != nil {
		return nil, err
	}
	c, err := FromGroupKey(string(b), registrationID)
	if err != nil {
		return nil, fmt.Errorf("%w (file %s)", err, path)
	}
	return c, nil
}

// CommonName returns the subject CN of an X.509 credential's leaf certificate ("" otherwise):
// DPS requires it to equal the registration ID.
func (c *Credential) CommonName() string {
	if c.cert == nil || c.cert.Leaf == nil {
		return ""
	}
	return c.cert.Leaf.Subject.CommonName
}
