package hub

import (
	"crypto/tls"
	"crypto/x509"
	"testing"
)

// unkeyableCache is a session cache whose type cannot be a map key.
type unkeyableCache struct{ _ []int }

func (unkeyableCache) Get(string) (*tls.ClientSessionState, bool) { return nil, false }
func (unkeyableCache) Put(string, *tls.ClientSessionState)        {}

// TestTLSConfigsShared: sessions given one TLSConfigs share a tls.Config when roots, server
// name, session cache and curves agree; each difference, a client certificate or a session
// cache that cannot be compared gives a tls.Config of its own.
func TestTLSConfigsShared(t *testing.T) {
	share := new(TLSConfigs)
	roots := x509.NewCertPool()
	cache := tls.NewLRUClientSessionCache(4)
	base := func() *Config {
		return &Config{RootCAs: roots, ServerName: "hub.example", TLSSessionCache: cache,
			CurvePreferences: []tls.CurveID{tls.X25519, tls.CurveP256}, TLSConfigs: share}
	}
	first := base().tlsConfig()
	if again := base().tlsConfig(); again != first {
		t.Fatal("two sessions with the same TLS settings got two tls.Configs")
	}
	if first.ServerName != "hub.example" || first.RootCAs != roots || first.ClientSessionCache != cache ||
		len(first.CurvePreferences) != 2 || first.MinVersion != tls.VersionTLS12 || first.Certificates != nil {
		t.Fatalf("shared tls.Config does not carry the session's settings: %+v", first)
	}
	for name, mutate := range map[string]func(*Config){
		"server name":        func(c *Config) { c.ServerName = "other.example" },
		"roots":              func(c *Config) { c.RootCAs = x509.NewCertPool() },
		"session cache":      func(c *Config) { c.TLSSessionCache = tls.NewLRUClientSessionCache(4) },
		"no session cache":   func(c *Config) { c.TLSSessionCache = nil },
		"curves":             func(c *Config) { c.CurvePreferences = []tls.CurveID{tls.CurveP256, tls.X25519} },
		"client certificate": func(c *Config) { c.Certificate = &tls.Certificate{} },
		"no TLSConfigs":      func(c *Config) { c.TLSConfigs = nil },
	} {
		c := base()
		mutate(c)
		if got := c.tlsConfig(); got == first {
			t.Errorf("%s differs, yet the shared tls.Config was used", name)
		}
	}
	cert := base()
	cert.Certificate = &tls.Certificate{Certificate: [][]byte{{1}}}
	a, b := cert.tlsConfig(), cert.tlsConfig()
	if a == b || len(a.Certificates) != 1 {
		t.Fatal("a session with a client certificate must have a tls.Config of its own, with the certificate")
	}
	odd := base()
	odd.TLSSessionCache = unkeyableCache{}
	if x, y := odd.tlsConfig(), odd.tlsConfig(); x == y || x.ClientSessionCache == nil {
		t.Fatal("a session cache that cannot be a map key must give a tls.Config of its own, with the cache")
	}
}
