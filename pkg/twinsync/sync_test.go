package twinsync_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/twin"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeHub is an in-memory twin endpoint: it keeps desired and reported and can fail PATCHes.
type fakeHub struct {
	mu       sync.Mutex
	desired  map[string]any
	dv       int64
	reported map[string]any
	rv       int64
	gets     int
	patches  []map[string]any
	failNext []int // statuses for the next PATCHes
	changed  chan struct{}
}

func newFakeHub() *fakeHub {
	return &fakeHub{desired: map[string]any{}, dv: 1, reported: map[string]any{}, rv: 1, changed: make(chan struct{}, 1000)}
}

func (f *fakeHub) TwinGet(context.Context) (hub.Response, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.gets++
	d := twin.Clone(f.desired).(map[string]any)
	d["$version"] = f.dv
	r := twin.Clone(f.reported).(map[string]any)
	r["$version"] = f.rv
	b, _ := json.Marshal(map[string]any{"desired": d, "reported": r})
	return hub.Response{Status: 200, Body: b}, nil
}

func (f *fakeHub) TwinPatchReported(_ context.Context, body []byte) (hub.Response, error) {
	f.mu.Lock()
	defer func() { f.mu.Unlock(); f.changed <- struct{}{} }()
	p, err := twin.Decode(body)
	if err != nil {
		return hub.Response{Status: 400}, &hub.StatusError{Status: 400}
	}
	if len(f.failNext) > 0 {
		st := f.failNext[0]
		f.failNext = f.failNext[1:]
		f.patches = append(f.patches, nil)
		return hub.Response{Status: st}, &hub.StatusError{Status: st, Code: st * 1000, Message: "injected"}
	}
	f.patches = append(f.patches, p)
	f.reported = twin.Merge(f.reported, p)
	f.rv++
	return hub.Response{Status: 204, Version: f.rv, HasVersion: true}, nil
}

// setDesired changes desired and returns the notification the hub would send.
func (f *fakeHub) setDesired(patch string) *hub.DesiredPatch {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, _ := twin.Decode([]byte(patch))
	f.desired = twin.Merge(f.desired, p)
	f.dv++
	p["$version"] = f.dv
	b, _ := json.Marshal(p)
	return &hub.DesiredPatch{Version: f.dv, Body: b}
}

func (f *fakeHub) waitReported(t *testing.T, what string, ok func(r map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		f.mu.Lock()
		b, _ := json.Marshal(f.reported)
		f.mu.Unlock()
		var r map[string]any
		_ = json.Unmarshal(b, &r)
		if ok(r) {
			return r
		}
		select {
		case <-f.changed:
		case <-deadline:
			t.Fatalf("timed out waiting for %s; reported %v", what, r)
		}
	}
}

func ackOf(r map[string]any, k string) (ac, av float64, value any) {
	m, _ := r[k].(map[string]any)
	b, _ := json.Marshal(m)
	var a struct {
		AC, AV float64
		Value  any
	}
	_ = json.Unmarshal(b, &a)
	return a.AC, a.AV, a.Value
}

func run(t *testing.T, s *twinsync.Sync) func() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	return func() { cancel(); <-done }
}

