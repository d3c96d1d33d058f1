package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const keyB64 = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc="

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func write(t *testing.T, name, content string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

// parseFlags runs loadConfig as the run command would.
func parseFlags(t *testing.T, args ...string) (agent.Config, error) {
	t.Helper()
	var (
		f    runFlags
		cfg  agent.Config
		lerr error
	)
	cmd := &cobra.Command{Use: "run", SilenceUsage: true, SilenceErrors: true,
		RunE: func(c *cobra.Command, _ []string) error {
			cfg, lerr = loadConfig(c, &f)
			return nil
		}}
	bindRunFlags(cmd, &f)
	cmd.SetArgs(args)
	if err := cmd.Execute(); err != nil {
		return cfg, err
	}
	return cfg, lerr
}

func TestFlagsOverrideConfigFile(t *testing.T) {
	t.Setenv(EnvConnectionString, "")
	file := write(t, "agent.yaml", `
host: file-hub.example
deviceId: file-dev
auth:
  symmetricKeyFile: /etc/iothubby/key
telemetry:
  interval: 30s
log:
  level: warn
`, 0o644)
	cfg, err := parseFlags(t, "--config", file, "--device-id", "flag-dev", "--log-level", "debug", "--telemetry-interval", "1s")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Host != "file-hub.example" || cfg.DeviceID != "flag-dev" || cfg.Log.Level != "debug" ||
		cfg.Telemetry.Interval != time.Second || cfg.Auth.SymmetricKeyFile != "/etc/iothubby/key" {
		t.Errorf("merged %+v", cfg)
	}
	// A connection string from a flag replaces the file's identity.
	cfg, err = parseFlags(t, "--config", file, "--connection-string-file", "/run/cs")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Host != "" || cfg.DeviceID != "" || cfg.Auth.SymmetricKeyFile != "" || cfg.ConnectionStringFile != "/run/cs" {
		t.Errorf("identity not replaced: %+v", cfg)
	}
	// So does the environment variable, below flags.
	t.Setenv(EnvConnectionString, "HostName=h;DeviceId=env;SharedAccessKey="+keyB64)
	cfg, err = parseFlags(t, "--config", file)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.DeviceID != "" || !strings.Contains(cfg.ConnectionString, "DeviceId=env") {
		t.Errorf("env identity: %+v", cfg)
	}
}

func TestConfigErrorsExit2(t *testing.T) {
	t.Setenv(EnvConnectionString, "")
	for name, args := range map[string][]string{
		"missing file":                {"run", "--config", "/nonexistent/agent.yaml"},
		"no identity":                 {"run"},
		"service string":              {"run", "--connection-string", "HostName=h;SharedAccessKeyName=owner;SharedAccessKey=" + keyB64},
		"bad log format":              {"run", "--host", "h", "--device-id", "d", "--key", keyB64, "--log-format", "xml"},
		"unknown flag":                {"run", "--colour"},
		"fleet pprof without metrics": {"fleet", "--config", write(t, "fleet.yaml", "count: 1\n", 0o600), "--pprof"},
		"insecure key file": {"run", "--host", "h", "--device-id", "d",
			"--key-file", write(t, "key", keyB64, 0o644)},
		"two YAML documents": {"run", "--host", "h", "--device-id", "d", "--key", keyB64,
			"--config", write(t, "agent.yaml", "telemetry: {interval: 5s}\n---\ntelemetry: {interval: 1s}\n", 0o600)},
	} {
		var stderr syncBuffer
		err := run(context.Background(), args, &bytes.Buffer{}, &stderr)
		if err == nil {
			t.Errorf("%s: no error", name)
			continue
		}
		var out bytes.Buffer
		if code := exitCode(err, &out); code != exitConfig {
			t.Errorf("%s: exit %d (%v), want %d", name, code, err, exitConfig)
		}
		if strings.Contains(out.String(), keyB64) {
			t.Errorf("%s: message shows the key: %s", name, out.String())
		}
	}
}

func TestRunAgainstBroker(t *testing.T) {
	t.Setenv(EnvConnectionString, "")
	b := hubtest.NewBroker(t)
	ca := write(t, "ca.pem", string(b.CAPEM), 0o644)
	csFile := write(t, "cs", "HostName="+hubtest.Host+";DeviceId=dev1;SharedAccessKey="+keyB64+"\n", 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stderr syncBuffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"run", "--connection-string-file", csFile, "--address", b.Addr,
			"--ca-file", ca, "--log-format", "json", "--telemetry-interval", "50ms", "--shutdown-timeout", "2s"},
			&bytes.Buffer{}, &stderr)
	}()
	waitfor.True(t, "two telemetry messages", func() bool { return len(b.TelemetryMIDs()) >= 2 })
	cancel() // as SIGTERM would
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return")
	}
	var connected map[string]any
	sc := bufio.NewScanner(strings.NewReader(stderr.String()))
	for sc.Scan() {
		var line map[string]any
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("not a JSON line: %q", sc.Text())
		}
		if line["msg"] == hub.MsgConnected {
			connected = line
		}
	}
	if connected == nil || connected["device"] != "dev1" || connected["status"] != "Connected" || connected["reason"] != "Connection_Ok" {
		t.Errorf("connected line %v", connected)
	}
	if strings.Contains(stderr.String(), keyB64) || strings.Contains(stderr.String(), "sig=") {
		t.Error("a secret reached the log")
	}
	if b.ConnectRecords()[0].Username != hubtest.Host+"/dev1/?api-version=2021-04-12" {
		t.Errorf("username %q", b.ConnectRecords()[0].Username)
	}
}

