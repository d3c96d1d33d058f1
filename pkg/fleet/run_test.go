package fleet

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
)

// A fleet against an in-process broker: once every device has connected it returns the ramp's
// free heap to the OS and says so once; its devices share one Liveness; every device line
// carries its device field.
func TestRunReleasesRampMemoryOnce(t *testing.T) {
	const n = 3
	core, logs := observer.New(zap.InfoLevel)
	_, f := brokerFleet(t, n, "connectRate: 1000", Options{Logger: zap.New(core)})
	for _, d := range f.Devices() {
		if d.dev.Liveness() != f.live {
			t.Fatalf("device %s has a Liveness of its own", d.ID)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	waitfor.True(t, "the ramp's memory released", func() bool { return logs.FilterMessage(MsgRampMemoryReleased).Len() > 0 })
	if p := f.Progress(); p.EverConnected != n {
		t.Fatalf("released with %d of %d devices connected once", p.EverConnected, n)
	}
	connected := logs.FilterMessage(hub.MsgConnected).All()
	if len(connected) != n {
		t.Fatalf("%d %q lines, want %d", len(connected), hub.MsgConnected, n)
	}
	seen := map[any]bool{}
	for _, e := range connected {
		seen[e.ContextMap()["device"]] = true
	}
	for i := range n {
		if !seen[fmt.Sprintf("d%d", i)] {
			t.Fatalf("no %q line with device d%d: %v", hub.MsgConnected, i, connected)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got := logs.FilterMessage(MsgRampMemoryReleased).Len(); got != 1 {
		t.Fatalf("%q logged %d times, want once", MsgRampMemoryReleased, got)
	}
}

// brokerFleet prepares a fleet of n connection-string devices d0..d(n-1) on an in-process
// broker, telemetry hourly; settings are more lines of the fleet file (e.g. "connectRate: 2").
func brokerFleet(t *testing.T, n int, settings string, o Options) (*hubtest.Broker, *Fleet) {
	t.Helper()
	b := hubtest.NewBroker(t)
	dir := t.TempDir()
	var cs strings.Builder
	for i := range n {
		fmt.Fprintf(&cs, "HostName=%s;DeviceId=d%d;SharedAccessKey=%s;GatewayHostName=%s\n", hubtest.Host, i, b.Key.Base64(), b.Addr)
	}
	csFile := filepath.Join(dir, "devices.cs")
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(csFile, []byte(cs.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(caFile, b.CAPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := Parse(fmt.Appendf(nil, `
connectionStringsFile: %s
stateDir: %s
tls: {caFile: %s}
profiles:
  - {name: p, weight: 1, telemetry: {interval: 1h}}
%s
`, csFile, filepath.Join(dir, "state"), caFile, settings))
	if err != nil {
		t.Fatal(err)
	}
	if o.NoFileLimit == 0 {
		o.NoFileLimit = 1 << 20
	}
	f, err := Prepare(context.Background(), cfg, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	return b, f
}

// Each connection takes one token of the fleet's connect-rate limiter, the first one too: with
// one token and time standing still, exactly one device connects (a token taken at start as
// well would leave none), and the next second's token lets the next one in.
func TestFirstConnectTakesOneToken(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	_, f := brokerFleet(t, 2, "connectRate: 1\nconnectBurst: 1", Options{Clock: clk})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	waitfor.True(t, "one device connected on the one token", func() bool { return f.Progress().EverConnected == 1 })
	clk.Advance(time.Second)
	waitfor.True(t, "the second device connected on the next second's token", func() bool { return f.Progress().EverConnected == 2 })
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
}

// A fleet's connected, idle devices hold one goroutine each, the lean MQTT client's reader
// (hub.Config.LeanMQTT): none of paho's ten per connection, and no session supervisor (parked).
func TestIdleDevicesHoldOneGoroutineEach(t *testing.T) {
	const n = 20
	_, f := brokerFleet(t, n, "connectRate: 1000", Options{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	waitfor.True(t, "every device connected", func() bool { return f.Progress().EverConnected == n })
	waitfor.NoError(t, "one goroutine per idle device", func() error {
		buf := make([]byte, 1<<22)
		stacks := strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n")
		var readers, paho, sessions int
		for _, s := range stacks {
			switch {
			case strings.Contains(s, "internal/mqttc.(*Client).read("):
				readers++
			case strings.Contains(s, "eclipse/paho"):
				paho++
			case strings.Contains(s, "pkg/hub.(*Session)"):
				sessions++
			}
		}
		if readers != n || paho != 0 || sessions != 0 {
			return fmt.Errorf("%d lean readers (want %d), %d paho goroutines, %d session goroutines (want 0)", readers, n, paho, sessions)
		}
		return nil
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
}
