package agent_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/dps"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
)

func TestDPSConfigErrors(t *testing.T) {
	base := func(c *agent.Config) {
		c.StateDir = t.TempDir()
		c.DPS.IDScope = "0ne00000001"
		c.DPS.RegistrationID = "r1"
	}
	cases := map[string]func(c *agent.Config){
		"no credential":   func(c *agent.Config) {},
		"no state dir":    func(c *agent.Config) { c.StateDir = ""; c.DPS.GroupKey = keyB64 },
		"two credentials": func(c *agent.Config) { c.DPS.GroupKey = keyB64; c.Auth.SymmetricKey = keyB64 },
		"with connection str": func(c *agent.Config) {
			c.DPS.GroupKey = keyB64
			c.ConnectionString = "HostName=h;DeviceId=d;SharedAccessKey=" + keyB64
		},
		"with host":            func(c *agent.Config) { c.DPS.GroupKey = keyB64; c.Host = "h" },
		"bad transport":        func(c *agent.Config) { c.DPS.GroupKey = keyB64; c.DPS.Transport = "amqp" },
		"tpm":                  func(c *agent.Config) { c.DPS.GroupKey = keyB64; c.DPS.Attestation = "tpm" },
		"x509 without files":   func(c *agent.Config) { c.DPS.GroupKey = keyB64; c.DPS.Attestation = "x509" },
		"bad group key":        func(c *agent.Config) { c.DPS.GroupKey = "***" },
		"bad registration id":  func(c *agent.Config) { c.DPS.GroupKey = keyB64; c.DPS.RegistrationID = "a/b" },
		"no scope":             func(c *agent.Config) { c.DPS.GroupKey = keyB64; c.DPS.IDScope = ""; c.DPS.GlobalEndpoint = "x" },
		"group key readable":   func(c *agent.Config) { c.DPS.GroupKeyFile = writeFile(t, "gk", keyB64, 0o644) },
		"negative reprovision": func(c *agent.Config) { c.DPS.GroupKey = keyB64; c.DPS.ReprovisionAfterFailures = -1 },
	}
	for name, mutate := range cases {
		c := agent.Default()
		base(&c)
		mutate(&c)
		_, err := agent.New(c, nil)
		if !errors.Is(err, agent.ErrConfig) {
			t.Errorf("%s: err = %v, want ErrConfig", name, err)
			continue
		}
		if strings.Contains(err.Error(), keyB64) {
			t.Errorf("%s: error shows the key: %v", name, err)
		}
	}
}

// The agent provisions through hubsim's DPS, caches the result, connects, and on a restart uses
// the cache; --reprovision registers again.
func TestDeviceProvisionsThroughDPS(t *testing.T) {
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", DPSRetryAfter: -1}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	gk := registry.GenerateKey()
	if _, err := srv.DPS().PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "g",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: gk}}}, true, ""); err != nil {
		t.Fatal(err)
	}
	ep := srv.Endpoints()
	state := t.TempDir()
	run := func(reprovision bool, want string) {
		t.Helper()
		c := agent.Default()
		c.StateDir = state
		c.TLS.CAFile, c.TLS.ServerName = ep.CAFile, "localhost"
		c.Telemetry.Interval = 0
		c.DPS = agent.DPSConfig{GlobalEndpoint: ep.MQTTAddress, IDScope: ep.IDScope, RegistrationID: "agent-dps-1", GroupKey: gk,
			HubAddress: ep.MQTTAddress, Reprovision: reprovision}
		core, logs := observer.New(zap.DebugLevel)
		d, err := agent.New(c, zap.New(core))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- d.Run(ctx) }()
		waitLog(t, logs, want)
		waitLog(t, logs, hub.MsgConnected)
		d.Close()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	run(false, dps.MsgProvisioned)
	if _, err := dps.LoadCache(state, ep.IDScope, "agent-dps-1"); err != nil {
		t.Fatalf("no cache: %v", err)
	}
	run(false, agent.MsgUsingCachedProvisioning)
	if n := srv.DPS().Stats().Registrations; n != 1 {
		t.Fatalf("registrations %d", n)
	}
	run(true, dps.MsgProvisioned)
	if n := srv.DPS().Stats().Registrations; n != 2 {
		t.Fatalf("registrations after --reprovision %d", n)
	}
}

// With hubsim as DPS and the test broker as the assigned hub: the reprovision direct method and
// N consecutive failed connection attempts both make the agent provision again.
func TestReprovisionByMethodAndByFailures(t *testing.T) {
	b := hubtest.NewBroker(t)
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), HostName: hubtest.Host,
		MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", DPSRetryAfter: -1}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	// An individual enrollment whose key is the one the test broker checks.
	if _, err := srv.DPS().PutEnrollment(hubapi.Enrollment{RegistrationID: "rp-1",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: b.Key.Base64()}}}, false, ""); err != nil {
		t.Fatal(err)
	}
	ep := srv.Endpoints()
	hubsimCA, err := os.ReadFile(ep.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	c := agent.Default()
	c.StateDir = t.TempDir()
	c.TLS.CAFile = writeFile(t, "cas.pem", string(hubsimCA)+string(b.CAPEM), 0o644)
	c.Telemetry.Interval = 0
	c.Connection.BackoffMin, c.Connection.BackoffMax = time.Second, 2*time.Second
	c.Auth.SymmetricKey = b.Key.Base64()
	c.DPS = agent.DPSConfig{GlobalEndpoint: ep.MQTTAddress, IDScope: ep.IDScope, RegistrationID: "rp-1",
		HubAddress: b.Addr, ReprovisionAfterFailures: 2}
	core, logs := observer.New(zap.DebugLevel)
	d, err := agent.New(c, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	waitCount := func(msg string, n int) {
		t.Helper()
		waitfor.True(t, fmt.Sprintf("%d %q log lines", n, msg), func() bool { return logs.FilterMessage(msg).Len() >= n })
	}
	waitCount(hub.MsgConnected, 1)
	b.WaitEvent(t, "connected")
	b.SendTo(b.Client("rp-1"), "$iothub/methods/POST/reprovision/?$rid=7", []byte(`{}`))
	waitLog(t, logs, agent.MsgReprovisionRequested)
	waitCount(dps.MsgProvisioned, 2)
	waitCount(hub.MsgConnected, 2)
	if n := srv.DPS().Stats().Registrations; n != 2 {
		t.Fatalf("registrations after the method: %d", n)
	}
	b.With(func(h *hubtest.Hook) { h.Refuse = []byte{3, 3, 3, 3} })
	b.Drop("rp-1")
	waitCount(dps.MsgProvisioned, 3)
	b.With(func(h *hubtest.Hook) { h.Refuse = nil })
	waitCount(hub.MsgConnected, 3)
	d.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := srv.DPS().Stats().Registrations; n != 3 {
		t.Fatalf("registrations after failures: %d", n)
	}
}
