package agent_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/methods"
	"github.com/iothubby/iothubby/pkg/twinsync"
	"github.com/iothubby/iothubby/pkg/wire"
)

// methodAnswers waits until n method responses were recorded and returns "status rid body" lines.
func methodAnswers(t *testing.T, b *hubtest.Broker, n int) []string {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		var out []string
		b.With(func(h *hubtest.Hook) {
			for i, r := range h.MethodResponses {
				out = append(out, strings.Join([]string{strconv.Itoa(r.Status), r.RequestID, h.MethodBodies[i]}, " "))
			}
		})
		if len(out) >= n {
			return out
		}
		select {
		case <-b.Hook.Events:
		case <-deadline:
			t.Fatalf("%d method answers, want %d: %q", len(out), n, out)
		}
	}
}

func TestScriptedMethodsThroughTheDispatcher(t *testing.T) {
	b := hubtest.NewBroker(t)
	c := deviceConfig(t, b)
	c.Telemetry.Interval = 0
	c.Methods = map[string]methods.Script{
		"echo":  {Echo: true},
		"fixed": {Status: 503, Payload: map[string]any{"reason": "busy"}},
		"hang":  {Delay: time.Hour},
	}
	c.MethodTimeout = 2 * time.Second
	core, logs := observer.New(zap.DebugLevel)
	d, err := agent.New(c, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	waitLog(t, logs, twinsync.MsgTwinSynced) // subscribed to methods before the twin GET
	cl := b.Client("dev1")
	b.SendTo(cl, wire.MethodRequest("hang", "h1"), []byte(`{}`))
	b.SendTo(cl, wire.MethodRequest("echo", "e1"), []byte(`{"x":[1,"two"]}`))
	got := methodAnswers(t, b, 1)
	if got[0] != `200 e1 {"x":[1,"two"]}` {
		t.Fatalf("echo answered %q", got[0])
	}
	// The same $rid delivered again, after its answer: not answered twice.
	b.SendTo(cl, wire.MethodRequest("echo", "e1"), []byte(`{"x":0}`))
	b.SendTo(cl, wire.MethodRequest("fixed", "f1"), nil)
	b.SendTo(cl, wire.MethodRequest("nope", "n1"), []byte(`{}`))
	b.SendTo(cl, wire.MethodRequest("echo", "bad1"), []byte(`{"a":1,"a":2}`))
	b.SendTo(cl, wire.MethodRequest("echo", "deep"), []byte(strings.Repeat("[", 11)+strings.Repeat("]", 11)))
	got = methodAnswers(t, b, 5)
	want := map[string]string{"f1": `503 f1 {"reason":"busy"}`, "n1": "501 n1", "bad1": "400 bad1", "deep": "400 deep"}
	for _, line := range got[1:] {
		f := strings.Fields(line)
		w, ok := want[f[1]]
		if !ok || !strings.HasPrefix(line, w) {
			t.Errorf("answer %q, want %q", line, w)
		}
		delete(want, f[1])
	}
	if len(want) > 0 {
		t.Errorf("no answers for %v (got %q)", want, got)
	}
	// The hanging handler overruns its 2 s deadline and is never answered; a call after it is.
	waitLog(t, logs, methods.MsgOverran)
	b.SendTo(cl, wire.MethodRequest("echo", "e2"), []byte(`1`))
	got = methodAnswers(t, b, 6)
	if got[5] != "200 e2 1" {
		t.Fatalf("last answer %q (all %q)", got[5], got)
	}
	for _, line := range got {
		if strings.Contains(line, " h1 ") || strings.HasSuffix(line, " h1") {
			t.Fatalf("overrun call answered: %q", line)
		}
	}
}

func TestMethodConfigValidation(t *testing.T) {
	b := hubtest.NewBroker(t)
	for name, m := range map[string]map[string]methods.Script{
		"bad name":        {"a/b": {}},
		"two payloads":    {"m": {Echo: true, Payload: 1}},
		"failure rate":    {"m": {FailureRate: 2}},
		"missing command": {"m": {Command: []string{"/nonexistent/cmd"}}},
		"status":          {"m": {Status: 42}},
	} {
		c := deviceConfig(t, b)
		c.Methods = m
		if _, err := agent.New(c, nil); !errors.Is(err, agent.ErrConfig) {
			t.Errorf("%s: err = %v, want ErrConfig", name, err)
		}
	}
}

// Exec reboot: answered 200, then the command runs and the pending reboot is recorded; an agent
// that starts again on the same boot (no real reboot happened) reports the reboot failed.
func TestExecRebootRecordsPendingAndSettlesOnStart(t *testing.T) {
	b := hubtest.NewBroker(t)
	state := t.TempDir()
	marker := filepath.Join(t.TempDir(), "rebooted")
	c := deviceConfig(t, b)
	c.Telemetry.Interval = 0
	c.StateDir = state
	c.Reboot = agent.RebootConfig{Mode: "exec", Command: []string{"/bin/sh", "-c", "echo yes > " + marker}}
	run := func() (*observer.ObservedLogs, func()) {
		core, logs := observer.New(zap.DebugLevel)
		d, err := agent.New(c, zap.New(core))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- d.Run(ctx) }()
		return logs, func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		}
	}
	logs, stop := run()
	waitLog(t, logs, twinsync.MsgTwinSynced)
	b.SendTo(b.Client("dev1"), wire.MethodRequest("reboot", "r1"), nil)
	if got := methodAnswers(t, b, 1); !strings.HasPrefix(got[0], "200 r1 ") {
		t.Fatalf("reboot answered %q", got[0])
	}
	waitLog(t, logs, agent.MsgRebootCommandRan)
	if out, err := os.ReadFile(marker); err != nil || string(out) != "yes\n" {
		t.Fatalf("command did not run: %q %v", out, err)
	}
	st, err := os.ReadFile(filepath.Join(state, "reboot-dev1.json"))
	if err != nil || !strings.Contains(string(st), `"pending"`) {
		t.Fatalf("pending reboot not recorded: %s %v", st, err)
	}
	stop()
	logs, stop = run()
	defer stop()
	waitLog(t, logs, agent.MsgRebootDidNotHappen)
	waitLog(t, logs, twinsync.MsgTwinSynced)
	tw, err := os.ReadFile(filepath.Join(state, "twin-dev1.json"))
	if err != nil || !strings.Contains(string(tw), `"state":"failed"`) {
		t.Fatalf("reboot result not in the intended reported state: %s %v", tw, err)
	}
	st, _ = os.ReadFile(filepath.Join(state, "reboot-dev1.json"))
	if strings.Contains(string(st), `"pending"`) {
		t.Fatalf("pending reboot kept: %s", st)
	}
}
