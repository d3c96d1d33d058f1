package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func TestGoldenQuery(t *testing.T) {
	s := newShell(t)
	for i, id := range []string{"q1", "q2", "q3"} {
		s.exec("devices", "create", id)
		site := []string{"lab", "lab", "field"}[i]
		s.exec("twin", "update", id, "--tag", "site="+site)
	}
	s.golden("query-where", 0, "query", "SELECT * FROM devices WHERE tags.site = 'lab'")
	s.golden("query-json", 0, "query", "SELECT * FROM devices WHERE tags.site = 'field'", "-o", "json")
	s.golden("query-count", 0, "query", "SELECT COUNT() AS n FROM devices")
	s.golden("query-top", 0, "query", "SELECT * FROM devices", "--top", "2", "--page-size", "1")
	s.golden("query-none", 0, "query", "SELECT * FROM devices WHERE tags.site = 'moon'")
	s.golden("query-parse-error", 1, "query", "SELECT * FROM devices WHERE AND")
	s.golden("query-bad-page-size", 2, "query", "SELECT * FROM devices", "--page-size", "1000")
	s.golden("bulk-query-dry-run", 0, "bulk", "twin-update", "-q", "tags.site = 'lab'", "--desired", "x=1", "--dry-run")
	s.golden("bulk-query", 0, "bulk", "twin-update", "-q", "tags.site = 'lab'", "--desired", "x=1", "--parallel", "1")
	s.golden("bulk-query-parse-error", 1, "bulk", "twin-update", "-q", "tags.site = = 'lab'", "--desired", "x=1")
}

