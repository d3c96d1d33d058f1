package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
)

func TestHubsimThrottleCommand(t *testing.T) {
	// A clock that stands still: S1's registry bucket (100/min) holds 1.67 calls, so exactly one.
	clk := clock.NewFake(time.Unix(1_800_000_000, 0))
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0",
		Tier: "S1", Units: 1, Clock: clk}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if _, err := srv.Registry().Create(registry.Device{DeviceID: "d1"}); err != nil {
		t.Fatal(err)
	}
	st := "--hubsim-state=" + srv.StateDir()
	if _, err := hubby(t, st, "device", "show", "d1"); err != nil {
		t.Fatalf("first registry call: %v", err)
	}
	if _, err := hubby(t, st, "device", "show", "d1"); err == nil || !strings.Contains(err.Error(), "ThrottlingException") {
		t.Fatalf("second registry call in the same instant: %v, want a ThrottlingException", err)
	}
	out, err := hubby(t, st, "hubsim", "throttle")
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "hubsim-throttle", out)
	out, err = hubby(t, st, "hubsim", "throttle", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var got throttle.Status
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("json: %v\n%s", err, out)
	}
	reg := got.Operations[2]
	if got.Tier != "S1" || reg.Op != throttle.Registry || reg.Allowed != 1 || reg.Throttled != 1 {
		t.Fatalf("json status %+v", got)
	}
}

func TestHubsimThrottleCommandWithoutTier(t *testing.T) {
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	out, err := hubby(t, "--hubsim-state="+srv.StateDir(), "hubsim", "throttle")
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "hubsim-throttle-off", out)
	out, err = hubby(t, "--hubsim-state="+srv.StateDir(), "hubsim", "throttle", "set", "s3", "--units", "2")
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "hubsim-throttle-set", out)
	if st := srv.Throttle(); st.Tier != "S3" || st.Units != 2 {
		t.Fatalf("after set: %+v", st)
	}
	if _, err := hubby(t, "--hubsim-state="+srv.StateDir(), "hubsim", "throttle", "set", "S5"); err == nil || !strings.Contains(err.Error(), "unknown tier") {
		t.Fatalf("set S5: %v, want the tier refused", err)
	}
	out, err = hubby(t, "--hubsim-state="+srv.StateDir(), "-o", "json", "hubsim", "throttle", "set", "S1", "--limit", "connect=2", "--limit", "d2c=0.5")
	if err != nil || !strings.Contains(out, `"perSecond": 2,`) || !strings.Contains(out, `"perSecond": 0.5,`) {
		t.Fatalf("set --limit: %q %v", out, err)
	}
	if _, err := hubby(t, "--hubsim-state="+srv.StateDir(), "hubsim", "throttle", "set", "S1", "--limit", "connect=fast"); err == nil || !strings.Contains(err.Error(), "not a number") {
		t.Fatalf("set --limit connect=fast: %v", err)
	}
	if _, err := hubby(t, "--hubsim-state="+srv.StateDir(), "hubsim", "throttle", "set", "S1", "--limit", "connects=1"); err == nil || !strings.Contains(err.Error(), "unknown operation") {
		t.Fatalf("set --limit connects=1: %v", err)
	}
	if _, err := hubby(t, "--hubsim-state="+srv.StateDir(), "hubsim", "throttle", "off"); err != nil {
		t.Fatal(err)
	}
	if st := srv.Throttle(); st.Tier != "" {
		t.Fatalf("after off: %+v", st)
	}
}
