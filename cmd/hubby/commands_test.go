package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim"
)

// shell runs hubby commands in-process against one hubsim and compares each transcript with a
// golden file.
type shell struct {
	t     *testing.T
	srv   *hubsim.Server
	st    string
	extra []string // more (old, new) pairs to scrub
}

// unstable matches what differs between runs beyond golden's own list.
var unstable = []struct {
	re   *regexp.Regexp
	with string
}{
	{regexp.MustCompile(`"generationId": "[0-9]+"`), `"generationId": "<gen>"`},
	{regexp.MustCompile(`"etag": "(\\"|[^"])*"`), `"etag": "<etag>"`},
}

func newShell(t *testing.T) *shell {
	t.Helper()
	t.Setenv("IOTHUB_CONNECTION_STRING", "")
	t.Setenv("IOTHUB_DPS_CONNECTION_STRING", "")
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", DPSRetryAfter: -1}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return &shell{t: t, srv: srv, st: "--hubsim-state=" + srv.StateDir()}
}

// exec runs hubby with args (after the state flag) and returns the transcript: the command,
// its stdout, its stderr, and the exit status with the error line main would print.
func (s *shell) exec(args ...string) (transcript string, stdout string, code int) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out, errOut bytes.Buffer
	err := run(ctx, append([]string{s.st}, args...), &out, &errOut)
	code = exitCode(err, false)
	var b strings.Builder
	fmt.Fprintf(&b, "$ hubby %s\n%s", strings.Join(args, " "), out.String())
	if errOut.Len() > 0 {
		fmt.Fprintf(&b, "--- stderr\n%s", errOut.String())
	}
	fmt.Fprintf(&b, "--- exit %d", code)
	if err != nil {
		fmt.Fprintf(&b, ": hubby: %s", oneLine(err))
	}
	b.WriteString("\n")
	return b.String(), out.String(), code
}

// golden runs a command, checks its exit status and compares its transcript with
// testdata/golden/<name>.golden.
func (s *shell) golden(name string, wantCode int, args ...string) string {
	s.t.Helper()
	tr, out, code := s.exec(args...)
	if code != wantCode {
		s.t.Errorf("%s: exit %d, want %d\n%s", name, code, wantCode, tr)
	}
	for _, u := range unstable {
		tr = u.re.ReplaceAllString(tr, u.with)
	}
	golden(s.t, name, tr, append([]string{s.srv.StateDir(), "<state>"}, s.extra...)...)
	return out
}

func TestGoldenDevices(t *testing.T) {
	s := newShell(t)
	s.golden("devices-create", 0, "devices", "create", "d1")
	s.golden("devices-create-exists", 1, "devices", "create", "d1")
	s.golden("devices-create-if-missing", 0, "device", "create", "d1", "--if-missing")
	s.golden("devices-create-x509", 0, "devices", "create", "d2", "--disabled", "--primary-thumbprint", strings.Repeat("ab", 20), "-o", "json")
	s.golden("devices-create-bad-key", 2, "devices", "create", "d3", "--primary-key", "not base64!")
	s.golden("devices-show", 0, "devices", "show", "d1", "-o", "json")
	s.golden("device-get-alias", 0, "device", "get", "d1")
	s.golden("devices-show-unknown", 1, "devices", "show", "nobody")
	s.golden("devices-list", 0, "devices", "list")
	s.golden("devices-list-json-one", 0, "devices", "list", "--top", "1", "-o", "json")
	s.golden("devices-update", 0, "devices", "update", "d1", "--status", "disabled", "--status-reason", "maintenance")
	s.golden("devices-update-nothing", 2, "devices", "update", "d1")
	s.golden("devices-update-bad-status", 2, "devices", "update", "d1", "--status", "off")
	s.golden("devices-connection-string", 0, "device", "connection-string", "d1")
	s.golden("devices-connection-string-x509", 0, "devices", "connection-string", "d2", "-o", "json")

	before := s.golden("devices-keys-show", 0, "devices", "keys", "show", "d1", "-o", "json")
	after := s.golden("devices-keys-regenerate", 0, "devices", "keys", "regenerate", "d1", "--key", "primary", "-o", "json")
	pk := func(s string) string { i := strings.Index(s, `"primaryKey"`); return s[i : i+60] }
	sk := func(s string) string { i := strings.Index(s, `"secondaryKey"`); return s[i : i+62] }
	if pk(before) == pk(after) || sk(before) != sk(after) {
		t.Errorf("regenerate primary: before %s after %s", before, after)
	}
	swapped := s.golden("devices-keys-swap", 0, "devices", "keys", "regenerate", "d1", "--key", "swap", "-o", "json")
	if !strings.Contains(swapped, strings.TrimPrefix(sk(after), `"secondaryKey"`)[:20]) {
		t.Errorf("swap: %s", swapped)
	}
	s.golden("devices-keys-x509", 1, "devices", "keys", "show", "d2")
	s.golden("devices-keys-bad-kind", 2, "devices", "keys", "regenerate", "d1", "--key", "tertiary")
	s.golden("devices-delete", 0, "devices", "delete", "d2")
	s.golden("devices-delete-unknown", 1, "devices", "delete", "d2")
	s.golden("usage-missing-arg", 2, "devices", "show")
	s.golden("usage-unknown-command", 2, "devices", "frobnicate")
	s.golden("usage-bad-output", 2, "devices", "list", "-o", "yaml")
}

