package attest_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/sas"
)

const keyB64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

func write(t *testing.T, name, content string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // umask may have trimmed it
		t.Fatal(err)
	}
	return p
}

func TestSymmetricKeyFromString(t *testing.T) {
	c, err := attest.FromBase64Key(" " + keyB64 + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if c.Kind() != attest.SymmetricKey || c.Certificate() != nil {
		t.Fatalf("kind %v", c.Kind())
	}
	sig, err := c.Signer().Sign(context.Background(), []byte("x"))
	if err != nil || len(sig) != 32 {
		t.Fatalf("sign: %v", err)
	}
	k, _ := sas.ParseKey(keyB64)
	want, _ := k.Sign(context.Background(), []byte("x"))
	if string(sig) != string(want) {
		t.Error("signature differs from the key's")
	}
	for _, s := range []string{fmt.Sprint(c), fmt.Sprintf("%#v", c), fmt.Sprintf("%+v", c)} {
		if strings.Contains(s, keyB64) || strings.Contains(s, "AAEC") {
			t.Errorf("key leaked in %q", s)
		}
	}
	if _, err := attest.FromBase64Key("not base64!"); err == nil {
		t.Error("bad base64 accepted")
	}
	if _, err := attest.FromBase64Key(""); err == nil {
		t.Error("empty key accepted")
	}
}

func TestKeyFilePermissions(t *testing.T) {
	good := write(t, "key", keyB64+"\n", 0o600)
	if _, err := attest.FromKeyFile(good, attest.FileOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604, 0o660} {
		p := write(t, "key", keyB64, mode)
		_, err := attest.FromKeyFile(p, attest.FileOptions{})
		if !errors.Is(err, attest.ErrInsecureKeyFile) {
			t.Errorf("mode %o: err = %v, want ErrInsecureKeyFile", mode, err)
		} else if !strings.Contains(err.Error(), "chmod 600") || strings.Contains(err.Error(), keyB64) {
			t.Errorf("mode %o: message %q", mode, err)
		}
		if _, err := attest.FromKeyFile(p, attest.FileOptions{AllowInsecureKeyFile: true}); err != nil {
			t.Errorf("mode %o allowed: %v", mode, err)
		}
	}
	if _, err := attest.FromKeyFile(filepath.Join(t.TempDir(), "missing"), attest.FileOptions{}); err == nil {
		t.Error("missing file accepted")
	}
}

func TestX509Files(t *testing.T) {
	certPEM, keyPEM := selfSigned(t, "dev1")
	cert := write(t, "dev1.pem", certPEM, 0o644)
	key := write(t, "dev1.key", keyPEM, 0o600)
	c, err := attest.FromX509Files(cert, key, attest.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Kind() != attest.X509 || c.Signer() != nil || c.Certificate() == nil || len(c.Certificate().Certificate) != 1 {
		t.Fatalf("credential %v", c)
	}
	openKey := write(t, "open.key", keyPEM, 0o644)
	if _, err := attest.FromX509Files(cert, openKey, attest.FileOptions{}); !errors.Is(err, attest.ErrInsecureKeyFile) {
		t.Errorf("world-readable key: %v", err)
	}
	_, otherKey := selfSigned(t, "other")
	mismatch := write(t, "other.key", otherKey, 0o600)
	if _, err := attest.FromX509Files(cert, mismatch, attest.FileOptions{}); err == nil {
		t.Error("mismatched key accepted")
	} else if strings.Contains(err.Error(), "PRIVATE KEY") {
		t.Errorf("error shows key material: %v", err)
	}
}

func selfSigned(t *testing.T, cn string) (certPEM, keyPEM string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kd, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}))
}
