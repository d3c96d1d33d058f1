package agent_test

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/methods"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// devicePackages name the frames that make a goroutine the device's (the broker's are not).
var devicePackages = []string{
	"iothubby/pkg/agent.", "iothubby/pkg/hub.", "iothubby/pkg/twinsync.", "iothubby/pkg/firmware.",
	"iothubby/pkg/methods.", "github.com/eclipse/paho.mqtt.golang", "github.com/eclipse/paho%2emqtt%2egolang",
}

// deviceGoroutines returns the stacks of the live goroutines that run device code.
func deviceGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		s := string(g)
		for _, p := range devicePackages {
			if strings.Contains(s, p) {
				out = append(out, s)
				break
			}
		}
	}
	return out
}

// The bounds for one idle, connected device with every component configured (twin, scripted
// methods, simulated reboot and firmware). The fleet runs thousands of devices in one process:
// raise them only knowingly. The device's own: the goroutine calling Run (the twin sync and the
// firmware updater hold none while idle). The session's (pkg/hub and the paho client under
// it): counted apart.
const (
	maxComponentGoroutines = 1
	maxDeviceGoroutines    = 12
)

// goroutineID is the "goroutine N" header of a stack.
func goroutineID(stack string) string {
	id, _, _ := strings.Cut(stack, " [")
	return id
}

// deviceGoroutineIDs is the set of IDs of deviceGoroutines now: goroutines left by earlier
// tests that have not finished exiting, which are not the next device's.
func deviceGoroutineIDs() map[string]bool {
	ids := map[string]bool{}
	for _, g := range deviceGoroutines() {
		ids[goroutineID(g)] = true
	}
	return ids
}

// sessionGoroutine reports whether a goroutine was started by the hub session or its MQTT client.
func sessionGoroutine(stack string) bool {
	i := strings.LastIndex(stack, "\ncreated by ")
	if i < 0 {
		return false
	}
	by := stack[i:]
	return strings.Contains(by, "iothubby/pkg/hub.") || strings.Contains(by, "paho")
}

// How many goroutines one connected, idle device runs. The figures are logged (go test -v -run
// TestGoroutinesPerDevice ./pkg/agent/) and bounded.
func TestGoroutinesPerDevice(t *testing.T) {
	b := hubtest.NewBroker(t)
	c := deviceConfig(t, b)
	c.Telemetry.Interval = time.Hour
	c.StateDir = t.TempDir()
	c.Methods = map[string]methods.Script{"echo": {Echo: true}}
	c.Reboot.Mode = "simulate"
	c.Firmware.Mode = "simulate"
	c.Twin.Properties = map[string]agent.TwinBehaviour{"interval": {Action: "accept"}}
	core, logs := observer.New(zap.InfoLevel)
	// goroutines left by earlier tests that have not finished exiting are not this device's
	before := deviceGoroutineIDs()
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
	waitLog(t, logs, twinsync.MsgReportedConfirmed)
	var gs []string
	for _, g := range deviceGoroutines() {
		if !before[goroutineID(g)] {
			gs = append(gs, g)
		}
	}
	session := 0
	for _, g := range gs {
		if sessionGoroutine(g) {
			session++
		}
	}
	own := len(gs) - session
	t.Logf("one connected, idle device runs %d goroutines: %d of its own (including the one calling Run), %d of its hub session (pkg/hub and paho)",
		len(gs), own, session)
	if own > maxComponentGoroutines || len(gs) > maxDeviceGoroutines {
		t.Fatalf("%d goroutines (%d own), limits %d (%d own):\n\n%s", len(gs), own, maxDeviceGoroutines,
			maxComponentGoroutines, strings.Join(gs, "\n\n"))
	}
}

// ownGoroutines returns the stacks of the device goroutines not in before that the hub session
// and its MQTT client did not start.
func ownGoroutines(before map[string]bool) []string {
	var own []string
	for _, g := range deviceGoroutines() {
		if !before[goroutineID(g)] && !sessionGoroutine(g) {
			own = append(own, g)
		}
	}
	return own
}

// A device started with Start (as a fleet starts them) holds no goroutine of its own while its
// session is up and idle; it stops when its context ends and calls exit once, with nil; a
// second Start is refused through exit.
func TestStartHoldsNoGoroutineWhileIdle(t *testing.T) {
	b := hubtest.NewBroker(t)
	c := deviceConfig(t, b)
	c.Telemetry.Interval = time.Hour
	c.StateDir = t.TempDir()
	c.Reboot.Mode = "simulate"
	c.Methods = map[string]methods.Script{"echo": {Echo: true}}
	core, logs := observer.New(zap.InfoLevel)
	before := deviceGoroutineIDs()
	d, err := agent.New(c, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	exited := make(chan error, 2)
	d.Start(ctx, func(err error) { exited <- err })
	waitLog(t, logs, twinsync.MsgTwinSynced)
	waitLog(t, logs, twinsync.MsgReportedConfirmed)
	waitfor.NoError(t, "no goroutine of the device's own while idle", func() error {
		if own := ownGoroutines(before); len(own) > 0 {
			return fmt.Errorf("%d goroutines of the device's own:\n%s", len(own), strings.Join(own, "\n\n"))
		}
		return nil
	})

	second := make(chan error, 1)
	d.Start(ctx, func(err error) { second <- err })
	select {
	case err := <-second:
		if err == nil || !strings.Contains(err.Error(), "already running") {
			t.Fatalf("second Start: %v, want the device is already running", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("second Start did not call exit")
	}

	cancel()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit(%v), want nil after the context ended", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the device did not stop after its context ended")
	}
	select {
	case err := <-exited:
		t.Fatalf("exit called twice (second: %v)", err)
	default:
	}
}
