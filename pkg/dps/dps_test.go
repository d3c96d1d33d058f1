package dps_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/dps"
	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const groupKey = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="

func start(t *testing.T, mod func(*hubsim.Config)) *hubsim.Server {
	t.Helper()
	cfg := hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", DPSRetryAfter: -1}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := hubsim.Start(context.Background(), cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	return srv
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func clientCfg(srv *hubsim.Server, transport, regID string, cred *attest.Credential) dps.Config {
	ep := srv.Endpoints()
	addr := ep.MQTTAddress
	if transport == dps.HTTPS {
		addr = ep.HTTPSAddress
	}
	return dps.Config{Endpoint: addr, ServerName: "localhost", RootCAs: srv.CA().Pool(), IDScope: ep.IDScope,
		RegistrationID: regID, Transport: transport, Credential: cred, BackoffMin: 50 * time.Millisecond}
}

func TestGroupSymmetricKeyBothTransports(t *testing.T) {
	srv := start(t, nil)
	_, err := srv.DPS().PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "g1",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: groupKey}},
		InitialTwin: json.RawMessage(`{"tags":{"site":"a"},"properties":{"desired":{"interval":30}}}`)}, true, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, tr := range []string{dps.MQTT, dps.HTTPS} {
		t.Run(tr, func(t *testing.T) {
			regID := "dev-" + tr
			cred, err := attest.FromGroupKey(groupKey, regID)
			if err != nil {
				t.Fatal(err)
			}
			cfg := clientCfg(srv, tr, regID, cred)
			cfg.Payload = json.RawMessage(`{"modelId":"dtmi:x;1"}`)
			res, err := dps.Register(ctxT(t), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if res.DeviceID != regID || !strings.HasPrefix(res.AssignedHub, "localhost:") || res.Substatus != "initialAssignment" || string(res.Payload) != `{"modelId":"dtmi:x;1"}` {
				t.Fatalf("%+v", res)
			}
			d, err := srv.Registry().Get(regID)
			if err != nil || d.Authentication.Type != registry.AuthSAS || d.Authentication.SymmetricKey.PrimaryKey != sas.DeriveDeviceKey(mustKey(t, groupKey), regID).Base64() {
				t.Fatalf("hub device %+v %v", d, err)
			}
			if tw, ok := srv.DPS().InitialTwin(regID); !ok || !strings.Contains(string(tw), `"interval":30`) {
				t.Fatalf("initial twin %s %v", tw, ok)
			}
		})
	}
	if st := srv.DPS().Stats(); st.Registrations != 2 || st.EarlyPolls != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func mustKey(t *testing.T, b64 string) sas.Key {
	k, err := sas.ParseKey(b64)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestWrongKeyAndDisabledFailClearly(t *testing.T) {
	srv := start(t, nil)
	e, err := srv.DPS().PutEnrollment(hubapi.Enrollment{RegistrationID: "ind1", ProvisioningStatus: "disabled",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey"}}, false, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, tr := range []string{dps.MQTT, dps.HTTPS} {
		good, _ := attest.FromBase64Key(e.Attestation.SymmetricKey.PrimaryKey)
		if _, err := dps.Register(ctxT(t), clientCfg(srv, tr, "ind1", good)); !errors.Is(err, dps.ErrRefused) || !strings.Contains(err.Error(), "disabled") {
			t.Fatalf("%s disabled: %v", tr, err)
		}
		bad, _ := attest.FromBase64Key(groupKey)
		if _, err := dps.Register(ctxT(t), clientCfg(srv, tr, "ind1", bad)); !errors.Is(err, dps.ErrRefused) {
			t.Fatalf("%s wrong key: %v", tr, err)
		}
	}
	if n := srv.DPS().Stats().Registrations; n != 0 {
		t.Fatalf("registrations %d", n)
	}
}

func TestX509IndividualAndGroupChain(t *testing.T) {
	srv := start(t, nil)
	root, err := pki.NewCA("test root", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	inter, err := root.NewIntermediate("test intermediate", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	writePair := func(name string, c tls.Certificate) *attest.Credential {
		var certPEM []byte
		for _, der := range c.Certificate {
			certPEM = append(certPEM, pki.EncodeCert(mustParse(t, der))...)
		}
		keyPEM, err := pki.EncodeKey(c.PrivateKey.(*ecdsaKey))
		if err != nil {
			t.Fatal(err)
		}
		cf, kf := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
		if err := os.WriteFile(cf, certPEM, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(kf, keyPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		cred, err := attest.FromX509Files(cf, kf, attest.FileOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return cred
	}
	// Group on the root; the device presents leaf + intermediate.
	if _, err := srv.DPS().PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "x509g",
		Attestation: &hubapi.AttestationMechanism{Type: "x509", X509: &hubapi.X509Attestation{SigningCertificates: &hubapi.X509Certificates{
			Primary: &hubapi.X509CertificateWithInfo{Certificate: string(root.CertPEM())}}}}}, true, ""); err != nil {
		t.Fatal(err)
	}
	leaf, err := inter.Issue(pki.LeafOptions{CommonName: "x509-grp-dev", Client: true})
	if err != nil {
		t.Fatal(err)
	}
	cred := writePair("grp", leaf)
	for _, tr := range []string{dps.MQTT, dps.HTTPS} {
		res, err := dps.Register(ctxT(t), clientCfg(srv, tr, "x509-grp-dev", cred))
		if err != nil {
			t.Fatalf("%s: %v", tr, err)
		}
		if res.DeviceID != "x509-grp-dev" {
			t.Fatalf("%+v", res)
		}
	}
	d, err := srv.Registry().Get("x509-grp-dev")
	if err != nil || d.Authentication.Type != registry.AuthSelfSigned || d.Authentication.X509Thumbprint.PrimaryThumbprint != pki.ThumbprintSHA256(leaf.Leaf) {
		t.Fatalf("%+v %v", d, err)
	}
	// Individual, self-signed, with a device ID override.
	self, err := pki.SelfSigned(pki.LeafOptions{CommonName: "x509-ind", Client: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.DPS().PutEnrollment(hubapi.Enrollment{RegistrationID: "x509-ind", DeviceID: "renamed",
		Attestation: &hubapi.AttestationMechanism{Type: "x509", X509: &hubapi.X509Attestation{ClientCertificates: &hubapi.X509Certificates{
			Primary: &hubapi.X509CertificateWithInfo{Certificate: string(pki.EncodeCert(self.Leaf))}}}}}, false, ""); err != nil {
		t.Fatal(err)
	}
	res, err := dps.Register(ctxT(t), clientCfg(srv, dps.MQTT, "x509-ind", writePair("ind", self)))
	if err != nil || res.DeviceID != "renamed" {
		t.Fatalf("%+v %v", res, err)
	}
	// A certificate from another CA is refused.
	other, _ := pki.NewCA("other", time.Hour)
	stranger, _ := other.Issue(pki.LeafOptions{CommonName: "stranger", Client: true})
	if _, err := dps.Register(ctxT(t), clientCfg(srv, dps.HTTPS, "stranger", writePair("stranger", stranger))); !errors.Is(err, dps.ErrRefused) {
		t.Fatalf("stranger: %v", err)
	}
}

func TestThrottleHonoured(t *testing.T) {
	srv := start(t, func(c *hubsim.Config) { c.DPSRegistrationRate = 1 })
	_, err := srv.DPS().PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "g1",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: groupKey}}}, true, "")
	if err != nil {
		t.Fatal(err)
	}
	for i, id := range []string{"t1", "t2", "t3"} {
		cred, _ := attest.FromGroupKey(groupKey, id)
		tr := dps.MQTT
		if i%2 == 1 {
			tr = dps.HTTPS
		}
		if _, err := dps.Register(ctxT(t), clientCfg(srv, tr, id, cred)); err != nil {
			t.Fatal(err)
		}
	}
	st := srv.DPS().Stats()
	if st.Throttled == 0 || st.EarlyPolls != 0 || st.Registrations != 3 {
		t.Fatalf("stats %+v", st)
	}
}

func TestCache(t *testing.T) {
	dir := t.TempDir()
	if _, err := dps.LoadCache(dir, "s", "r"); !errors.Is(err, dps.ErrNoCache) {
		t.Fatal(err)
	}
	r := &dps.Result{RegistrationID: "r", IDScope: "s", AssignedHub: "h:1", DeviceID: "d"}
	if err := dps.SaveCache(dir, r); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(filepath.Join(dir, dps.CacheFile))
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", fi.Mode())
	}
	got, err := dps.LoadCache(dir, "s", "r")
	if err != nil || got.DeviceID != "d" {
		t.Fatalf("%+v %v", got, err)
	}
	if h, a := got.HubHostAndAddress(); h != "h" || a != "h:1" {
		t.Fatal(h, a)
	}
	if _, err := dps.LoadCache(dir, "s", "other"); !errors.Is(err, dps.ErrNoCache) {
		t.Fatal(err)
	}
	_ = os.WriteFile(filepath.Join(dir, dps.CacheFile), []byte("{"), 0o600)
	if _, err := dps.LoadCache(dir, "s", "r"); !errors.Is(err, dps.ErrNoCache) {
		t.Fatal(err)
	}
	if err := dps.ClearCache(dir); err != nil {
		t.Fatal(err)
	}
}

// A device DPS placed in one linked hub is refused (CONNACK 5) by another linked hub's name.
func TestAssignedHubBindsTheDevice(t *testing.T) {
	srv := start(t, func(c *hubsim.Config) { c.HubHostNames = []string{"hub2.localhost"} })
	if _, err := srv.DPS().PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "g", AllocationPolicy: "static", IoTHubs: []string{"hub2.localhost"},
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: groupKey}}}, true, ""); err != nil {
		t.Fatal(err)
	}
	cred, _ := attest.FromGroupKey(groupKey, "bound")
	res, err := dps.Register(ctxT(t), clientCfg(srv, dps.MQTT, "bound", cred))
	if err != nil {
		t.Fatal(err)
	}
	host, _ := res.HubHostAndAddress()
	if host != "hub2.localhost" {
		t.Fatalf("assigned %s", res.AssignedHub)
	}
	key := sas.DeriveDeviceKey(mustKey(t, groupKey), "bound")
	connect := func(hubName string) error {
		tok, _ := sas.Build(context.Background(), key, sas.Params{Resource: sas.DeviceResource(hubName, "bound"), Expiry: time.Now().Add(time.Hour)})
		o := paho.NewClientOptions().AddBroker("tls://" + srv.Endpoints().MQTTAddress).SetClientID("bound").
			SetUsername(hubName + "/bound/?api-version=2021-04-12").SetPassword(tok).SetTLSConfig(srv.ClientTLSConfig()).
			SetAutoReconnect(false).SetConnectRetry(false).SetProtocolVersion(4)
		c := paho.NewClient(o)
		tk := c.Connect()
		if !tk.WaitTimeout(10 * time.Second) {
			return errors.New("connect timed out")
		}
		if tk.Error() == nil {
			c.Disconnect(50)
		}
		return tk.Error()
	}
	if err := connect("localhost"); err == nil {
		t.Fatal("the device connected through a hub it was not assigned to")
	}
	if err := connect("hub2.localhost"); err != nil {
		t.Fatalf("assigned hub: %v", err)
	}
}

