//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/iothubby/iothubby/pkg/twinsync"
)

// hubbyExit runs the hubby binary against h to its end and returns its output (stdout and
// stderr) and exit status.
func hubbyExit(t *testing.T, h *hub, args ...string) (string, int) {
	t.Helper()
	out, err := hubbyRun(t, h, args...)
	return out, exitCode(err)
}

func rawContains(parts ...string) func(map[string]any) bool {
	return func(m map[string]any) bool {
		s, _ := m["msg"].(string)
		for _, p := range parts {
			if !strings.Contains(s, p) {
				return false
			}
		}
		return true
	}
}

// A canary rollout over real agents: the first steps are acknowledged, hubby is killed (SIGKILL)
// while a step waits for a slow device, a new hubby resumes from the hub's record without
// patching anyone twice, and the last step's rejections stop the rollout and revert it.
func TestHubbyCanaryRolloutStopsOnRejectsAndResumesAfterKill(t *testing.T) {
	h := newHub(t)
	behaviour := map[string]string{
		"ro-1": "accept",
		"ro-2": "accept",
		"ro-3": "delay\n      delay: 3s", // 202 at once, 200 three seconds later
		"ro-4": "reject",
		"ro-5": "reject",
	}
	ids := []string{"ro-1", "ro-2", "ro-3", "ro-4", "ro-5"}
	createDevice(t, h, "bystander") // not in the query: never touched
	for _, id := range ids {
		d := createDevice(t, h, id)
		// fw 1.0 everywhere, the value a revert must bring back
		if _, err := h.svc.UpdateTwin(ctxT(t), id, map[string]any{"tags": map[string]any{"ring": "prod"},
			"properties": map[string]any{"desired": map[string]any{"fw": "1.0"}}}, "*"); err != nil {
			t.Fatal(err)
		}
		a := twinAgent(t, h, connString(h, id, d.Authentication.SymmetricKey.PrimaryKey), t.TempDir(),
			fmt.Sprintf("twin:\n  properties:\n    fw:\n      action: %s\n", behaviour[id]))
		a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))
	}

	start := []string{"rollout", "start", "fw2", "-q", "tags.ring = 'prod'", "--desired", `fw="2.0"`,
		"--steps", "1,3,5", "--max-failure", "20%", "--revert", "--poll", "200ms", "--ack-timeout", "60s"}
	p := startProc(t, "hubby", append([]string{"--hubsim-state", h.state}, start...)...)
	p.await(0, "step 1 acknowledged", rawContains("step 1/3: 1/1 acknowledged"))
	p.await(0, "step 2 waiting", rawContains("step 2/3:", "pending"))
	p.kill() // SIGKILL: no chance to write anything more

	out, code := hubbyExit(t, h, "-o", "json", "rollout", "status", "fw2")
	var st struct {
		Rollout struct {
			State string
			Step  int
		}
		Targets int
		Devices []struct {
			DeviceID string
			Step     int
			State    string
		}
	}
	if code != 0 || json.Unmarshal([]byte(firstJSON(out)), &st) != nil {
		t.Fatalf("status after the kill: exit %d\n%s", code, out)
	}
	if st.Rollout.State != "running" || st.Rollout.Step != 1 || st.Targets != 5 || len(st.Devices) != 3 {
		t.Fatalf("status after the kill: %+v", st)
	}
	if out, code := hubbyExit(t, h, "rollout", "start", "fw2", "-q", "*", "--desired", "fw=3"); code != 1 || !strings.Contains(out, "already exists") {
		t.Fatalf("second start of the same rollout: exit %d\n%s", code, out)
	}

	out, code = hubbyExit(t, h, "rollout", "resume", "fw2", "--poll", "200ms")
	if code != 3 {
		t.Fatalf("resume: exit %d, want 3 (stopped)\n%s", code, out)
	}
	for _, want := range []string{"resuming at step 2/3", "step 2/3: 2/2 acknowledged", "step 3/3 (5): 2 device(s) to patch, 3 already in the rollout",
		"more than --max-failure 20%", "reverted 5 device(s)", "state:     reverted"} {
		if !strings.Contains(out, want) {
			t.Errorf("resume output lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(out, "ro-4 fw: ac 400") && !strings.Contains(out, "ro-5 fw: ac 400") {
		t.Errorf("the stop does not say which device refused:\n%s", out)
	}

	wantStep := map[string]float64{"ro-1": 0, "ro-2": 1, "ro-3": 1, "ro-4": 2, "ro-5": 2}
	for _, id := range ids {
		tw, err := h.svc.GetTwin(ctxT(t), id)
		if err != nil {
			t.Fatal(err)
		}
		mark, _ := tw.Tags["hubbyRollouts"].(map[string]any)["fw2"].(map[string]any)
		if mark["step"] != wantStep[id] || mark["reverted"] != true {
			t.Errorf("%s: mark %v, want step %v and reverted", id, mark, wantStep[id])
		}
		if tw.Properties.Desired["fw"] != "1.0" {
			t.Errorf("%s: desired fw %v after the revert, want 1.0", id, tw.Properties.Desired["fw"])
		}
	}
	tw, err := h.svc.GetTwin(ctxT(t), "bystander")
	if err != nil || tw.Properties.Desired["fw"] != nil || tw.Tags["hubbyRollouts"] != nil {
		t.Fatalf("bystander touched: %+v %v", tw, err)
	}
	// the accepting devices got the new value exactly once, and the old one back
	eventually(t, "ro-1 acknowledges the reverted value", func() error {
		r, _ := hubReported(t, h, "ro-1")
		if ac, _, val := ack(r, "fw"); ac != 200 || val != "1.0" {
			return fmt.Errorf("fw ack %v", r["fw"])
		}
		return nil
	})
	out, code = hubbyExit(t, h, "rollout", "status", "fw2")
	if code != 0 || !strings.Contains(out, "state:     reverted") {
		t.Fatalf("final status: exit %d\n%s", code, out)
	}
}

// firstJSON is the JSON document in out (the harness merges stderr into stdout).
func firstJSON(out string) string {
	if i := strings.Index(out, "{"); i >= 0 {
		return out[i:]
	}
	return out
}
