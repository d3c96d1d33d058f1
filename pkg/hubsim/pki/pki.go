// Package pki creates and keeps hubsim's certificate authority and its TLS server certificate,
// and issues certificates for tests (device certificates, self-signed or CA-signed).
//
// Every key is ECDSA P-256. Keys are written PKCS#8 PEM with mode 0600, certificates PEM with
// mode 0644, each atomically (temporary file and rename) so a crash never leaves half a file.
package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1" //nolint:gosec // SHA-1 thumbprints are what DPS and the Azure portal show.
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/iothubby/iothubby/internal/atomicfile"
)

// File names inside a state directory.
const (
	CACertFile     = "ca.pem"
	CAKeyFile      = "ca.key"
	ServerCertFile = "server.pem"
	ServerKeyFile  = "server.key"
)

// Validity periods.
const (
	CAValidity     = 10 * 365 * 24 * time.Hour
	ServerValidity = 365 * 24 * time.Hour
	// renewBefore: a server certificate this close to expiry is reissued at start.
	renewBefore = 30 * 24 * time.Hour
)

// CA is a certificate authority: a certificate and its private key.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// CertPEM returns the CA certificate in PEM form.
func (ca *CA) CertPEM() []byte { return EncodeCert(ca.Cert) }

// Pool returns a pool holding only this CA.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// NewCA creates a self-signed CA in memory.
func NewCA(commonName string, validity time.Duration) (*CA, error) {
	return newCA(commonName, validity, nil)
}

// NewIntermediate creates an intermediate CA signed by ca (path length 0: it signs leaves only).
func (ca *CA) NewIntermediate(commonName string, validity time.Duration) (*CA, error) {
	return newCA(commonName, validity, ca)
}

func newCA(commonName string, validity time.Duration, parent *CA) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: generate CA key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName, Organization: []string{"iothubby hubsim"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
	}
	signer, signerKey := tmpl, key
	if parent != nil {
		tmpl.MaxPathLen, tmpl.MaxPathLenZero = 0, true
		signer, signerKey = parent.Cert, parent.Key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		return nil, fmt.Errorf("pki: create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("pki: parse CA certificate: %w", err)
	}
	return &CA{Cert: cert, Key: key}, nil
}

// LeafOptions describe a certificate to issue.
type LeafOptions struct {
	CommonName string
	// DNSNames and IPs go into the subject alternative name.
	DNSNames []string
	IPs      []net.IP
	// Server and Client select the extended key usages (both may be set).
	Server, Client bool
	// NotBefore and NotAfter default to one hour ago and one year from now.
	NotBefore, NotAfter time.Time
}

// Issue signs a new leaf certificate and key with the CA. The returned tls.Certificate carries
// the leaf followed by the CA certificate.
func (ca *CA) Issue(o LeafOptions) (tls.Certificate, error) {
	return issue(o, ca.Cert, ca.Key)
}

// SelfSigned creates a self-signed leaf certificate (as a device with "selfSigned" X.509
// authentication uses).
func SelfSigned(o LeafOptions) (tls.Certificate, error) {
	return issue(o, nil, nil)
}