// countingCache is a TLS session cache that counts what is asked of it.
type countingCache struct {
	tls.ClientSessionCache
	mu         sync.Mutex
	gets, hits int
	puts       int
}

func (c *countingCache) Get(key string) (*tls.ClientSessionState, bool) {
	s, ok := c.ClientSessionCache.Get(key)
	c.mu.Lock()
	c.gets++
	if ok && s != nil {
		c.hits++
	}
	c.mu.Unlock()
	return s, ok
}

func (c *countingCache) Put(key string, s *tls.ClientSessionState) {
	c.mu.Lock()
	c.puts++
	c.mu.Unlock()
	c.ClientSessionCache.Put(key, s)
}

func (c *countingCache) counts() (gets, hits, puts int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gets, c.hits, c.puts
}

// Registrations with a symmetric key share Config.SessionCache: the second resumes the TLS
// session of the first, on both transports. An X.509 registration never touches the cache: a
// resumed session would present the certificate of the registration that made it.
func TestSessionCache(t *testing.T) {
	srv := start(t, nil)
	if _, err := srv.DPS().PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "g1",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: groupKey}}}, true, ""); err != nil {
		t.Fatal(err)
	}
	for _, tr := range []string{dps.MQTT, dps.HTTPS} {
		t.Run(tr, func(t *testing.T) {
			cache := &countingCache{ClientSessionCache: tls.NewLRUClientSessionCache(4)}
			for i := range 2 {
				regID := fmt.Sprintf("cached-%s-%d", tr, i)
				cred, err := attest.FromGroupKey(groupKey, regID)
				if err != nil {
					t.Fatal(err)
				}
				cfg := clientCfg(srv, tr, regID, cred)
				cfg.SessionCache = cache
				cfg.CurvePreferences = []tls.CurveID{tls.X25519}
				if res, err := dps.Register(ctxT(t), cfg); err != nil || res.DeviceID != regID {
					t.Fatalf("%s: %+v %v", regID, res, err)
				}
			}
			if gets, hits, puts := cache.counts(); hits == 0 || puts == 0 {
				t.Fatalf("the second registration did not resume the first's session: %d gets, %d hits, %d puts", gets, hits, puts)
			}
		})
	}

	root, err := pki.NewCA("cache root", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.DPS().PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "x509cache",
		Attestation: &hubapi.AttestationMechanism{Type: "x509", X509: &hubapi.X509Attestation{SigningCertificates: &hubapi.X509Certificates{
			Primary: &hubapi.X509CertificateWithInfo{Certificate: string(root.CertPEM())}}}}}, true, ""); err != nil {
		t.Fatal(err)
	}
	cache := &countingCache{ClientSessionCache: tls.NewLRUClientSessionCache(4)}
	dir := t.TempDir()
	for i := range 2 {
		regID := fmt.Sprintf("x509-cached-%d", i)
		leaf, err := root.Issue(pki.LeafOptions{CommonName: regID, Client: true})
		if err != nil {
			t.Fatal(err)
		}
		keyPEM, err := pki.EncodeKey(leaf.PrivateKey.(*ecdsaKey))
		if err != nil {
			t.Fatal(err)
		}
		cf, kf := filepath.Join(dir, regID+".pem"), filepath.Join(dir, regID+".key")
		if err := os.WriteFile(cf, pki.EncodeCert(leaf.Leaf), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(kf, keyPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		cred, err := attest.FromX509Files(cf, kf, attest.FileOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cfg := clientCfg(srv, dps.MQTT, regID, cred)
		cfg.SessionCache = cache
		if res, err := dps.Register(ctxT(t), cfg); err != nil || res.DeviceID != regID {
			t.Fatalf("%s: %+v %v", regID, res, err)
		}
	}
	if gets, _, puts := cache.counts(); gets != 0 || puts != 0 {
		t.Fatalf("X.509 registrations used the shared session cache: %d gets, %d puts", gets, puts)
	}
}
