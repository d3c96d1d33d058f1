package twinsync

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/hub"
)

// countingHub answers every GET with an empty twin and takes every PATCH, counting both.
type countingHub struct {
	mu            sync.Mutex
	gets, patches int
}

func (h *countingHub) TwinGet(context.Context) (hub.Response, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.gets++
	return hub.Response{Status: 200, Body: []byte(`{"desired":{"$version":1},"reported":{"$version":1}}`)}, nil
}

func (h *countingHub) TwinPatchReported(context.Context, []byte) (hub.Response, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.patches++
	return hub.Response{Status: 204, Version: 2, HasVersion: true}, nil
}

func (h *countingHub) counts() (int, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.gets, h.patches
}

// An idle sync holds no goroutine: the working goroutine exits when nothing is queued and no
// timer is pending, and Connected and Report start one again.
func TestSyncHoldsNoGoroutineWhileIdle(t *testing.T) {
	h := &countingHub{}
	s, err := New(h, Config{DeviceID: "idle"})
	if err != nil {
		t.Fatal(err)
	}
	s.idleHook = make(chan struct{}, 16)
	idle := func(what string) {
		t.Helper()
		select {
		case <-s.idleHook:
		case <-time.After(10 * time.Second):
			t.Fatalf("the sync did not go idle %s", what)
		}
		s.mu.Lock()
		running := s.running
		s.mu.Unlock()
		if running {
			t.Fatalf("still running after going idle %s", what)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.Start(ctx)
	idle("before the first connect")
	s.Connected()
	idle("after the twin GET")
	if gets, _ := h.counts(); gets != 1 {
		t.Fatalf("%d GETs after a connect, want 1", gets)
	}
	if err := s.Report(map[string]any{"a": "1"}); err != nil {
		t.Fatal(err)
	}
	idle("after the reported PATCH")
	if _, patches := h.counts(); patches != 1 {
		t.Fatalf("%d PATCHes after a report, want 1", patches)
	}
	cancel()
	s.Wait()
	s.Connected() // after Wait: starts nothing
	s.mu.Lock()
	running := s.running
	s.mu.Unlock()
	if running {
		t.Fatal("a goroutine started after Wait")
	}
}
