// Package sas builds, parses and verifies Azure IoT shared access signature (SAS) tokens for
// devices, modules, DPS registrations and service policies, and derives per-device keys from
// DPS enrollment-group keys.
//
// A token has the form
//
//	SharedAccessSignature sr={resource}&sig={signature}&se={expiry}[&skn={keyName}]
//
// in any field order. The signature is base64(HMAC-SHA256(key, sr + "\n" + se)), where sr is the
// resource exactly as it appears in the token. Microsoft's SDKs disagree on how sr is encoded
// (raw, upper-case or lower-case percent-encoding), so [Token.Verify] always signs the literal
// text and authorisation compares the decoded resource ([Token.Resource]) separately.
//
// The package does no I/O. Keys are held in [Key], which never prints its bytes.
package sas

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/iothubby/iothubby/internal/pct"
)

// Scheme is the authorization scheme that prefixes every token.
const Scheme = "SharedAccessSignature"

// MaxTokenLength bounds what Parse accepts; real tokens are a few hundred bytes.
const MaxTokenLength = 4096

// Errors returned by Parse and Verify. They are matched with errors.Is.
var (
	// ErrMalformed means the token text is not a well-formed SAS token.
	ErrMalformed = errors.New("sas: malformed token")
	// ErrSignature means the signature does not match the key.
	ErrSignature = errors.New("sas: signature mismatch")
	// ErrExpired means the token's expiry has passed.
	ErrExpired = errors.New("sas: token expired")
	// ErrResource means the token's resource does not cover what it is used for.
	ErrResource = errors.New("sas: resource not authorised")
)

// Key is a symmetric key (the decoded base64 of a device, group or policy key). Its String and
// GoString methods redact it, so a Key that reaches a log line or a %v does not leak.
type Key []byte

// ParseKey decodes a base64 key as Azure shows it (standard encoding, padded).
func ParseKey(b64 string) (Key, error) {
	if b64 == "" {
		return nil, errors.New("sas: empty key")
	}
	k, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, fmt.Errorf("sas: key is not valid base64: %w", err)
	}
	if len(k) == 0 {
		return nil, errors.New("sas: empty key")
	}
	return Key(k), nil
}

// String redacts the key.
func (k Key) String() string { return "[redacted key]" }

// GoString redacts the key.
func (k Key) GoString() string { return "sas.Key([redacted])" }

// Base64 returns the key in Azure's textual form. Callers own what they do with it.
func (k Key) Base64() string { return base64.StdEncoding.EncodeToString(k) }

// Sign returns HMAC-SHA256(k, msg). It implements [Signer].
func (k Key) Sign(_ context.Context, msg []byte) ([]byte, error) {
	if len(k) == 0 {
		return nil, errors.New("sas: empty key")
	}
	return k.mac(msg), nil
}

func (k Key) mac(msg []byte) []byte {
	h := hmac.New(sha256.New, k)
	h.Write(msg)
	return h.Sum(nil)
}

// Signer computes HMAC-SHA256 over a string-to-sign with a key it holds. [Key] is the software
// implementation; a TPM-backed signer keeps its key inside the TPM.
type Signer interface {
	Sign(ctx context.Context, msg []byte) ([]byte, error)
}

// DeriveDeviceKey derives a device's key from a DPS enrollment-group key:
// base64(HMAC-SHA256(groupKey, registrationID)).
func DeriveDeviceKey(groupKey Key, registrationID string) Key {
	return Key(groupKey.mac([]byte(registrationID)))
}

// DeviceResource is the resource URI of a device token: {host}/devices/{deviceId}.
func DeviceResource(host, deviceID string) string {
	return host + "/devices/" + deviceID
}

// ModuleResource is the resource URI of a module token: {host}/devices/{deviceId}/modules/{moduleId}.
func ModuleResource(host, deviceID, moduleID string) string {
	return host + "/devices/" + deviceID + "/modules/" + moduleID
}

// DPSResource is the resource URI of a DPS registration token: {idScope}/registrations/{registrationId}.
func DPSResource(idScope, registrationID string) string {
	return idScope + "/registrations/" + registrationID
}

// StringToSign is the message a token's signature covers: sr + "\n" + se, with sr exactly as it
// appears in the token.
func StringToSign(rawResource, rawExpiry string) []byte {
	b := make([]byte, 0, len(rawResource)+1+len(rawExpiry))
	b = append(b, rawResource...)
	b = append(b, '\n')
	b = append(b, rawExpiry...)
	return b
}

// Params describe a token to build.
type Params struct {
	// Resource is the decoded resource URI, e.g. DeviceResource(host, id).
	Resource string
	// KeyName is the skn field: a policy name for service and policy tokens, "registration" for
	// DPS symmetric-key registrations, empty for device-key tokens.
	KeyName string
	// Expiry is when the token stops being valid (second precision).
	Expiry time.Time
	// RawResource, when true, puts Resource into the token unencoded (as Microsoft's service SDK
	// does for hub-scoped service tokens). The default percent-encodes it as the device SDKs do.
	RawResource bool
}

// Build signs a token with s. The resource is percent-encoded (upper-case hex, as the Node and
// Python SDKs send it) unless p.RawResource is set; the signature is computed over that text.
func Build(ctx context.Context, s Signer, p Params) (string, error) {
	if p.Resource == "" {
		return "", errors.New("sas: empty resource")
	}
	if p.Expiry.IsZero() {
		return "", errors.New("sas: zero expiry")
	}
	sr := p.Resource
	if !p.RawResource {
		sr = Encode(p.Resource)
	}
	se := strconv.FormatInt(p.Expiry.Unix(), 10)
	sig, err := s.Sign(ctx, StringToSign(sr, se))
	if err != nil {
		return "", fmt.Errorf("sas: sign: %w", err)
	}
	var b strings.Builder
	b.Grow(len(Scheme) + len(sr) + 80)
	b.WriteString(Scheme)
	b.WriteString(" sr=")
	b.WriteString(sr)
	b.WriteString("&sig=")
	b.WriteString(Encode(base64.StdEncoding.EncodeToString(sig)))
	b.WriteString("&se=")
	b.WriteString(se)
	if p.KeyName != "" {
		b.WriteString("&skn=")
		b.WriteString(Encode(p.KeyName))
	}
	return b.String(), nil
}

