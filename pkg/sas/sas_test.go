package sas

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// The group-key derivation vector published in Microsoft's DPS symmetric-key documentation.
const (
	vecGroupKey = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="
	vecRegID    = "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"
	vecDerived  = "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="
)

func TestDeriveDeviceKeyPublishedVector(t *testing.T) {
	gk, err := ParseKey(vecGroupKey)
	if err != nil {
		t.Fatal(err)
	}
	if got := DeriveDeviceKey(gk, vecRegID).Base64(); got != vecDerived {
		t.Fatalf("derived key = %s, want %s", got, vecDerived)
	}
}

func TestKeyNeverPrints(t *testing.T) {
	k, _ := ParseKey(vecGroupKey)
	for _, s := range []string{fmt.Sprint(k), fmt.Sprintf("%v %+v %#v %s", k, k, k, k)} {
		if strings.Contains(s, vecGroupKey[:10]) || strings.Contains(s, "242") {
			t.Fatalf("key leaked in %q", s)
		}
	}
}

func TestParseKeyErrors(t *testing.T) {
	for _, in := range []string{"", "not base64!!", "===="} {
		if _, err := ParseKey(in); err == nil {
			t.Errorf("ParseKey(%q) succeeded", in)
		}
	}
}

// sign reproduces the documented algorithm independently of Build.
func sign(t *testing.T, key, sr, se string) string {
	t.Helper()
	k, err := base64.StdEncoding.DecodeString(key)
	if err != nil {
		t.Fatal(err)
	}
	h := hmac.New(sha256.New, k)
	h.Write([]byte(sr + "\n" + se))
	return base64.StdEncoding.EncodeToString(h.Sum(nil))
}

const devKey = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

func TestBuildDeviceTokenShape(t *testing.T) {
	k, _ := ParseKey(devKey)
	exp := time.Unix(1700000000, 0)
	tok, err := Build(context.Background(), k, Params{Resource: DeviceResource("hub.example:8883", "dev 1"), Expiry: exp})
	if err != nil {
		t.Fatal(err)
	}
	wantSR := "hub.example%3A8883%2Fdevices%2Fdev%201"
	wantSig := Encode(sign(t, devKey, wantSR, "1700000000"))
	want := "SharedAccessSignature sr=" + wantSR + "&sig=" + wantSig + "&se=1700000000"
	if tok != want {
		t.Fatalf("token\n got %s\nwant %s", tok, want)
	}
	p, err := Parse(tok)
	if err != nil {
		t.Fatal(err)
	}
	if p.Resource != "hub.example:8883/devices/dev 1" || p.KeyName != "" || !p.Expiry.Equal(exp) {
		t.Fatalf("parsed %+v", p)
	}
	if err := p.Verify(k, exp.Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
}

func TestBuildPolicyAndDPSTokens(t *testing.T) {
	k, _ := ParseKey(devKey)
	exp := time.Unix(1800000000, 0)
	tok, err := Build(context.Background(), k, Params{Resource: "localhost:8443", KeyName: "iothubowner", Expiry: exp, RawResource: true})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(tok, " sr=localhost:8443&") || !strings.HasSuffix(tok, "&skn=iothubowner") {
		t.Fatalf("policy token %s", tok)
	}
	tok, err = Build(context.Background(), k, Params{Resource: DPSResource("0ne00000001", "reg-1"), KeyName: "registration", Expiry: exp})
	if err != nil {
		t.Fatal(err)
	}
	p, err := Parse(tok)
	if err != nil {
		t.Fatal(err)
	}
	if p.Resource != "0ne00000001/registrations/reg-1" || p.KeyName != "registration" {
		t.Fatalf("dps token parsed %+v", p)
	}
	if _, err := Build(context.Background(), k, Params{Expiry: exp}); err == nil {
		t.Fatal("empty resource accepted")
	}
	if _, err := Build(context.Background(), k, Params{Resource: "x"}); err == nil {
		t.Fatal("zero expiry accepted")
	}
}

// Microsoft's SDKs put sr on the wire raw, with upper-case or lower-case escapes, and in any
// field order. Each must verify because the HMAC covers the literal text.
func TestVerifyAcceptsEverySpellingOfSR(t *testing.T) {
	k, _ := ParseKey(devKey)
	now := time.Unix(1700000000, 0)
	se := "1700003600"
	for _, sr := range []string{
		"myhub.azure-devices.net/devices/dev1",            // C SDK TPM path: raw
		"myhub.azure-devices.net%2Fdevices%2Fdev1",        // Node, Python: upper-case
		"myhub.azure-devices.net%2fdevices%2fdev1",        // C SDK encoder, docs: lower-case
		"MyHub.Azure-Devices.NET%2Fdevices%2Fdev1",        // host case differs
		"myhub.azure-devices.net%3A8883%2Fdevices%2Fdev1", // with a port
	} {
		sig := Encode(sign(t, devKey, sr, se))
		for _, tok := range []string{
			"SharedAccessSignature sr=" + sr + "&sig=" + sig + "&se=" + se,
			"SharedAccessSignature se=" + se + "&sig=" + sig + "&sr=" + sr,
			"SharedAccessSignature sr=" + sr + "&sig=" + lowerEscapes(sig) + "&skn=&se=" + se,
		} {
			p, err := Parse(tok)
			if err != nil {
				t.Fatalf("%s: %v", tok, err)
			}
			if err := p.Verify(k, now); err != nil {
				t.Errorf("%s: %v", tok, err)
			}
			if !p.Authorizes("myhub.azure-devices.net/devices/dev1") {
				t.Errorf("%s does not authorise dev1", tok)
			}
			if p.Authorizes("myhub.azure-devices.net/devices/dev10") || p.Authorizes("otherhub/devices/dev1") {
				t.Errorf("%s authorises too much", tok)
			}
		}
	}
}

func TestVerifyFailures(t *testing.T) {
	k, _ := ParseKey(devKey)
	other, _ := ParseKey(vecDerived)
	exp := time.Unix(1700000000, 0)
	tok, _ := Build(context.Background(), k, Params{Resource: DeviceResource("h", "d"), Expiry: exp})
	p, err := Parse(tok)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Verify(other, exp.Add(-time.Hour)); !errors.Is(err, ErrSignature) {
		t.Errorf("wrong key: %v", err)
	}
	if err := p.Verify(nil, exp.Add(-time.Hour)); !errors.Is(err, ErrSignature) {
		t.Errorf("no key: %v", err)
	}
	if err := p.Verify(k, exp); !errors.Is(err, ErrExpired) {
		t.Errorf("at expiry: %v", err)
	}
	// A signature over a different encoding of the same resource does not verify.
	tampered := strings.Replace(tok, "%2F", "%2f", 1)
	q, err := Parse(tampered)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Verify(k, exp.Add(-time.Hour)); !errors.Is(err, ErrSignature) {
		t.Errorf("re-encoded sr verified: %v", err)
	}
}

func TestParseMalformed(t *testing.T) {
	good := "SharedAccessSignature sr=h%2Fdevices%2Fd&sig=" + Encode(base64.StdEncoding.EncodeToString([]byte("0123456789abcdef"))) + "&se=100"
	if _, err := Parse(good); err != nil {
		t.Fatalf("good token: %v", err)
	}
	cases := map[string]string{
		"empty":          "",
		"no scheme":      "sr=a&sig=AA%3D%3D&se=1",
		"wrong scheme":   "Bearer sr=a&sig=AA%3D%3D&se=1",
		"missing sr":     "SharedAccessSignature sig=AA%3D%3D&se=1",
		"missing sig":    "SharedAccessSignature sr=a&se=1",
		"missing se":     "SharedAccessSignature sr=a&sig=AA%3D%3D",
		"no equals":      "SharedAccessSignature sr=a&sig&se=1",
		"se not number":  "SharedAccessSignature sr=a&sig=AA%3D%3D&se=soon",
		"se negative":    "SharedAccessSignature sr=a&sig=AA%3D%3D&se=-1",
		"se huge":        "SharedAccessSignature sr=a&sig=AA%3D%3D&se=99999999999999999999",
		"sig not base64": "SharedAccessSignature sr=a&sig=***&se=1",
		"bad escape":     "SharedAccessSignature sr=a%zz&sig=AA%3D%3D&se=1",
		"truncated esc":  "SharedAccessSignature sr=a%2&sig=AA%3D%3D&se=1",
		"duplicate sr":   "SharedAccessSignature sr=a&sr=b&sig=AA%3D%3D&se=1",
		"empty sr":       "SharedAccessSignature sr=&sig=AA%3D%3D&se=1",
		"too long":       "SharedAccessSignature sr=" + strings.Repeat("a", MaxTokenLength) + "&sig=AA%3D%3D&se=1",
	}
	for name, tok := range cases {
		if _, err := Parse(tok); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err = %v, want ErrMalformed", name, err)
		}
	}
}

