package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim"
)

func TestHubsimFaultCommands(t *testing.T) {
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	st := "--hubsim-state=" + srv.StateDir()
	out, err := hubby(t, st, "hubsim", "fault", "refuse-connect", "dev1", "--code", "5", "--duration", "1m", "--probability", "0.5", "--seed", "9")
	if err != nil || !strings.Contains(out, `"refuse-connect"`) || !strings.Contains(out, `"seed": 9`) {
		t.Fatalf("refuse-connect: %q %v", out, err)
	}
	if _, err := hubby(t, st, "hubsim", "fault", "refuse-connect", "--code", "7"); err == nil || !strings.Contains(err.Error(), "1 to 5") {
		t.Fatalf("bad code: %v", err)
	}
	if out, err = hubby(t, st, "hubsim", "fault", "drop"); err != nil || !strings.Contains(out, `"drop"`) {
		t.Fatalf("drop: %q %v", out, err)
	}
	out, err = hubby(t, st, "hubsim", "fault", "list")
	if err != nil {
		t.Fatal(err)
	}
	var status struct {
		Rules []struct {
			DeviceID string `json:"deviceId"`
			Code     int    `json:"code"`
		} `json:"rules"`
		Counters map[string]int64 `json:"counters"`
	}
	if err := json.Unmarshal([]byte(out), &status); err != nil || len(status.Rules) != 1 || status.Rules[0].DeviceID != "dev1" || status.Rules[0].Code != 5 {
		t.Fatalf("list: %q %v", out, err)
	}
	if status.Counters["admin:drop/dropped 0"] != 1 {
		t.Fatalf("counters: %v", status.Counters)
	}
	if out, err = hubby(t, st, "hubsim", "fault", "clear"); err != nil || !strings.Contains(out, `"cleared": 1`) {
		t.Fatalf("clear: %q %v", out, err)
	}
}