func TestSyncAppliesAcksAndPersists(t *testing.T) {
	dir := t.TempDir()
	f := newFakeHub()
	f.setDesired(`{"interval":5,"other":"x"}`) // made while offline: version 2
	var mu sync.Mutex
	applied := map[string]any{}
	cfg := twinsync.Config{
		DeviceID: "d1", StateDir: dir, Logger: zaptest.NewLogger(t),
		Handlers: map[string]twinsync.Handler{
			"interval": func(_ context.Context, c twinsync.Change) twinsync.Ack {
				mu.Lock()
				applied["interval"] = c.Value
				mu.Unlock()
				return twinsync.Ack{Status: 200}
			},
			"net.mode": func(_ context.Context, c twinsync.Change) twinsync.Ack {
				return twinsync.Ack{Status: 400, Description: "no", Value: "auto"}
			},
		},
		Default: func(context.Context, twinsync.Change) twinsync.Ack {
			return twinsync.Ack{Status: 200, Description: "default"}
		},
		Facts: map[string]any{"agentVersion": "t1"},
	}
	s, err := twinsync.New(f, cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	s.Connected()
	r := f.waitReported(t, "acks for version 2", func(r map[string]any) bool {
		ac, av, _ := ackOf(r, "interval")
		ac2, _, _ := ackOf(r, "other")
		return ac == 200 && av == 2 && ac2 == 200 && r["agentVersion"] == "t1"
	})
	if _, _, v := ackOf(r, "interval"); v != 5.0 {
		t.Fatalf("ack value %v", v)
	}
	// contiguous patch, then a stale one that must be dropped
	p3 := f.setDesired(`{"interval":7,"net":{"mode":"wifi"}}`)
	s.Desired(p3)
	s.Desired(&hub.DesiredPatch{Version: 2, Body: []byte(`{"interval":1,"$version":2}`)})
	r = f.waitReported(t, "acks for version 3", func(r map[string]any) bool {
		ac, av, _ := ackOf(r, "interval")
		n, _ := r["net"].(map[string]any)
		m, _ := n["mode"].(map[string]any)
		return ac == 200 && av == 3 && m != nil
	})
	n := r["net"].(map[string]any)["mode"].(map[string]any)
	if n["ac"] != 400.0 || n["value"] != "auto" || n["ad"] != "no" {
		t.Fatalf("reject ack %v", n)
	}
	mu.Lock()
	if applied["interval"] != json.Number("7") {
		t.Fatalf("handler saw %v", applied["interval"])
	}
	mu.Unlock()

	// a gap in versions makes the sync GET the whole twin
	f.setDesired(`{"interval":8}`)
	p5 := f.setDesired(`{"interval":9}`)
	f.mu.Lock()
	gets := f.gets
	f.mu.Unlock()
	s.Desired(p5)
	f.waitReported(t, "ack for version 5", func(r map[string]any) bool {
		_, av, v := ackOf(r, "interval")
		return av == 5 && v == 9.0
	})
	f.mu.Lock()
	if f.gets != gets+1 {
		t.Fatalf("gets %d, want %d", f.gets, gets+1)
	}
	f.mu.Unlock()
	if err := s.Report(map[string]any{"local": "kept"}); err != nil {
		t.Fatal(err)
	}
	f.waitReported(t, "local", func(r map[string]any) bool { return r["local"] == "kept" })
	stop()

	// restart against a hub that lost reported state: the intended state is sent again, and
	// nothing already applied is applied again
	f2 := newFakeHub()
	f2.desired, f2.dv = f.desired, f.dv
	s2, err := twinsync.New(f2, cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop2 := run(t, s2)
	defer stop2()
	mu.Lock()
	applied = map[string]any{}
	mu.Unlock()
	s2.Connected()
	f2.waitReported(t, "intended state restored", func(r map[string]any) bool {
		_, av, _ := ackOf(r, "interval")
		return r["local"] == "kept" && av == 5
	})
	mu.Lock()
	defer mu.Unlock()
	if len(applied) != 0 {
		t.Fatalf("restart re-applied %v", applied)
	}
}

func TestSyncRetriesThrottlingAndDropsRejected(t *testing.T) {
	f := newFakeHub()
	f.failNext = []int{429, 503}
	s, err := twinsync.New(f, twinsync.Config{DeviceID: "d2", RetryMin: time.Millisecond, RetryMax: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	defer stop()
	s.Connected()
	if err := s.Report(map[string]any{"a": json.Number("1")}); err != nil {
		t.Fatal(err)
	}
	f.waitReported(t, "a after 429 and 503", func(r map[string]any) bool { return r["a"] == 1.0 })
	f.mu.Lock()
	f.failNext = []int{400}
	f.mu.Unlock()
	if err := s.Report(map[string]any{"b": "x"}); err != nil {
		t.Fatal(err)
	}
	// the 400 is not retried: a later report goes out alone
	f.waitReported(t, "400 consumed", func(map[string]any) bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return len(f.failNext) == 0
	})
	if err := s.Report(map[string]any{"c": "y"}); err != nil {
		t.Fatal(err)
	}
	r := f.waitReported(t, "c", func(r map[string]any) bool { return r["c"] == "y" })
	if r["b"] != nil {
		t.Fatalf("rejected patch retried: %v", r)
	}
	f.mu.Lock()
	last := f.patches[len(f.patches)-1]
	f.mu.Unlock()
	if fmt.Sprint(last) != "map[c:y]" {
		t.Fatalf("last patch %v", last)
	}
	// the document rules apply to Report too
	if err := s.Report(map[string]any{"bad.key": 1}); err == nil {
		t.Fatal("bad key accepted")
	}
}

// A twin whose desired version went back (device re-created) is applied, not ignored.
func TestSyncDesiredVersionWentBack(t *testing.T) {
	dir := t.TempDir()
	var mu sync.Mutex
	var seen []any
	cfg := twinsync.Config{DeviceID: "d3", StateDir: dir, Handlers: map[string]twinsync.Handler{
		"mode": func(_ context.Context, c twinsync.Change) twinsync.Ack {
			mu.Lock()
			seen = append(seen, c.Value)
			mu.Unlock()
			return twinsync.Ack{Status: 200}
		},
	}}
	f := newFakeHub()
	for i := 0; i < 5; i++ {
		f.setDesired(`{"mode":"old"}`)
	}
	s, err := twinsync.New(f, cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	s.Connected()
	f.waitReported(t, "ack at version 6", func(r map[string]any) bool { _, av, _ := ackOf(r, "mode"); return av == 6 })
	stop()

	f2 := newFakeHub() // the device was deleted and created again: desired starts at 1
	f2.setDesired(`{"mode":"new"}`)
	s2, err := twinsync.New(f2, cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop2 := run(t, s2)
	defer stop2()
	s2.Connected()
	f2.waitReported(t, "ack at version 2", func(r map[string]any) bool {
		_, av, v := ackOf(r, "mode")
		return av == 2 && v == "new"
	})
	p3 := f2.setDesired(`{"mode":"newer"}`)
	s2.Desired(p3)
	f2.waitReported(t, "ack at version 3", func(r map[string]any) bool { _, av, v := ackOf(r, "mode"); return av == 3 && v == "newer" })
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(seen) != "[old new newer]" {
		t.Fatalf("handler saw %v", seen)
	}
}