// Token is a parsed SAS token.
type Token struct {
	// RawResource is sr exactly as it appears in the token; the signature covers it.
	RawResource string
	// Resource is sr percent-decoded once.
	Resource string
	// Signature is the decoded HMAC.
	Signature []byte
	// RawExpiry is se as it appears in the token.
	RawExpiry string
	// Expiry is se as a time.
	Expiry time.Time
	// KeyName is skn, decoded; empty when absent.
	KeyName string
}

// Parse parses a token, with or without the leading "SharedAccessSignature " scheme. It checks
// structure only; call Verify and Authorizes to trust it.
func Parse(token string) (*Token, error) {
	if len(token) > MaxTokenLength {
		return nil, fmt.Errorf("%w: longer than %d bytes", ErrMalformed, MaxTokenLength)
	}
	body, ok := strings.CutPrefix(token, Scheme+" ")
	if !ok {
		return nil, fmt.Errorf("%w: missing %q scheme", ErrMalformed, Scheme)
	}
	var t Token
	var seen [4]bool
	for field := range strings.SplitSeq(body, "&") {
		name, value, ok := strings.Cut(field, "=")
		if !ok {
			return nil, fmt.Errorf("%w: field without '='", ErrMalformed)
		}
		var idx int
		switch name {
		case "sr":
			idx = 0
			dec, err := Decode(value)
			if err != nil || dec == "" {
				return nil, fmt.Errorf("%w: bad sr", ErrMalformed)
			}
			t.RawResource, t.Resource = value, dec
		case "sig":
			idx = 1
			dec, err := Decode(value)
			if err != nil {
				return nil, fmt.Errorf("%w: bad sig encoding", ErrMalformed)
			}
			sig, err := base64.StdEncoding.DecodeString(dec)
			if err != nil || len(sig) == 0 {
				return nil, fmt.Errorf("%w: sig is not base64", ErrMalformed)
			}
			t.Signature = sig
		case "se":
			idx = 2
			n, err := strconv.ParseInt(value, 10, 64)
			if err != nil || n < 0 || n > 1<<40 {
				return nil, fmt.Errorf("%w: bad se", ErrMalformed)
			}
			t.RawExpiry, t.Expiry = value, time.Unix(n, 0)
		case "skn":
			idx = 3
			dec, err := Decode(value)
			if err != nil {
				return nil, fmt.Errorf("%w: bad skn", ErrMalformed)
			}
			t.KeyName = dec
		default:
			// Unknown fields are tolerated, as the service does.
			continue
		}
		if seen[idx] {
			return nil, fmt.Errorf("%w: duplicate %s", ErrMalformed, name)
		}
		seen[idx] = true
	}
	switch {
	case !seen[0]:
		return nil, fmt.Errorf("%w: missing sr", ErrMalformed)
	case !seen[1]:
		return nil, fmt.Errorf("%w: missing sig", ErrMalformed)
	case !seen[2]:
		return nil, fmt.Errorf("%w: missing se", ErrMalformed)
	}
	return &t, nil
}

// Verify checks the signature against key (in constant time) and that the token has not expired
// at now. It says nothing about what the token may access: see Authorizes.
func (t *Token) Verify(key Key, now time.Time) error {
	if len(key) == 0 {
		return fmt.Errorf("%w: no key", ErrSignature)
	}
	want := key.mac(StringToSign(t.RawResource, t.RawExpiry))
	if !hmac.Equal(want, t.Signature) {
		return ErrSignature
	}
	if !now.Before(t.Expiry) {
		return ErrExpired
	}
	return nil
}

// Authorizes reports whether the token's decoded resource covers target. As IoT Hub does, the
// resource may be target itself or a prefix of it that ends at a path segment; the host part
// (before the first '/') is compared case-insensitively and a ":port" on either side is ignored.
func (t *Token) Authorizes(target string) bool {
	return ResourceCovers(t.Resource, target)
}

// ResourceCovers implements the rule of Token.Authorizes on plain strings.
func ResourceCovers(resource, target string) bool {
	rh, rp, _ := strings.Cut(strings.TrimSuffix(resource, "/"), "/")
	th, tp, _ := strings.Cut(target, "/")
	if !strings.EqualFold(stripPort(rh), stripPort(th)) {
		return false
	}
	if rp == "" {
		return true
	}
	if rp == tp {
		return true
	}
	return strings.HasPrefix(tp, rp+"/")
}

func stripPort(host string) string {
	if i := strings.LastIndexByte(host, ':'); i >= 0 && !strings.Contains(host[i:], "]") {
		return host[:i]
	}
	return host
}

// Encode percent-encodes s as JavaScript's encodeURIComponent does, also escaping !'()*, with
// upper-case hex. This is what Microsoft's Node SDK sends for sr, sig and skn.
func Encode(s string) string { return pct.Encode(s) }

// Decode percent-decodes s once, accepting upper- and lower-case hex. Unlike query-string
// decoding it leaves '+' as '+', since base64 signatures contain it.
func Decode(s string) (string, error) {
	d, err := pct.Decode(s)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	return d, nil
}
