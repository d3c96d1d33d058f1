//go:build !race

// The race detector's instrumentation makes every frame larger, so stack sizes are only
// meaningful without it.

package hub_test

import (
	"context"
	"fmt"
	"runtime"
	"testing"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
)

func stackInUse() uint64 {
	runtime.GC()
	runtime.GC() // the second cycle shrinks what the first found oversized
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.StackInuse
}

// TestTwinResponseKeepsRouterStack: the twin response every connect brings is handled on paho's
// router goroutine without growing its stack past the 2 KiB it starts with. Once grown, the
// runtime keeps a stack at 4 KiB for as long as the goroutine waits more than 224 bytes deep,
// which paho's router does: a deep handler would cost 2 KiB per device for the connection's life.
// Measured as the process's stack in use before and after one twin GET per session (the
// hubtest broker in the same process answers each on goroutines that exist already).
func TestTwinResponseKeepsRouterStack(t *testing.T) {
	if testing.Short() {
		t.Skip("measures stacks")
	}
	b := hubtest.NewBroker(t)
	const n = 100
	sessions := make([]*hub.Session, 0, n)
	t.Cleanup(func() {
		for _, s := range sessions {
			if err := s.Close(context.Background()); err != nil {
				t.Error(err)
			}
		}
	})
	for i := range n {
		cfg := baseConfig(b)
		cfg.DeviceID = fmt.Sprintf("dev%d", i)
		s, err := hub.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		sessions = append(sessions, s)
		if err := s.WaitConnected(ctxT(t)); err != nil {
			t.Fatal(err)
		}
	}
	before := stackInUse()
	for _, s := range sessions {
		if _, err := s.TwinGet(ctxT(t)); err != nil {
			t.Fatal(err)
		}
	}
	grown := (int64(stackInUse()) - int64(before)) / n
	t.Logf("stack in use per session: %d B before the twin GET, %+d B after", before/n, grown)
	if grown >= 1024 {
		t.Errorf("a twin response grew the stacks by %d B per session: paho's router goroutine (2 KiB) "+
			"no longer holds the inbound handler's deepest call", grown)
	}
}