func TestGoldenImportExport(t *testing.T) {
	s := newShell(t)
	dir := t.TempDir()
	s.extra = []string{dir, "<tmp>"}
	s.golden("devices-import-dry-run", 0, "devices", "import", "--count", "3", "--pattern", `sim-{{printf "%05d" .Index}}`, "--dry-run")
	s.golden("devices-import-pattern", 0, "devices", "import", "--count", "205", "--pattern", `sim-{{printf "%05d" .Index}}`)
	s.golden("devices-import-partial", 3, "devices", "import", "--count", "2", "--start", "204", "--pattern", `sim-{{printf "%05d" .Index}}`)
	s.golden("devices-import-bad-pattern", 2, "devices", "import", "--count", "2", "--pattern", `sim {{.Index}}`)
	s.golden("devices-import-same-id", 2, "devices", "import", "--count", "2", "--pattern", `sim`)
	s.golden("devices-import-nothing", 2, "devices", "import")
	_, exported, code := s.exec("devices", "export", "-q", "deviceId = 'sim-00007' OR deviceId = 'sim-00008'")
	if code != 0 {
		t.Fatalf("export: exit %d", code)
	}
	s.golden("devices-export", 0, "devices", "export", "-q", "deviceId = 'sim-00007' OR deviceId = 'sim-00008'", "--parallel", "1")
	lines := strings.Split(strings.TrimSpace(exported), "\n")
	if len(lines) != 2 {
		t.Fatalf("export: %q", exported)
	}
	var first struct {
		ID             string
		Authentication struct{ SymmetricKey struct{ PrimaryKey string } }
	}
	if err := json.Unmarshal([]byte(lines[0]), &first); err != nil || first.ID != "sim-00007" || len(first.Authentication.SymmetricKey.PrimaryKey) != 44 {
		t.Fatalf("export line %q: %+v %v", lines[0], first, err)
	}
	// delete them, then bring them back from the export with the same keys
	file := filepath.Join(dir, "fleet.jsonl")
	if err := os.WriteFile(file, []byte(exported), 0o600); err != nil {
		t.Fatal(err)
	}
	s.golden("devices-import-delete", 0, "devices", "import", "--file", file, "--mode", "delete")
	s.golden("devices-import-file", 0, "devices", "import", "--file", file)
	_, keys, _ := s.exec("devices", "keys", "show", "sim-00007", "-o", "json")
	if !strings.Contains(keys, first.Authentication.SymmetricKey.PrimaryKey) {
		t.Fatalf("re-imported device has other keys: %s", keys)
	}
	bad := filepath.Join(dir, "bad.jsonl")
	if err := os.WriteFile(bad, []byte("{\"id\":\"ok-1\"}\n{\"id\": 5}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.golden("devices-import-bad-file", 2, "devices", "import", "--file", bad)
}

func TestGoldenJobs(t *testing.T) {
	s := newShell(t)
	for _, id := range []string{"j1", "j2", "j3"} {
		s.exec("devices", "create", id)
	}
	s.exec("twin", "update", "j1", "--tag", "ring=canary")
	s.exec("twin", "update", "j2", "--tag", "ring=canary")
	// --wait's progress lines before the last depend on when the job is polled: left out.
	jobProgressFree(s, "jobs-create-twin-wait", 0, "jobs", "create", "job-twin", "--type", "twin-update", "-q", "tags.ring = 'canary'", "--desired", "fw=\"2.0\"", "--wait", "--poll", "100ms")
	s.golden("jobs-show", 0, "jobs", "show", "job-twin", "-o", "json")
	jobProgressFree(s, "jobs-create-method-wait", 3, "jobs", "create", "job-reboot", "--type", "method", "-q", "*", "--method-name", "reboot", "--method-timeout", "5", "--wait", "--poll", "100ms")
	s.golden("jobs-create-later", 0, "jobs", "create", "job-later", "--type", "twin-update", "-q", "*", "--tag", "x=1", "--start", "2099-01-01T00:00:00Z")
	s.golden("jobs-cancel", 0, "jobs", "cancel", "job-later")
	s.golden("jobs-list", 0, "jobs", "list")
	s.golden("jobs-list-filtered", 0, "jobs", "list", "--type", "method", "-o", "json")
	s.golden("jobs-watch-finished", 0, "jobs", "watch", "job-twin")
	s.golden("jobs-show-unknown", 1, "jobs", "show", "nope")
	s.golden("jobs-create-bad-type", 2, "jobs", "create", "j", "--type", "export", "-q", "*")
	s.golden("jobs-create-no-query", 2, "jobs", "create", "j", "--type", "twin-update", "--desired", "a=1")
	s.golden("jobs-create-bad-patch", 2, "jobs", "create", "j", "--type", "twin-update", "-q", "*", "--patch", "[]")
	s.golden("jobs-create-bad-query", 1, "jobs", "create", "j-bad", "--type", "twin-update", "-q", "tags.x = = 1", "--desired", "a=1")
}

func TestGoldenRollout(t *testing.T) {
	s := newShell(t)
	for _, id := range []string{"c1", "c2", "c3", "c4"} {
		s.exec("devices", "create", id)
		s.exec("twin", "update", id, "--tag", "ring=prod", "--desired", "fw=\"1.0\"")
	}
	s.exec("twin", "update", "c4", "--tag", "canary=true")
	s.golden("rollout-dry-run", 0, "rollout", "start", "plan", "-q", "tags.ring = 'prod'", "--canary", "tags.canary = true", "--desired", "fw=\"2.0\"", "--steps", "1,50%,100%", "--dry-run")
	s.golden("rollout-dry-run-json", 0, "rollout", "start", "plan", "-q", "*", "--desired", "fw=\"2.0\"", "--steps", "2,100%", "--dry-run", "-o", "json")
	s.golden("rollout-dry-run-left-nothing", 1, "rollout", "status", "plan")
	// nobody is connected, so nobody acknowledges: timeouts tolerated up to --max-failure
	s.golden("rollout-start-tolerated", 0, "rollout", "start", "tol", "-q", "tags.ring = 'prod'", "--canary", "tags.canary = true", "--desired", "fw=\"2.0\"",
		"--steps", "1,100%", "--max-failure", "100%", "--ack-timeout", "300ms", "--poll", "100ms", "--parallel", "1")
	s.golden("rollout-status-completed", 0, "rollout", "status", "tol")
	s.golden("rollout-start-again", 1, "rollout", "start", "tol", "-q", "*", "--desired", "fw=3")
	s.golden("rollout-start-stops", 3, "rollout", "start", "strict", "-q", "tags.ring = 'prod'", "--desired", "fw=\"3.0\"",
		"--steps", "2,100%", "--max-failure", "0", "--ack-timeout", "300ms", "--poll", "100ms", "--revert", "--parallel", "1")
	s.golden("rollout-status-reverted-json", 0, "rollout", "status", "strict", "-o", "json")
	s.golden("rollout-resume-finished", 3, "rollout", "resume", "strict")
	s.golden("rollout-status-unknown", 1, "rollout", "status", "nope")
	s.golden("rollout-bad-steps", 2, "rollout", "start", "x", "-q", "*", "--desired", "a=1", "--steps", "50%,10%")
	s.golden("rollout-bad-name", 2, "rollout", "start", "a.b", "-q", "*", "--desired", "a=1")
	s.golden("rollout-no-desired", 2, "rollout", "start", "x", "-q", "*")
	fw := func(id string) string {
		t.Helper()
		_, out, _ := s.exec("twin", "show", id, "-o", "json")
		var tw struct {
			Properties struct{ Desired map[string]any }
		}
		if err := json.Unmarshal([]byte(out), &tw); err != nil {
			t.Fatalf("twin %s: %v", id, err)
		}
		return fmt.Sprint(tw.Properties.Desired["fw"])
	}
	// strict's revert put back what its devices had before it (tol's 2.0); c3 and c4 were not in it
	for id, want := range map[string]string{"c1": "2.0", "c2": "2.0", "c3": "2.0", "c4": "2.0"} {
		if got := fw(id); got != want {
			t.Errorf("after strict's revert, %s has fw %s, want %s", id, got, want)
		}
	}
	s.golden("rollout-revert", 0, "rollout", "revert", "tol", "--parallel", "1")
	s.golden("rollout-revert-again", 0, "rollout", "revert", "tol")
	for _, id := range []string{"c1", "c2", "c3", "c4"} {
		if got := fw(id); got != "1.0" {
			t.Errorf("after tol's revert, %s has fw %s, want 1.0", id, got)
		}
	}
	// the record devices are not targets of later queries
	s.golden("bulk-query-skips-records", 0, "bulk", "twin-update", "-q", "*", "--tag", "y=1", "--dry-run")
}

// jobPartialProgress is a --wait progress line before the job is done (n of m with n < m is
// matched loosely: any line whose two counts differ).
var jobPartialProgress = regexp.MustCompile(`(?m)^job [^:]+: (\d+)/(\d+) done, \d+ failed\n`)

// jobProgressFree runs a command like shell.golden, leaving out the progress lines that came
// before the job was done: how many there are depends on when the job was polled.
func jobProgressFree(s *shell, name string, wantCode int, args ...string) {
	s.t.Helper()
	tr, _, code := s.exec(args...)
	if code != wantCode {
		s.t.Errorf("%s: exit %d, want %d\n%s", name, code, wantCode, tr)
	}
	tr = jobPartialProgress.ReplaceAllStringFunc(tr, func(line string) string {
		m := jobPartialProgress.FindStringSubmatch(line)
		if m[1] != m[2] {
			return ""
		}
		return line
	})
	golden(s.t, name, tr, append([]string{s.srv.StateDir(), "<state>"}, s.extra...)...)
}
