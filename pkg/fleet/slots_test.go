package fleet

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hub"
)

// A full set of slots refuses the next device until one is given back; giving back is per device
// and at most once; a device's new attempt gives back a slot it still holds before it waits
// (all slots held by waiting devices would stall the fleet); the attempt's context ending
// gives its slot back.
func TestConnectSlots(t *testing.T) {
	s := newConnectSlots(2, 4)
	bg := context.Background()
	done, cancelDone := context.WithCancel(bg)
	cancelDone()
	for i := range 2 {
		if err := s.acquire(bg, i); err != nil {
			t.Fatalf("acquire %d: %v", i, err)
		}
	}
	if err := s.acquire(done, 2); !errors.Is(err, context.Canceled) {
		t.Fatalf("third acquire with two slots: %v, want the context's error (no slot free)", err)
	}
	s.release(3) // holds none
	s.release(0)
	s.release(0) // twice
	if got := s.inUse(); got != 1 {
		t.Fatalf("%d slots in use after device 0 gave its back (twice) and device 3 none, want 1", got)
	}
	// Device 1 starts a new attempt without having given its slot back. With every slot held
	// (device 2 takes the other) it does not wait for a second one: it gives its own back first.
	if err := s.acquire(bg, 2); err != nil {
		t.Fatalf("acquire 2: %v", err)
	}
	again := make(chan error, 1)
	go func() { again <- s.acquire(bg, 1) }()
	var err error
	waitfor.True(t, "device 1's second attempt gets a slot while all are held, one by itself", func() bool {
		select {
		case err = <-again:
			return true
		default:
			return false
		}
	})
	if err != nil {
		t.Fatalf("acquire 1 again: %v", err)
	}
	if got := s.inUse(); got != 2 {
		t.Fatalf("%d slots in use after device 1's second attempt, want 2 (it gave its own back)", got)
	}
	s.release(2)
	ctx, cancel := context.WithCancel(bg)
	if err := s.acquire(ctx, 2); err != nil {
		t.Fatalf("acquire 2: %v", err)
	}
	if got := s.inUse(); got != 2 {
		t.Fatalf("%d slots in use, want 2", got)
	}
	cancel()
	waitfor.True(t, "the attempt's end gives device 2's slot back", func() bool { return s.inUse() == 1 })
	s.release(2) // already given back by the context: nothing more
	s.release(1)
	if got := s.inUse(); got != 0 {
		t.Fatalf("%d slots in use at the end, want 0", got)
	}
}

// The fleet's counters give a device's slot back at its next connection status or DPS result;
// with a DPS identity, a device without a DPS result (its registration) takes no slot, and a
// failed registration still does not count as a result.
func TestSlotsFollowDeviceEvents(t *testing.T) {
	slots := newConnectSlots(1, 2)
	c := newCounters([]string{"a", "b"}, nil, slots, true)
	f := &Fleet{stats: c, limiter: NewLimiter(nil, 1e6, 1000)}
	bg := context.Background()
	done, cancel := context.WithCancel(bg)
	cancel()
	before := f.beforeConnect(0)
	if err := before(bg); err != nil || slots.inUse() != 0 {
		t.Fatalf("registration: err %v, %d slots in use; want no slot taken", err, slots.inUse())
	}
	c.Provisioned("a", agent.ProvisionFailed, errors.New("x"))
	if err := before(bg); err != nil || slots.inUse() != 0 {
		t.Fatalf("registration after a failed one: err %v, %d slots in use; want no slot taken", err, slots.inUse())
	}
	c.Provisioned("a", agent.ProvisionRegistered, nil)
	if err := before(bg); err != nil || slots.inUse() != 1 {
		t.Fatalf("hub connect: err %v, %d slots in use; want one", err, slots.inUse())
	}
	c.Provisioned("b", agent.ProvisionCached, nil)
	if err := f.beforeConnect(1)(done); !errors.Is(err, context.Canceled) {
		t.Fatalf("device b's hub connect while a holds the only slot: %v, want to wait (the context's error)", err)
	}
	for _, st := range []hub.Status{{State: hub.DisconnectedRetrying, Attempt: 1, Err: errors.New("refused")}, {State: hub.Connected}} {
		if err := before(bg); err != nil {
			t.Fatal(err)
		}
		c.ConnectionStatus("a", st)
		if got := slots.inUse(); got != 0 {
			t.Fatalf("after status %v: %d slots in use, want 0", st.State, got)
		}
	}
	if err := f.beforeConnect(1)(bg); err != nil || slots.inUse() != 1 {
		t.Fatalf("device b: err %v, %d slots in use; want one", err, slots.inUse())
	}
}

// A fleet with one slot connects every device, and reconnects them all after every connection
// was dropped at once: no slot is lost on the way (a lost one would stall the fleet).
func TestRunOneSlotConnectsEveryDevice(t *testing.T) {
	const n = 4
	b, f := brokerFleet(t, n, "connectRate: 1000", Options{ConnectSlots: 1})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	waitfor.True(t, "every device connected through one slot", func() bool { return f.Progress().Connected == n })
	for i := range n {
		b.Drop(fmt.Sprintf("d%d", i))
	}
	waitfor.True(t, "every device reconnected through one slot", func() bool {
		p := f.Progress()
		return p.Connected == n && f.Summary().Reconnects >= n
	})
	if got := f.stats.slots.inUse(); got != 0 {
		t.Errorf("%d slots in use with every device connected, want 0", got)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
}