func TestRunNotAuthorizedExit3(t *testing.T) {
	t.Setenv(EnvConnectionString, "")
	b := hubtest.NewBroker(t)
	b.With(func(h *hubtest.Hook) { h.RefuseAll = 5 })
	ca := write(t, "ca.pem", string(b.CAPEM), 0o644)
	keyFile := write(t, "key", keyB64, 0o600)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	err := run(ctx, []string{"run", "--host", hubtest.Host, "--address", b.Addr, "--device-id", "dev1",
		"--key-file", keyFile, "--ca-file", ca}, &bytes.Buffer{}, &syncBuffer{})
	var out bytes.Buffer
	if code := exitCode(err, &out); code != exitNotAuthorized {
		t.Fatalf("exit %d (%v), want %d", code, err, exitNotAuthorized)
	}
	if !strings.Contains(out.String(), "refused the device's credentials") {
		t.Errorf("message %q", out.String())
	}
	if ctx.Err() != nil {
		t.Error("run only returned at the test deadline")
	}
}

// The wedge test hook is refused (usage error, exit 2, saying why) unless $IOTHUBBY_TEST_HOOKS
// is 1, and with an unknown loop name even then.
func TestTestWedgeRefusedUnlessEnabled(t *testing.T) {
	args := []string{"run", "--host", "h", "--device-id", "d", "--key", keyB64, "--test-wedge", "telemetry"}
	for _, tc := range []struct{ env, loop, want string }{
		{"", "telemetry", EnvTestHooks + "=1"},
		{"yes", "telemetry", EnvTestHooks + "=1"},
		{"1", "network", `"network"`},
	} {
		t.Setenv(EnvTestHooks, tc.env)
		args[len(args)-1] = tc.loop
		err := run(context.Background(), args, &bytes.Buffer{}, &syncBuffer{})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("env %q loop %q: error %v, want one mentioning %s", tc.env, tc.loop, err, tc.want)
			continue
		}
		if code := exitCode(err, &bytes.Buffer{}); code != exitConfig {
			t.Errorf("env %q loop %q: exit %d, want %d", tc.env, tc.loop, code, exitConfig)
		}
	}
}

func TestFleetGCPercentUnlessGOGCIsSet(t *testing.T) {
	var set []int
	record := func(p int) int { set = append(set, p); return 100 }
	if got := setFleetGC(func(string) (string, bool) { return "", false }, record); got != FleetGOGC || len(set) != 1 || set[0] != FleetGOGC {
		t.Fatalf("without $GOGC: returned %d, set %v; want %d set once", got, set, FleetGOGC)
	}
	set = nil
	env := func(k string) (string, bool) { return "200", k == "GOGC" }
	if got := setFleetGC(env, record); got != -1 || len(set) != 0 {
		t.Fatalf("with $GOGC=200: returned %d, set %v; want -1 and nothing set", got, set)
	}
}
