//go:build e2e

package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/methods"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// hubbyRun runs the hubby binary against h and returns its combined output.
func hubbyRun(t *testing.T, h *hub, args ...string) (string, error) {
	t.Helper()
	cmd := exec.CommandContext(ctxT(t), filepath.Join(binDir, "hubby"), append([]string{"--hubsim-state", h.state}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

type methodResult struct {
	Status  int             `json:"status"`
	Payload json.RawMessage `json:"payload"`
}

func invokeOK(t *testing.T, h *hub, args ...string) methodResult {
	t.Helper()
	out, err := hubbyRun(t, h, append([]string{"-o", "json", "method", "invoke"}, args...)...)
	if err != nil {
		t.Fatalf("hubby method invoke %v: %v\n%s", args, err, out)
	}
	var r methodResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("hubby output %q: %v", out, err)
	}
	var c bytes.Buffer
	if err := json.Compact(&c, r.Payload); err != nil {
		t.Fatal(err)
	}
	r.Payload = c.Bytes()
	return r
}

// Direct methods on the real binaries: hubby calls, hubsim delivers, the agent's dispatcher
// and scripted handlers answer; payload validation, unknown methods, a hanging handler (504101)
// and an offline device (404103).
func TestDirectMethodsEndToEnd(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "meth1")
	createDevice(t, h, "meth-offline")
	a := startAgent(t, h, connString(h, "meth1", d.Authentication.SymmetricKey.PrimaryKey), `methodTimeout: 8s
methods:
  echo:
    echo: true
  shell:
    command: ["/bin/sh", "-c", "printf '{\"method\":\"%s\",\"in\":%s}' \"$IOTHUBBY_METHOD\" \"$(cat)\""]
  hang:
    delay: 1h
`)
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced)) // methods are subscribed before the twin GET

	if r := invokeOK(t, h, "meth1", "echo", "--payload", `{"a":[1,{"b":null}]}`); r.Status != 200 || string(r.Payload) != `{"a":[1,{"b":null}]}` {
		t.Fatalf("echo: %+v %s", r, r.Payload)
	}
	if r := invokeOK(t, h, "meth1", "shell", "--payload", `{"n":2}`); r.Status != 200 || string(r.Payload) != `{"method":"shell","in":{"n":2}}` {
		t.Fatalf("command: %d %s", r.Status, r.Payload)
	}
	if r := invokeOK(t, h, "meth1", "nothing-here"); r.Status != 501 {
		t.Fatalf("unknown method: %d %s", r.Status, r.Payload)
	}
	// Malformed payloads reach the device (IoT Hub checks only that they are JSON) and the
	// dispatcher refuses them before any handler: duplicate keys, depth over 10.
	for _, p := range []string{`{"a":1,"a":2}`, strings.Repeat("[", 11) + strings.Repeat("]", 11)} {
		if r := invokeOK(t, h, "meth1", "echo", "--payload", p); r.Status != 400 {
			t.Fatalf("payload %s: %d %s", p, r.Status, r.Payload)
		}
	}
	from := a.numLines()
	out, err := hubbyRun(t, h, "method", "invoke", "meth1", "hang", "--timeout", "5")
	if err == nil || !strings.Contains(out, "504101") && !strings.Contains(out, "GatewayTimeout") {
		t.Fatalf("hanging handler: err %v, output %q", err, out)
	}
	// the agent gives up on the handler at its own deadline and sends nothing
	a.await(from, "overrun logged", msgIs(methods.MsgOverran))
	out, err = hubbyRun(t, h, "method", "invoke", "meth-offline", "echo", "--timeout", "5")
	if err == nil || !strings.Contains(out, "DeviceNotOnline") {
		t.Fatalf("offline device: err %v, output %q", err, out)
	}
	// still answering after all that
	if r := invokeOK(t, h, "meth1", "echo", "--payload", `"done"`); r.Status != 200 || string(r.Payload) != `"done"` {
		t.Fatalf("echo after: %+v", r)
	}
	if n := a.count(msgIs(methods.MsgAnswerNotSent)); n != 0 {
		t.Fatalf("%d answers not sent", n)
	}
}

// A simulated reboot: the method answers 200, the agent disconnects, stays offline for its boot
// delay, reconnects and reports lastReboot and bootCount (and the reboot progress property);
// the count survives an agent restart.
func TestSimulatedReboot(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "rb1")
	state := t.TempDir()
	cs := connString(h, "rb1", d.Authentication.SymmetricKey.PrimaryKey)
	cfg := fmt.Sprintf("stateDir: %q\nreboot:\n  mode: simulate\n  bootDelay: 500ms\n", state)
	a := startAgent(t, h, cs, cfg)
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))
	from := a.numLines()
	if r := invokeOK(t, h, "rb1", "reboot"); r.Status != 200 {
		t.Fatalf("reboot: %d %s", r.Status, r.Payload)
	}
	i := a.await(from, "disconnect", msgIs(agent.MsgSimRebootDisconnecting))
	i = a.await(i, "booted", msgIs(agent.MsgSimRebootBooted))
	a.await(i, "reconnected", msgIs(twinsync.MsgTwinSynced))
	eventually(t, "lastReboot and bootCount reported", func() error {
		r, _ := hubReported(t, h, "rb1")
		rb, _ := r["reboot"].(map[string]any)
		if r["bootCount"] != float64(1) || r["lastReboot"] == nil || rb["state"] != "done" {
			return fmt.Errorf("reported %v", r)
		}
		return nil
	})
	// a second reboot after an agent restart counts on
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
	a = startAgent(t, h, cs, cfg)
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))
	if r := invokeOK(t, h, "rb1", "reboot"); r.Status != 200 {
		t.Fatalf("second reboot: %d", r.Status)
	}
	eventually(t, "bootCount 2", func() error {
		if r, _ := hubReported(t, h, "rb1"); r["bootCount"] != float64(2) {
			return fmt.Errorf("reported %v", r)
		}
		return nil
	})
}
