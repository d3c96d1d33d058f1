package pki

import (
	"bytes"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestCAIsCreatedOnceAndReused(t *testing.T) {
	dir := t.TempDir()
	ca, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{CAKeyFile, CACertFile} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		want := os.FileMode(0o644)
		if f == CAKeyFile {
			want = 0o600
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s mode %v, want %v", f, fi.Mode().Perm(), want)
		}
	}
	again, err := LoadOrCreateCA(dir)
	if err != nil || !again.Cert.Equal(ca.Cert) || !again.Key.Equal(ca.Key) {
		t.Fatalf("CA not reused: %v", err)
	}
	if err := os.Remove(filepath.Join(dir, CAKeyFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateCA(dir); err == nil {
		t.Fatal("a CA certificate without its key was accepted or replaced")
	}
}

func TestServerCertificate(t *testing.T) {
	dir := t.TempDir()
	ca, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	c, err := LoadOrCreateServer(dir, ca, "myhub.example")
	if err != nil {
		t.Fatal(err)
	}
	leaf := c.Leaf
	for _, h := range []string{"localhost", "127.0.0.1", "::1", "myhub.example"} {
		if err := leaf.VerifyHostname(h); err != nil {
			t.Errorf("%s: %v", h, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: "myhub.example"}); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, ServerKeyFile)); fi.Mode().Perm() != 0o600 {
		t.Fatalf("server key mode %v", fi.Mode().Perm())
	}
	before, _ := os.ReadFile(filepath.Join(dir, ServerCertFile))
	if _, err := LoadOrCreateServer(dir, ca, "myhub.example"); err != nil {
		t.Fatal(err)
	}
	if same, _ := os.ReadFile(filepath.Join(dir, ServerCertFile)); !bytes.Equal(same, before) {
		t.Fatal("usable server certificate was reissued")
	}
	c2, err := LoadOrCreateServer(dir, ca, "other.example")
	if err != nil || c2.Leaf.VerifyHostname("other.example") != nil {
		t.Fatalf("not reissued for a new host name: %v", err)
	}
}

func TestIssueAndThumbprints(t *testing.T) {
	ca, err := NewCA("test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.Issue(LeafOptions{CommonName: "dev1", Client: true})
	if err != nil || leaf.Leaf.Subject.CommonName != "dev1" || len(leaf.Certificate) != 2 {
		t.Fatalf("%v", err)
	}
	self, err := SelfSigned(LeafOptions{CommonName: "dev2", Client: true})
	if err != nil || len(self.Certificate) != 1 {
		t.Fatal(err)
	}
	if len(ThumbprintSHA1(self.Leaf)) != 40 || len(ThumbprintSHA256(self.Leaf)) != 64 {
		t.Fatal("thumbprint lengths")
	}
	certs, err := ParseCerts(append(ca.CertPEM(), EncodeCert(self.Leaf)...))
	if err != nil || len(certs) != 2 {
		t.Fatalf("%d %v", len(certs), err)
	}
	if _, err := ParseCerts([]byte("nope")); err == nil {
		t.Fatal("junk parsed")
	}
}
