package hub_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/spool"
)

func openSpool(t *testing.T, dir string) *spool.Spool {
	t.Helper()
	sp, err := spool.Open(dir, spool.Options{Clock: clock.NewFake(time.Unix(0, 0))})
	if err != nil {
		t.Fatal(err)
	}
	return sp
}

// Messages accepted while offline stay in the spool when the session closes, and the next
// session on the spool sends them first, in order, and removes them once acknowledged.
func TestSpooledQueueOutlivesTheSession(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	dir := t.TempDir()
	sp := openSpool(t, dir)
	d := &offlineDialer{}
	d.offline.Store(true)
	f := start(t, b, func(c *hub.Config) { c.Dial = d.dial; c.Spool = sp })
	f.status.wait(t, hub.DisconnectedRetrying, hub.NoNetwork)
	for i := range 5 {
		if err := f.s.Enqueue(&hub.Message{MessageID: fmt.Sprint("p", i)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := f.s.Close(ctx); !errors.Is(err, hub.ErrClosed) {
		t.Fatalf("Close: %v, want ErrClosed with messages undelivered", err)
	}
	if err := sp.Close(); err != nil {
		t.Fatal(err)
	}

	sp = openSpool(t, dir)
	defer sp.Close()
	if n := sp.Stats().Records; n != 5 {
		t.Fatalf("%d records in the reopened spool, want 5", n)
	}
	g := start(t, b, func(c *hub.Config) { c.Spool = sp })
	if err := g.s.Send(ctxT(t), &hub.Message{MessageID: "p5"}); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(b.TelemetryMIDs(), ","); got != "p0,p1,p2,p3,p4,p5" {
		t.Fatalf("delivered %s", got)
	}
	waitFor(t, func() bool { return sp.Stats().Records == 0 }, "spool empty after the PUBACKs")
}

func TestDropOldestWhenFull(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	d := &offlineDialer{}
	d.offline.Store(true)
	sp := openSpool(t, t.TempDir())
	defer sp.Close()
	f, clk := startFake(t, b, func(c *hub.Config) {
		c.Dial = d.dial
		c.QueueCapacity = 3
		c.WhenFull = hub.WhenFullDropOldest
		c.Spool = sp
	})
	st := f.status.wait(t, hub.DisconnectedRetrying, hub.NoNetwork)
	results := make([]chan error, 5)
	for i := range 5 {
		ch := make(chan error, 1)
		results[i] = ch
		if err := f.s.Enqueue(&hub.Message{MessageID: fmt.Sprint("d", i)}, func(err error) { ch <- err }); err != nil {
			t.Fatalf("d%d refused: %v", i, err)
		}
	}
	for i := range 2 {
		if err := <-results[i]; !errors.Is(err, hub.ErrDropped) {
			t.Fatalf("d%d: %v, want ErrDropped", i, err)
		}
	}
	if n := f.s.Stats().Dropped; n != 2 {
		t.Fatalf("Stats.Dropped = %d, want 2", n)
	}
	d.offline.Store(false)
	retry(t, clk, st)
	for i := 2; i < 5; i++ {
		if err := <-results[i]; err != nil {
			t.Fatalf("d%d: %v", i, err)
		}
	}
	if got := strings.Join(b.TelemetryMIDs(), ","); got != "d2,d3,d4" {
		t.Fatalf("delivered %s", got)
	}
	waitFor(t, func() bool { return sp.Stats().Records == 0 }, "spool empty")
}

func TestMaxBytesRefusesNewest(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	d := &offlineDialer{}
	d.offline.Store(true)
	sp := openSpool(t, t.TempDir())
	defer sp.Close()
	body := make([]byte, 1000)
	f := start(t, b, func(c *hub.Config) { c.Dial = d.dial; c.Spool = sp; c.QueueMaxBytes = 3500 })
	accepted := 0
	var err error
	for i := range 10 {
		if err = f.s.Enqueue(&hub.Message{MessageID: fmt.Sprint("b", i), Body: body}, nil); err != nil {
			break
		}
		accepted++
	}
	if !errors.Is(err, hub.ErrQueueFull) {
		t.Fatalf("after %d messages: %v, want ErrQueueFull", accepted, err)
	}
	if accepted != 3 {
		t.Fatalf("%d messages of ~1 KB accepted under QueueMaxBytes 3500, want 3", accepted)
	}
	if got := sp.Bytes(); got > 3500 {
		t.Fatalf("spool holds %d bytes, over the bound", got)
	}
	if n := f.s.Stats().Rejected; n != 1 {
		t.Fatalf("Stats.Rejected = %d, want 1", n)
	}
}
