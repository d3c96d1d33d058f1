package firmware

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestKeyFormsRoundTrip(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, form := range [][]byte{MarshalPublicKey(pub), []byte(EncodePublicKey(pub) + "\n")} {
		got, err := ParsePublicKey(form)
		if err != nil || !got.Equal(pub) {
			t.Fatalf("%q: %v", form, err)
		}
	}
	got, err := ParsePrivateKey(MarshalPrivateKey(priv))
	if err != nil || !got.Equal(priv) {
		t.Fatalf("private key: %v", err)
	}
	for _, bad := range []string{"", "AAAA", string(MarshalPrivateKey(priv))} {
		if _, err := ParsePublicKey([]byte(bad)); !errors.Is(err, ErrKeyFile) {
			t.Fatalf("public key %q: %v", bad, err)
		}
	}
	if _, err := ParsePrivateKey(MarshalPublicKey(pub)); !errors.Is(err, ErrKeyFile) {
		t.Fatalf("a public key as private: %v", err)
	}
}

func TestLoosePrivateKeyFileRefused(t *testing.T) {
	_, priv, _ := ed25519.GenerateKey(nil)
	path := filepath.Join(t.TempDir(), "k.pem")
	if err := os.WriteFile(path, MarshalPrivateKey(priv), 0o600); err != nil {
		t.Fatal(err)
	}
	if k, err := ReadPrivateKeyFile(path); err != nil || !k.Equal(priv) {
		t.Fatalf("0600: %v", err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadPrivateKeyFile(path); !errors.Is(err, ErrKeyFile) || !strings.Contains(err.Error(), "0644") {
		t.Fatalf("0644: %v", err)
	}
}

// Policy.Check is Updater.Start's decision: the same errors in the same order.
func TestPolicyCheckDecidesAsTheUpdater(t *testing.T) {
	_, priv, _ := ed25519.GenerateKey(nil)
	_, other, _ := ed25519.GenerateKey(nil)
	pub := priv.Public().(ed25519.PublicKey)
	m, err := ManifestFor(bytes.NewReader([]byte("image")), "2.0.0", "https://h/fw.bin")
	if err != nil || m.Size != 5 || m.SHA256 != "6105d6cc76af400325e94d588ce511be5bfdbb73b437dc51eca43917d7a43e3d" {
		t.Fatalf("ManifestFor: %+v %v", m, err)
	}
	p := Policy{PublicKey: pub}
	cases := []struct {
		m       Manifest
		running string
		want    string
	}{
		{m.Sign(priv), "1.0.0", ""},
		{m.Sign(other), "1.0.0", "bad signature"},
		{m, "1.0.0", "unsigned"},
		{m.Sign(priv), "3.0.0", "downgrade refused: 2.0.0 is older than the running 3.0.0"},
		{func() Manifest { x := m; x.URL = "http://h/fw.bin"; return x.Sign(priv) }(), "", "https only"},
	}
	for i, c := range cases {
		err := p.Check(c.m, c.running)
		if (c.want == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), c.want) {
			t.Fatalf("case %d: %v, want %q", i, err, c.want)
		}
		u, uerr := New(Config{Dir: t.TempDir(), InitialVersion: c.running, PublicKey: pub, Applier: SimulatedApplier{},
			Rebooter: RebootFunc(nil), Reporter: nopReporter{}})
		if c.running == "" {
			continue
		}
		if uerr != nil {
			t.Fatal(uerr)
		}
		if serr := u.Start(c.m); (serr == nil) != (err == nil) || serr != nil && serr.Error() != err.Error() {
			t.Fatalf("case %d: Updater.Start says %v, Policy.Check %v", i, serr, err)
		}
	}
	if _, err := ManifestFor(bytes.NewReader(nil), "1", "https://h/x"); !errors.Is(err, ErrManifest) {
		t.Fatalf("empty image: %v", err)
	}
}

type nopReporter struct{}

func (nopReporter) Report(context.Context, Status) error { return nil }

func FuzzParseKeys(f *testing.F) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	f.Add(MarshalPublicKey(pub))
	f.Add([]byte(EncodePublicKey(pub)))
	f.Add(MarshalPrivateKey(priv))
	f.Add([]byte("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if k, err := ParsePublicKey(b); err == nil && len(k) != ed25519.PublicKeySize {
			t.Fatalf("public key of %d bytes accepted", len(k))
		} else if err != nil && !errors.Is(err, ErrKeyFile) {
			t.Fatalf("error %v does not wrap ErrKeyFile", err)
		}
		if k, err := ParsePrivateKey(b); err == nil && len(k) != ed25519.PrivateKeySize {
			t.Fatalf("private key of %d bytes accepted", len(k))
		} else if err != nil && !errors.Is(err, ErrKeyFile) {
			t.Fatalf("error %v does not wrap ErrKeyFile", err)
		}
	})
}
