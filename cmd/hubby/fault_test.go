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
	"github.com/iothubby/iothubby/pkg/hubsim/faults"
)

// TestHubsimFaultCommands: every fault kind through hubby, its rule as a table (golden), the
// list with rules, counters and log (golden), JSON output, bad flags refused with hubsim's reason,
// and clear.
func TestHubsimFaultCommands(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", Clock: clk}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	st := "--hubsim-state=" + srv.StateDir()
	var added strings.Builder
	for _, args := range [][]string{
		{"refuse-connect", "dev1", "--code", "5", "--duration", "1m", "--probability", "0.5", "--seed", "9"},
		{"puback-delay", "dev1", "--delay", "2500ms", "--duration", "5m"},
		{"puback-drop", "--probability", "0.25", "--seed", "4"},
		{"rest-error", "--code", "429", "--retry-after", "7s", "--path-prefix", "/twins/", "--method", "patch"},
		{"rest-delay", "dev2", "--delay", "3s"},
		{"dps-error", "reg1", "--code", "500", "--retry-after", "0s"},
		{"dps-delay", "--delay", "1m"},
		{"token-expire", "dev3", "--delay", "90s"},
		{"stall", "dev4", "--duration", "20s"},
		{"c2d-duplicate", "dev5", "--count", "2"},
		{"drop"},
	} {
		out, err := hubby(t, append([]string{st, "hubsim", "fault"}, args...)...)
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		added.WriteString("$ hubby hubsim fault " + strings.Join(args, " ") + "\n" + out)
	}
	golden(t, "hubsim-fault-add", added.String())

	// The rule hubsim keeps is what the flags said.
	out, err := hubby(t, st, "hubsim", "fault", "list", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var status faults.Status
	if err := json.Unmarshal([]byte(out), &status); err != nil {
		t.Fatalf("list -o json: %v\n%s", err, out)
	}
	if len(status.Rules) != 10 {
		t.Fatalf("%d rules, want 10 (all but drop): %s", len(status.Rules), out)
	}
	re := status.Rules[3]
	if re.Action != "rest-error" || re.Code != 429 || re.RetryAfterSecs != 7 || re.PathPrefix != "/twins/" || re.Method != "PATCH" {
		t.Fatalf("rest-error rule %+v", re)
	}
	if r := status.Rules[0]; r.Code != 5 || r.Seed != 9 || r.Probability != 0.5 || !r.Until.Equal(clk.Now().Add(time.Minute)) {
		t.Fatalf("refuse-connect rule %+v", r)
	}
	out, err = hubby(t, st, "hubsim", "fault", "list")
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "hubsim-fault-list", out)

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"refuse-connect", "--code", "7"}, "1 to 5"},
		{[]string{"rest-error", "--code", "404"}, "want 429, 500 or 503"},
		{[]string{"puback-delay", "--delay", "0s"}, "delaySecs must be in (0, 3600]"},
		{[]string{"stall", "--duration", "2h"}, "durationSecs must be in (0, 3600]"},
		{[]string{"rest-error", "--retry-after", "1500ms"}, "whole number of seconds"},
		{[]string{"rest-delay", "--method", "BREW", "--delay", "1s"}, `method "BREW"`},
	} {
		if _, err := hubby(t, append([]string{st, "hubsim", "fault"}, c.args...)...); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want an error naming %q", c.args, err, c.want)
		}
	}
	if out, err = hubby(t, st, "hubsim", "fault", "clear"); err != nil || out != "cleared 10\n" {
		t.Fatalf("clear: %q %v", out, err)
	}
}
