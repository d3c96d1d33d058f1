package main

// Test hooks of agent run, for end-to-end tests on the real binary only. They are refused unless
// $IOTHUBBY_TEST_HOOKS is 1, and hidden from --help.
//
//	--test-wedge LOOP   on each SIGUSR1, the next piece of work of LOOP (supervisor, twin,
//	                    telemetry) never finishes while the device runs (agent.Device.WedgeForTest):
//	                    /healthz then fails naming the loop and the systemd watchdog pings stop.

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/agent"
)

// EnvTestHooks must be "1" for agent run to accept its test-hook flags.
const EnvTestHooks = "IOTHUBBY_TEST_HOOKS"

// testHookFlags are agent run's hidden test hooks.
type testHookFlags struct {
	wedge string
}

func bindTestHookFlags(cmd *cobra.Command, f *testHookFlags) {
	fl := cmd.Flags()
	fl.StringVar(&f.wedge, "test-wedge", "", "test only ($"+EnvTestHooks+"=1): on SIGUSR1 wedge this loop (supervisor, twin, telemetry)")
	_ = fl.MarkHidden("test-wedge")
}

// testHooks is what serve does for the test hooks; the zero value does nothing.
type testHooks struct {
	wedge    string         // the loop to wedge
	wedgeSig chan os.Signal // SIGUSR1, when wedge is set
}

// setup checks the flags and registers the hooks' signals; stop unregisters them.
func (f *testHookFlags) setup() (testHooks, func(), error) {
	if f.wedge == "" {
		return testHooks{}, func() {}, nil
	}
	if os.Getenv(EnvTestHooks) != "1" {
		return testHooks{}, nil, usageError{fmt.Errorf("--test-wedge is a test hook: it needs $%s=1", EnvTestHooks)}
	}
	switch f.wedge {
	case agent.LoopSupervisor, agent.LoopTwin, agent.LoopTelemetry:
	default:
		return testHooks{}, nil, usageError{fmt.Errorf("--test-wedge %q: want %s, %s or %s", f.wedge, agent.LoopSupervisor, agent.LoopTwin, agent.LoopTelemetry)}
	}
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGUSR1)
	return testHooks{wedge: f.wedge, wedgeSig: c}, func() { signal.Stop(c) }, nil
}
