// Package firmware is the agent's firmware update: a signed manifest, a resumable bounded
// download into an A/B slot, verification before anything is applied, an apply step (a
// configured command, or a simulation with durations and injected failures), a reboot and a
// confirmation, with every stage persisted so that an agent restart resumes or rolls back and
// never applies an image that was not verified. Progress and results go to a Reporter (the
// agent's reported `firmware` twin property); a result that could not be reported is re-sent.
package firmware

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

// MaxImageSize bounds the size a manifest may announce (4 GiB).
const MaxImageSize = 4 << 30

// ErrManifest is wrapped by every manifest validation error.
var ErrManifest = errors.New("firmware: invalid manifest")

// Manifest describes one firmware image. It arrives as the payload of a firmwareUpdate method
// or as the desired `firmware` twin property.
type Manifest struct {
	Version string `json:"version"`
	URL     string `json:"url"`
	Size    int64  `json:"size"`
	// SHA256 is the image's SHA-256, hex.
	SHA256 string `json:"sha256"`
	// Signature is base64 of an Ed25519 signature over SigningMessage().
	Signature string `json:"signature,omitempty"`
}

// ParseManifest decodes and validates a manifest. Unknown fields are ignored (a desired
// property may carry more), but the known ones must be well formed.
func ParseManifest(b []byte, allowHTTP bool) (Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("%w: %v", ErrManifest, err)
	}
	return m, m.Validate(allowHTTP)
}

// Validate checks the fields. Plain HTTP URLs are accepted only with allowHTTP (tests).
func (m Manifest) Validate(allowHTTP bool) error {
	if m.Version == "" || len(m.Version) > 64 || strings.ContainsAny(m.Version, "\n\r\t /\\") {
		return fmt.Errorf("%w: version must be 1 to 64 characters without spaces or slashes", ErrManifest)
	}
	u, err := url.Parse(m.URL)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%w: url is not an absolute URL", ErrManifest)
	}
	switch {
	case u.Scheme == "https":
	case u.Scheme == "http" && allowHTTP:
	default:
		return fmt.Errorf("%w: url scheme %q not allowed (https only)", ErrManifest, u.Scheme)
	}
	if m.Size <= 0 || m.Size > MaxImageSize {
		return fmt.Errorf("%w: size %d out of range (1 to %d)", ErrManifest, m.Size, int64(MaxImageSize))
	}
	if h, err := hex.DecodeString(m.SHA256); err != nil || len(h) != 32 {
		return fmt.Errorf("%w: sha256 must be 64 hex digits", ErrManifest)
	}
	if m.Signature != "" {
		if s, err := base64.StdEncoding.DecodeString(m.Signature); err != nil || len(s) != ed25519.SignatureSize {
			return fmt.Errorf("%w: signature must be base64 of %d bytes", ErrManifest, ed25519.SignatureSize)
		}
	}
	return nil
}

// SigningMessage is what the signature covers: the version, size and hash together, so a
// signed image cannot be relabelled as another version.
func (m Manifest) SigningMessage() []byte {
	return []byte("iothubby-firmware-v1\n" + m.Version + "\n" + strconv.FormatInt(m.Size, 10) + "\n" + strings.ToLower(m.SHA256) + "\n")
}

// Sign returns the manifest with its signature set (for tools and tests).
func (m Manifest) Sign(key ed25519.PrivateKey) Manifest {
	m.Signature = base64.StdEncoding.EncodeToString(ed25519.Sign(key, m.SigningMessage()))
	return m
}

// VerifySignature checks the signature with pub. With pub nil, an unsigned manifest passes and
// a signed one is refused (there is nothing to check it with).
func (m Manifest) VerifySignature(pub ed25519.PublicKey) error {
	if pub == nil {
		if m.Signature != "" {
			return fmt.Errorf("%w: signed, but no public key is configured", ErrManifest)
		}
		return nil
	}
	if m.Signature == "" {
		return fmt.Errorf("%w: unsigned, and a public key is configured", ErrManifest)
	}
	sig, err := base64.StdEncoding.DecodeString(m.Signature)
	if err != nil || !ed25519.Verify(pub, m.SigningMessage(), sig) {
		return fmt.Errorf("%w: bad signature", ErrManifest)
	}
	return nil
}

// Same reports whether two manifests describe the same image.
func (m Manifest) Same(o Manifest) bool {
	return m.Version == o.Version && m.Size == o.Size && strings.EqualFold(m.SHA256, o.SHA256) && m.URL == o.URL
}

// CompareVersions orders dotted versions: numeric parts numerically, others as strings, a
// missing part before a present one ("1.2" < "1.2.1"). It returns -1, 0 or 1.
func CompareVersions(a, b string) int {
	pa, pb := strings.Split(strings.TrimPrefix(a, "v"), "."), strings.Split(strings.TrimPrefix(b, "v"), ".")
	for i := 0; i < len(pa) || i < len(pb); i++ {
		if i >= len(pa) {
			return -1
		}
		if i >= len(pb) {
			return 1
		}
		na, ea := strconv.ParseUint(pa[i], 10, 64)
		nb, eb := strconv.ParseUint(pb[i], 10, 64)
		switch {
		case ea == nil && eb == nil:
			if na != nb {
				if na < nb {
					return -1
				}
				return 1
			}
		case pa[i] != pb[i]:
			if pa[i] < pb[i] {
				return -1
			}
			return 1
		}
	}
	return 0
}
