package agent_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/methods"
	"github.com/iothubby/iothubby/pkg/twinsync"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Reload swaps the scripted methods on the running connection: a call already running finishes
// with its old script, later calls run the new ones (a removed name is 501, a new name answers),
// the broker sees one connect; an invalid method is refused and the scripts in force are kept;
// a change of something a session cannot take asks for a restart and applies nothing.
func TestReloadSwapsMethodsInPlace(t *testing.T) {
	b := hubtest.NewBroker(t)
	dir := t.TempDir()
	fifo := filepath.Join(dir, "release")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	started := filepath.Join(dir, "started")
	c := deviceConfig(t, b)
	c.Telemetry.Interval = 0
	c.Methods = map[string]methods.Script{
		"ping": {Payload: "v1"},
		"gone": {Payload: "x"},
		// Running until the test writes to the fifo, then answering "old".
		"slow": {Command: []string{"/bin/sh", "-c", `touch "$0"; cat "$1" >/dev/null; printf '"old"'`, started, fifo}},
	}
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
	waitLog(t, logs, twinsync.MsgTwinSynced)
	cl := b.Client("dev1")
	b.SendTo(cl, wire.MethodRequest("slow", "s1"), []byte(`{}`))
	waitfor.True(t, "the slow script running", func() bool { _, err := os.Stat(started); return err == nil })

	next := c
	next.Methods = map[string]methods.Script{
		"ping":  {Payload: "v2"},
		"slow":  {Payload: "new"},
		"fresh": {Status: 201, Payload: "fresh"},
	}
	if err := d.Reload(next); err != nil {
		t.Fatalf("Reload with new methods: %v", err)
	}
	if f := logs.FilterMessage(agent.MsgConfigReloaded).FilterField(zap.Bool("methods_changed", true)); f.Len() != 1 {
		t.Errorf("%d %q lines with methods_changed=true, want 1", f.Len(), agent.MsgConfigReloaded)
	}
	// The running call finishes with the script it started with.
	w, err := os.OpenFile(fifo, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	if got := methodAnswers(t, b, 1); got[0] != `200 s1 "old"` {
		t.Fatalf("call running across the reload answered %q, want the old script's", got[0])
	}
	for _, call := range []struct{ name, rid string }{{"ping", "p1"}, {"slow", "s2"}, {"fresh", "f1"}, {"gone", "g1"}} {
		b.SendTo(cl, wire.MethodRequest(call.name, call.rid), []byte(`{}`))
	}
	byRID := map[string]string{}
	for _, line := range methodAnswers(t, b, 5)[1:] {
		byRID[strings.Fields(line)[1]] = line
	}
	for rid, want := range map[string]string{"p1": `200 p1 "v2"`, "s2": `200 s2 "new"`, "f1": `201 f1 "fresh"`} {
		if byRID[rid] != want {
			t.Errorf("after the reload: %q, want %q", byRID[rid], want)
		}
	}
	if !strings.HasPrefix(byRID["g1"], "501 g1 ") {
		t.Errorf("removed method after the reload: %q, want 501", byRID["g1"])
	}

	// Invalid: refused, nothing applied.
	bad := next
	bad.Methods = map[string]methods.Script{"ping": {Payload: "v3", Echo: true}}
	if err := d.Reload(bad); !errors.Is(err, agent.ErrConfig) {
		t.Fatalf("Reload with an invalid method: %v, want ErrConfig", err)
	}
	// Identity or endpoint: a restart is needed, nothing applied.
	moved := next
	moved.Methods = map[string]methods.Script{"ping": {Payload: "v4"}}
	moved.Address = "127.0.0.1:1"
	if err := d.Reload(moved); !errors.Is(err, agent.ErrRestartNeeded) {
		t.Fatalf("Reload with a new address: %v, want ErrRestartNeeded", err)
	}
	b.SendTo(cl, wire.MethodRequest("ping", "p2"), []byte(`{}`))
	if got := methodAnswers(t, b, 6); got[5] != `200 p2 "v2"` {
		t.Errorf("after refused reloads ping answered %q, want the reloaded v2", got[5])
	}
	if n := len(b.ConnectRecords()); n != 1 {
		t.Errorf("%d connects, want 1: the reload dropped the connection", n)
	}
}