func TestGoldenTwin(t *testing.T) {
	s := newShell(t)
	s.exec("devices", "create", "t1")
	s.golden("twin-update", 0, "twin", "update", "t1", "--desired", "interval=5", "--tag", "site=\"lab\"")
	s.golden("twin-show", 0, "twin", "show", "t1")
	s.golden("twin-get-alias-json", 0, "twin", "get", "t1", "-o", "json")
	s.golden("twin-update-not-object", 2, "twin", "update", "t1", "--patch", `[1,2]`)
	s.golden("twin-update-not-json", 2, "twin", "update", "t1", "--patch", `{"tags":`)
	s.golden("twin-update-unknown-device", 1, "twin", "update", "nobody", "--desired", "x=1")
	s.golden("twin-replace", 0, "twin", "replace", "t1", "--patch", `{"properties":{"desired":{"only":true}}}`)
}

func TestGoldenMethods(t *testing.T) {
	s := newShell(t)
	s.exec("devices", "create", "m1")
	s.golden("invoke-method-offline", 1, "invoke-method", "m1", "reboot", "--payload", `{"delay":1}`)
	s.golden("method-invoke-alias-offline", 1, "method", "invoke", "m1", "reboot")
	s.golden("invoke-method-bad-payload", 2, "invoke-method", "m1", "reboot", "--payload", `{nope`)
	s.golden("invoke-method-unknown-device", 1, "invoke-method", "nobody", "reboot")
}

