package agent_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
)

func TestQueueConfigErrors(t *testing.T) {
	b := hubtest.NewBroker(t)
	for name, tc := range map[string]struct {
		mutate func(*agent.Config)
		want   string
	}{
		"persist without stateDir": {func(c *agent.Config) { c.Queue.Persist = true }, "needs stateDir"},
		"unknown fsync":            {func(c *agent.Config) { c.Queue.Fsync = "sometimes" }, "queue.fsync"},
		"unknown whenFull":         {func(c *agent.Config) { c.Queue.WhenFull = "dropNewest" }, "queue.whenFull"},
		"negative maxBytes":        {func(c *agent.Config) { c.Queue.MaxBytes = -1 }, "queue.maxBytes"},
	} {
		c := deviceConfig(t, b)
		tc.mutate(&c)
		_, err := agent.New(c, nil)
		if !errors.Is(err, agent.ErrConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want ErrConfig naming %q", name, err, tc.want)
		}
	}
}

// With queue.persist the device sends through the disk queue and leaves it empty once the hub
// acknowledged everything; telemetry.count stops the periodic telemetry.
func TestPersistentQueueDelivers(t *testing.T) {
	b := hubtest.NewBroker(t)
	c := deviceConfig(t, b)
	c.StateDir = t.TempDir()
	c.Queue.Persist = true
	c.Telemetry.Count = 5
	c.Telemetry.Interval = 5 * time.Millisecond
	core, logs := observer.New(zap.InfoLevel)
	d, err := agent.New(c, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	waitLog(t, logs, "queue spool opened")
	waitLog(t, logs, "telemetry count reached")
	waitfor.True(t, "five telemetry messages", func() bool { return len(b.TelemetryMIDs()) >= 5 })
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if n := len(b.TelemetryMIDs()); n != 5 {
		t.Fatalf("%d messages with telemetry.count 5", n)
	}
	stopped := logs.FilterMessage("stopped").All()
	if len(stopped) != 1 || stopped[0].ContextMap()["delivered"] != uint64(5) || stopped[0].ContextMap()["queued"] != int64(0) {
		t.Fatalf("stopped log: %v", stopped)
	}
	// The spool's counters (the durable benchmark's fsyncs per message): 5 appended and acked,
	// none held, and at least the cursor written and forced at Close.
	st, ok := d.QueueStats()
	if !ok || st.Appends != 5 || st.Acked != 5 || st.Records != 0 || st.Fsyncs == 0 {
		t.Fatalf("QueueStats = %+v, %v; want 5 appended and acked, none held, fsyncs > 0", st, ok)
	}
	d.Close()
}

func TestQueueStatsWithoutPersist(t *testing.T) {
	b := hubtest.NewBroker(t)
	d, err := agent.New(deviceConfig(t, b), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if st, ok := d.QueueStats(); ok {
		t.Fatalf("QueueStats without queue.persist = %+v, true", st)
	}
}