func TestResourceCovers(t *testing.T) {
	cases := []struct {
		res, target string
		want        bool
	}{
		{"hub", "hub/devices/d", true},
		{"hub/", "hub/devices/d", true},
		{"HUB:443", "hub/devices/d", true},
		{"hub/devices", "hub/devices/d", true},
		{"hub/devices/d", "hub/devices/d", true},
		{"hub/devices/d", "hub/devices/d/modules/m", true},
		{"hub/devices/d", "hub/devices/dx", false},
		{"hub/devices/d/modules/m", "hub/devices/d", false},
		{"hub2", "hub/devices/d", false},
		{"[::1]:443/devices/d", "[::1]/devices/d", true},
	}
	for _, c := range cases {
		if got := ResourceCovers(c.res, c.target); got != c.want {
			t.Errorf("ResourceCovers(%q, %q) = %v", c.res, c.target, got)
		}
	}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	for _, s := range []string{"", "abc", "a/b:c d", "!'()*", "é€", "+/=", "%"} {
		d, err := Decode(Encode(s))
		if err != nil || d != s {
			t.Errorf("round trip %q: %q %v", s, d, err)
		}
	}
	if got := Encode("!'()*"); got != "%21%27%28%29%2A" {
		t.Errorf("strict encode = %s", got)
	}
	if d, _ := Decode("a+b"); d != "a+b" {
		t.Errorf("'+' decoded to %q", d)
	}
}

type failSigner struct{}

func (failSigner) Sign(context.Context, []byte) ([]byte, error) { return nil, errors.New("tpm gone") }

func TestBuildSignerError(t *testing.T) {
	_, err := Build(context.Background(), failSigner{}, Params{Resource: "r", Expiry: time.Unix(1, 0)})
	if err == nil || !strings.Contains(err.Error(), "tpm gone") {
		t.Fatalf("err = %v", err)
	}
}

// lowerEscapes turns %2B into %2b, as the C SDK's encoder writes escapes.
func lowerEscapes(s string) string {
	b := []byte(s)
	for i := 0; i+2 < len(b); i++ {
		if b[i] == '%' {
			b[i+1], b[i+2] = lower(b[i+1]), lower(b[i+2])
		}
	}
	return string(b)
}

func lower(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}