func issue(o LeafOptions, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("pki: generate key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: o.CommonName},
		NotBefore:             o.NotBefore,
		NotAfter:              o.NotAfter,
		DNSNames:              o.DNSNames,
		IPAddresses:           o.IPs,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore = now.Add(-time.Hour)
	}
	if tmpl.NotAfter.IsZero() {
		tmpl.NotAfter = now.Add(ServerValidity)
	}
	if o.Server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if o.Client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	signer := parent
	signerKey := parentKey
	if signer == nil {
		signer, signerKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("pki: create certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("pki: parse certificate: %w", err)
	}
	chain := [][]byte{der}
	if parent != nil {
		chain = append(chain, parent.Raw)
	}
	return tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

func newSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("pki: serial: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}

// LoadOrCreateCA reads dir/ca.pem and dir/ca.key, or creates and writes them when neither
// exists. Exactly one of them existing is an error (a half-written or tampered state directory
// is not silently replaced).
func LoadOrCreateCA(dir string) (*CA, error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	certPEM, errC := os.ReadFile(certPath)
	keyPEM, errK := os.ReadFile(keyPath)
	switch {
	case errC == nil && errK == nil:
		cert, err := ParseCert(certPEM)
		if err != nil {
			return nil, fmt.Errorf("pki: %s: %w", certPath, err)
		}
		key, err := ParseKey(keyPEM)
		if err != nil {
			return nil, fmt.Errorf("pki: %s: %w", keyPath, err)
		}
		if !key.PublicKey.Equal(cert.PublicKey) {
			return nil, fmt.Errorf("pki: %s does not match %s", keyPath, certPath)
		}
		return &CA{Cert: cert, Key: key}, nil
	case errors.Is(errC, os.ErrNotExist) && errors.Is(errK, os.ErrNotExist):
	case errC != nil && !errors.Is(errC, os.ErrNotExist):
		return nil, fmt.Errorf("pki: %w", errC)
	case errK != nil && !errors.Is(errK, os.ErrNotExist):
		return nil, fmt.Errorf("pki: %w", errK)
	default:
		return nil, fmt.Errorf("pki: only one of %s and %s exists; remove it to create a new CA", certPath, keyPath)
	}
	ca, err := NewCA("iothubby hubsim CA", CAValidity)
	if err != nil {
		return nil, err
	}
	kp, err := EncodeKey(ca.Key)
	if err != nil {
		return nil, err
	}
	// Key first: a crash between the two writes leaves the "only one exists" error, never a
	// certificate whose key is lost.
	if err := atomicfile.WriteFile(keyPath, kp, 0o600); err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(certPath, ca.CertPEM(), 0o644); err != nil {
		return nil, err
	}
	return ca, nil
}

// ServerHosts returns the names a server certificate for hostName must carry: localhost,
// 127.0.0.1, ::1 and hostName (without any port).
func ServerHosts(hostName string) (dns []string, ips []net.IP) {
	dns = []string{"localhost"}
	ips = []net.IP{net.IPv4(127, 0, 0, 1).To4(), net.IPv6loopback}
	h := hostName
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	}
	h = strings.Trim(h, "[]")
	if h == "" {
		return dns, ips
	}
	if ip := net.ParseIP(h); ip != nil {
		if !slices.ContainsFunc(ips, ip.Equal) {
			ips = append(ips, ip)
		}
	} else if !slices.Contains(dns, strings.ToLower(h)) {
		dns = append(dns, strings.ToLower(h))
	}
	return dns, ips
}

// LoadOrCreateServer returns the TLS server certificate in dir (server.pem, server.key), reissuing
// it with ca when it is missing, not signed by ca, does not cover hostName, or expires within 30
// days.
func LoadOrCreateServer(dir string, ca *CA, hostName string) (tls.Certificate, error) {
	certPath, keyPath := filepath.Join(dir, ServerCertFile), filepath.Join(dir, ServerKeyFile)
	dns, ips := ServerHosts(hostName)
	if c, err := tls.LoadX509KeyPair(certPath, keyPath); err == nil && serverUsable(c, ca, dns, ips) {
		return c, nil
	}
	c, err := ca.Issue(LeafOptions{CommonName: dns[len(dns)-1], DNSNames: dns, IPs: ips, Server: true,
		NotAfter: time.Now().Add(ServerValidity)})
	if err != nil {
		return tls.Certificate{}, err
	}
	kp, err := EncodeKey(c.PrivateKey.(*ecdsa.PrivateKey))
	if err != nil {
		return tls.Certificate{}, err
	}
	var certs bytes.Buffer
	for _, der := range c.Certificate {
		_ = pem.Encode(&certs, &pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	if err := atomicfile.WriteFile(keyPath, kp, 0o600); err != nil {
		return tls.Certificate{}, err
	}
	if err := atomicfile.WriteFile(certPath, certs.Bytes(), 0o644); err != nil {
		return tls.Certificate{}, err
	}
	return c, nil
}

func serverUsable(c tls.Certificate, ca *CA, dns []string, ips []net.IP) bool {
	leaf := c.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return false
		}
	}
	if time.Until(leaf.NotAfter) < renewBefore || leaf.CheckSignatureFrom(ca.Cert) != nil {
		return false
	}
	for _, d := range dns {
		if leaf.VerifyHostname(d) != nil {
			return false
		}
	}
	for _, ip := range ips {
		if leaf.VerifyHostname(ip.String()) != nil {
			return false
		}
	}
	return true
}

// EncodeCert renders a certificate as PEM.
func EncodeCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// EncodeKey renders an ECDSA key as PKCS#8 PEM.
func EncodeKey(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("pki: marshal key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParseCert reads the first CERTIFICATE block of a PEM text.
func ParseCert(pemText []byte) (*x509.Certificate, error) {
	certs, err := ParseCerts(pemText)
	if err != nil {
		return nil, err
	}
	return certs[0], nil
}

// ParseCerts reads every CERTIFICATE block of a PEM text; there must be at least one, and no
// other kind of block.
func ParseCerts(pemText []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := pemText
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("pki: unexpected PEM block %q", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("pki: parse certificate: %w", err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("pki: no PEM certificate found")
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("pki: trailing data after the PEM certificates")
	}
	return out, nil
}

// ParseKey reads a PKCS#8 or SEC 1 ECDSA private key from PEM.
func ParseKey(pemText []byte) (*ecdsa.PrivateKey, error) {
	b, _ := pem.Decode(pemText)
	if b == nil {
		return nil, errors.New("pki: no PEM key found")
	}
	switch b.Type {
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("pki: parse key: %w", err)
		}
		ek, ok := k.(*ecdsa.PrivateKey)
		if !ok {
			return nil, errors.New("pki: key is not ECDSA")
		}
		return ek, nil
	case "EC PRIVATE KEY":
		k, err := x509.ParseECPrivateKey(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("pki: parse key: %w", err)
		}
		return k, nil
	}
	return nil, fmt.Errorf("pki: unexpected PEM block %q", b.Type)
}

// ThumbprintSHA1 is the upper-case hex SHA-1 of a certificate's DER (as DPS shows it).
func ThumbprintSHA1(c *x509.Certificate) string {
	s := sha1.Sum(c.Raw) //nolint:gosec // a thumbprint, not a signature
	return strings.ToUpper(hex.EncodeToString(s[:]))
}

// ThumbprintSHA256 is the upper-case hex SHA-256 of a certificate's DER (as the IoT Hub portal
// shows it).
func ThumbprintSHA256(c *x509.Certificate) string {
	s := sha256.Sum256(c.Raw)
	return strings.ToUpper(hex.EncodeToString(s[:]))
}
