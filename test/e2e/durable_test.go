//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/iothubby/iothubby/pkg/service"
)

// startDurableAgent runs the agent with the disk queue in stateDir, JSON logs at debug level and
// the given telemetry and queue sections.
func startDurableAgent(t *testing.T, h *hub, cs, stateDir, telemetry, queue string) *proc {
	t.Helper()
	cfg := fmt.Sprintf("log:\n  format: json\n  level: debug\ntls:\n  caFile: %q\nstateDir: %q\nshutdownTimeout: 500ms\ntelemetry:\n%s\nqueue:\n  persist: true\n%s\n",
		h.ep.CAFile, stateDir, telemetry, queue)
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return startProc(t, "agent", "run", "--config", p, "--connection-string-file", writeSecret(t, "cs", cs))
}

// mids returns the $.mid of the messages hubsim recorded.
func mids(msgs []service.RecordedMessage) []string {
	var out []string
	for _, m := range msgs {
		out = append(out, m.SystemProperties["message-id"])
	}
	return out
}

// 500 messages accepted while hubsim is down, the agent killed with SIGKILL, restarted, hubsim
// started: every message id arrives, in order; duplicates are counted and at most the in-flight
// window. Then a damaged segment is set aside and reported without stopping the agent.
func TestDurableQueueSurvivesSIGKILL(t *testing.T) {
	const n = 500
	state := t.TempDir()
	mqttAddr, httpsAddr := freeAddr(t), freeAddr(t)
	h := startHub(t, state, mqttAddr, httpsAddr)
	d := createDevice(t, h, "e2e-durable")
	cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	if err := h.stop(); err != nil {
		t.Fatalf("hubsim stop: %v", err)
	}
	agentState := t.TempDir()
	a := startDurableAgent(t, h, cs, agentState, fmt.Sprintf("  interval: 2ms\n  count: %d", n), "  capacity: 1000")
	a.await(0, "all messages accepted", and(msgIs("telemetry count reached"), field("count", n)))
	if c := a.count(msgIs("telemetry message refused")); c != 0 {
		t.Fatalf("%d messages refused", c)
	}
	a.kill() // SIGKILL: no drain, no flush

	a2 := startDurableAgent(t, h, cs, agentState, "  interval: 0s", "  capacity: 1000")
	a2.await(0, "the disk queue reopened with every message", and(msgIs("queue spool opened"), field("messages", n)))
	h2 := startHub(t, state, mqttAddr, httpsAddr)
	var got []string
	eventually(t, fmt.Sprintf("%d messages at hubsim", n), func() error {
		msgs, err := h2.svc.Telemetry(ctxT(t), d.DeviceID)
		if err != nil {
			return err
		}
		got = mids(msgs)
		if len(got) < n {
			return fmt.Errorf("%d of %d", len(got), n)
		}
		return nil
	})
	// In order, each seq once; duplicates (a resend around the crash) at most the in-flight
	// window of 8 (maxInFlight).
	dups := checkSequence(t, got, n, 8)
	t.Logf("durable: %d messages delivered after SIGKILL and restart, %d duplicates", n, dups)
	if err := a2.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}

	// A damaged segment: set aside, reported, and the agent runs on.
	qdir := filepath.Join(agentState, "queue-"+d.DeviceID)
	bad := filepath.Join(qdir, "00000000000099999999.seg")
	if err := os.WriteFile(bad, []byte("\x10\x00\x00\x00garbage, not a record of the spool"), 0o600); err != nil {
		t.Fatal(err)
	}
	a3 := startDurableAgent(t, h2, cs, agentState, "  interval: 0s", "")
	a3.await(0, "the damage reported", msgIs("spool: damaged segment set aside; records after the damage are lost"))
	// Every message was acknowledged before the clean stop: nothing is left to resend.
	a3.await(0, "the corrupt segment counted", and(msgIs("queue spool opened"), field("corrupt_segments", 1), field("messages", 0)))
	a3.await(0, "connected despite the damage", msgIs("connected"))
	if _, err := os.Stat(bad + ".corrupt"); err != nil {
		t.Fatalf("damaged segment not set aside: %v", err)
	}
	if err := a3.stop(); err != nil {
		t.Fatalf("agent exit after a damaged segment: %v", err)
	}
}

// A full disk queue refuses the newest messages (refuseNewest) or drops the oldest (dropOldest),
// logged and counted, as documented.
func TestDurableQueueFull(t *testing.T) {
	state := t.TempDir()
	mqttAddr, httpsAddr := freeAddr(t), freeAddr(t)
	h := startHub(t, state, mqttAddr, httpsAddr)
	d := createDevice(t, h, "e2e-durable-full")
	cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	if err := h.stop(); err != nil {
		t.Fatalf("hubsim stop: %v", err)
	}
	for _, policy := range []string{"refuseNewest", "dropOldest"} {
		a := startDurableAgent(t, h, cs, t.TempDir(), "  interval: 2ms\n  count: 60", "  capacity: 50\n  whenFull: "+policy)
		a.await(0, "60 messages offered", msgIs("telemetry count reached"))
		refused := a.count(msgIs("telemetry message refused"))
		switch policy {
		case "refuseNewest":
			if refused != 10 {
				t.Errorf("refuseNewest: %d messages refused, want 10", refused)
			}
		case "dropOldest":
			if refused != 0 {
				t.Errorf("dropOldest: %d messages refused, want 0", refused)
			}
			a.await(0, "drops logged", msgIs("telemetry queue full: dropped the oldest messages"))
		}
		if err := a.stop(); err != nil {
			t.Fatalf("%s: agent exit: %v", policy, err)
		}
		stopped := a.await(0, "final counters", msgIs("stopped"))
		a.mu.Lock()
		l := a.lines[stopped]
		a.mu.Unlock()
		wantDropped := map[string]float64{"refuseNewest": 0, "dropOldest": 10}[policy]
		wantRefused := map[string]float64{"refuseNewest": 10, "dropOldest": 0}[policy]
		if l["dropped"] != wantDropped || l["refused"] != wantRefused {
			t.Errorf("%s: stopped with dropped=%v refused=%v, want %v and %v", policy, l["dropped"], l["refused"], wantDropped, wantRefused)
		}
	}
}