func TestGoldenDPS(t *testing.T) {
	s := newShell(t)
	s.golden("dps-enrollment-create", 0, "dps", "enrollment", "create", "reg-1", "--primary-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "--secondary-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "--initial-twin-tags", `{"site":"lab"}`)
	s.golden("dps-enrollment-show", 0, "dps", "enrollment", "show", "reg-1", "-o", "json")
	s.golden("dps-enrollment-update", 0, "dps", "enrollment", "update", "reg-1", "--provisioning-status", "disabled", "--device-id", "dev-of-reg-1")
	s.golden("dps-enrollment-list", 0, "dps", "enrollment", "list")
	s.golden("dps-enrollment-bad-tags", 2, "dps", "enrollment", "create", "reg-2", "--initial-twin-tags", `"lab"`)
	s.golden("dps-enrollment-tpm-no-ek", 2, "dps", "enrollment", "create", "reg-2", "--attestation-type", "tpm")
	s.golden("dps-enrollment-delete", 0, "dps", "enrollment", "delete", "reg-1")
	s.golden("dps-enrollment-show-unknown", 1, "dps", "enrollment", "show", "reg-1")
	s.golden("dps-group-create", 0, "dps", "enrollment-group", "create", "grp-1", "--primary-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "--secondary-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
	s.golden("dps-group-list", 0, "dps", "enrollment-group", "list", "-o", "json")
	s.golden("dps-group-compute-key", 0, "dps", "enrollment-group", "compute-device-key", "dev-7", "--key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
	s.golden("dps-group-show", 0, "dps", "enrollment-group", "show", "grp-1")
	s.golden("dps-group-update", 0, "dps", "enrollment-group", "update", "grp-1", "--provisioning-status", "disabled", "--initial-twin-properties", `{"interval":5}`, "-o", "json")
	s.golden("dps-group-update-stale-etag", 1, "dps", "enrollment-group", "update", "grp-1", "--provisioning-status", "enabled", "--etag", `"stale"`)
	s.golden("dps-group-delete", 0, "dps", "enrollment-group", "delete", "grp-1")
	s.golden("dps-group-list-empty", 0, "dps", "enrollment-groups", "list")
	s.golden("dps-group-tpm", 2, "dps", "enrollment-group", "create", "grp-2", "--attestation-type", "tpm")
	s.golden("dps-registration-unknown", 1, "dps", "registration", "show", "nobody")
}

func TestGoldenBulkByIDs(t *testing.T) {
	s := newShell(t)
	for _, id := range []string{"b1", "b2", "b3"} {
		s.exec("devices", "create", id)
	}
	dir := t.TempDir()
	s.extra = []string{dir, "<tmp>"}
	ids := filepath.Join(dir, "ids.txt")
	if err := os.WriteFile(ids, []byte("# lab devices\nb1\nb2\n\n{\"deviceId\":\"b3\"}\nb1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	s.golden("bulk-twin-update-dry-run", 0, "bulk", "twin-update", "--ids-file", ids, "--desired", "interval=7", "--dry-run")
	s.golden("bulk-twin-update", 0, "bulk", "twin-update", "--ids-file", ids, "--desired", "interval=7", "--parallel", "1", "--rate", "100")
	s.golden("bulk-twin-update-partial", 3, "bulk", "twin-update", "b1", "ghost", "--tag", "ring=1", "--parallel", "1", "-o", "json")
	s.golden("bulk-invoke-offline", 3, "bulk", "invoke-method", "reboot", "b1", "b2", "--parallel", "1")
	s.golden("bulk-set-status", 0, "bulk", "set-status", "disabled", "b2", "b3", "--parallel", "1")
	s.golden("bulk-delete-needs-yes", 2, "bulk", "delete", "b3")
	s.golden("bulk-delete", 0, "bulk", "delete", "b3", "--yes", "--parallel", "1")
	s.golden("bulk-no-targets", 2, "bulk", "twin-update", "--desired", "a=1")
	s.golden("bulk-two-targets", 2, "bulk", "twin-update", "b1", "--ids-file", ids, "--desired", "a=1")
	s.golden("bulk-bad-parallel", 2, "bulk", "delete", "b1", "--yes", "--parallel", "0")
	tw, _, _ := s.exec("twin", "show", "b2")
	if !strings.Contains(tw, `"interval":7`) {
		t.Errorf("bulk update did not reach b2: %s", tw)
	}
}

func TestGoldenCompletion(t *testing.T) {
	s := newShell(t)
	for _, sh := range []string{"bash", "zsh", "fish"} {
		_, out, code := s.exec("completion", sh)
		if code != 0 || !strings.Contains(out, "hubby") {
			t.Fatalf("completion %s: exit %d", sh, code)
		}
		first := strings.SplitN(out, "\n", 2)[0]
		golden(t, "completion-"+sh, first+"\n")
	}
}

// policyString is a connection string for one of hubsim's shared access policies.
func (s *shell) policyString(name string) string {
	s.t.Helper()
	for _, p := range s.srv.Registry().Policies() {
		if p.KeyName == name {
			return "HostName=" + s.srv.Endpoints().HubHostName + ";SharedAccessKeyName=" + name + ";SharedAccessKey=" + p.PrimaryKey
		}
	}
	s.t.Fatalf("no policy %s", name)
	return ""
}

// runPlain runs hubby without --hubsim-state.
func runPlain(t *testing.T, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errOut bytes.Buffer
	err := run(ctx, args, &out, &errOut)
	return out.String(), err
}

func TestGoldenRights(t *testing.T) {
	s := newShell(t)
	s.exec("devices", "create", "r1")
	ep := s.srv.Endpoints()
	ro := s.policyString("registryRead")
	conn := []string{"--connection-string", ro, "--address", ep.HTTPSAddress, "--ca-file", ep.CAFile}
	st := s.st
	s.st = "--timeout=30s" // no --hubsim-state: the connection string decides
	defer func() { s.st = st }()
	s.golden("rights-registry-read-lists", 0, append(conn, "devices", "show", "r1")...)
	s.golden("rights-registry-read-twin", 1, append(conn, "twin", "update", "r1", "--desired", "a=1")...)
	s.golden("rights-registry-read-create", 1, append(conn, "devices", "create", "r2")...)
	s.golden("rights-device-string", 1, "--connection-string", "HostName=h;DeviceId=d;SharedAccessKey=AAAA", "devices", "list")
	s.golden("rights-both-given", 2, "--connection-string", ro, "--hubsim-state", "/nonexistent", "devices", "list")
}

// The hub comes from the flag, else the environment, else the config file.
func TestConnectionPrecedence(t *testing.T) {
	s := newShell(t)
	s.exec("devices", "create", "p1")
	ep := s.srv.Endpoints()
	owner, ro := s.policyString("iothubowner"), s.policyString("registryRead")
	dir := t.TempDir()
	cfg := filepath.Join(dir, "hubby.yaml")
	write := func(cs string) {
		t.Helper()
		body := fmt.Sprintf("connectionString: %q\naddress: %q\ncaFile: %q\n", cs, ep.HTTPSAddress, ep.CAFile)
		if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// file only (the default path, under XDG_CONFIG_HOME)
	t.Setenv("XDG_CONFIG_HOME", dir)
	if err := os.MkdirAll(filepath.Join(dir, "hubby"), 0o700); err != nil {
		t.Fatal(err)
	}
	cfgDefault := filepath.Join(dir, "hubby", "config.yaml")
	write(owner)
	if err := os.Rename(cfg, cfgDefault); err != nil {
		t.Fatal(err)
	}
	if out, err := runPlain(t, "twin", "show", "p1"); err != nil || !strings.Contains(out, "p1") {
		t.Fatalf("default config file: %q %v", out, err)
	}
	// the environment beats the file: registryRead cannot read twins
	t.Setenv("IOTHUB_CONNECTION_STRING", ro)
	if _, err := runPlain(t, "twin", "show", "p1"); err == nil || !strings.Contains(oneLine(err), `policy "registryRead" lacks ServiceConnect`) {
		t.Fatalf("env over file: %v", err)
	}
	// the flag beats the environment
	if out, err := runPlain(t, "--connection-string", owner, "twin", "show", "p1"); err != nil || !strings.Contains(out, "p1") {
		t.Fatalf("flag over env: %q %v", out, err)
	}
	// --config names another file; a missing one is an error, a malformed one too
	t.Setenv("IOTHUB_CONNECTION_STRING", "")
	write(owner)
	if out, err := runPlain(t, "--config", cfg, "twin", "show", "p1"); err != nil || !strings.Contains(out, "p1") {
		t.Fatalf("--config: %q %v", out, err)
	}
	if _, err := runPlain(t, "--config", filepath.Join(dir, "missing.yaml"), "devices", "list"); err == nil || !strings.Contains(err.Error(), "config file") {
		t.Fatalf("missing --config: %v", err)
	}
	if err := os.WriteFile(cfg, []byte("connectionString: [\nunknownKey: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := runPlain(t, "--config", cfg, "devices", "list"); err == nil || !strings.Contains(err.Error(), "config file") {
		t.Fatalf("malformed --config: %v", err)
	}
}

func TestExitCodes(t *testing.T) {
	for _, c := range []struct {
		err         error
		interrupted bool
		want        int
	}{
		{nil, false, exitOK},
		{fmt.Errorf("boom"), false, exitError},
		{usageError{fmt.Errorf("bad flag")}, false, exitUsage},
		{fmt.Errorf("wrapped: %w", partialError{failed: 1, total: 2}), false, exitPartial},
		{context.Canceled, false, exitSignal},
		{fmt.Errorf("request: %w", context.DeadlineExceeded), true, exitSignal},
		{fmt.Errorf("request: %w", context.DeadlineExceeded), false, exitError},
	} {
		if got := exitCode(c.err, c.interrupted); got != c.want {
			t.Errorf("exitCode(%v, %v) = %d, want %d", c.err, c.interrupted, got, c.want)
		}
	}
}

func TestGoldenPKI(t *testing.T) {
	s := newShell(t)
	dir := filepath.Join(t.TempDir(), "pki")
	s.extra = []string{dir, "<pki>"}
	s.golden("pki-enroll", 0, "pki", "--dir", dir, "--devices", "x-1,x-2", "--enroll", "--group-id", "lab-pki")
	s.golden("pki-bad-id", 1, "pki", "--dir", dir, "--devices", "bad/id")
	s.golden("pki-no-dir", 1, "pki")
	s.golden("pki-enrolled-group", 0, "dps", "enrollment-group", "list")
}
