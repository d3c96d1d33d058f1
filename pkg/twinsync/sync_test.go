package twinsync_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/pkg/backoff"
	"github.com/iothubby/iothubby/pkg/clock"
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

// waitTimer waits (with a deadline) until the sync has armed its timer for at.
func waitTimer(t *testing.T, fc *clock.Fake, at time.Time) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := fc.WaitTimer(ctx, at); err != nil {
		t.Fatal(err)
	}
}

func (f *fakeHub) patchCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.patches)
}

func TestSyncRetriesThrottlingAndDropsRejected(t *testing.T) {
	f := newFakeHub()
	f.failNext = []int{429, 503}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	fc := clock.NewFake(t0)
	s, err := twinsync.New(f, twinsync.Config{DeviceID: "d2", Clock: fc, Rand: func() float64 { return 0.75 },
		Backoff: backoff.Policy{Min: time.Second, Max: 30 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	defer stop()
	s.Connected()
	if err := s.Report(map[string]any{"a": json.Number("1")}); err != nil {
		t.Fatal(err)
	}
	// the 429 arms the retry at the policy's first delay (0.75 of 1 s, raised to the 1 s floor)
	// and nothing is sent again until the clock gets there
	waitTimer(t, fc, t0.Add(time.Second))
	if n := f.patchCount(); n != 1 {
		t.Fatalf("%d PATCHes before the retry was due, want 1", n)
	}
	fc.Advance(time.Second)
	// the 503 doubles the ceiling: 0.75 of 2 s
	waitTimer(t, fc, t0.Add(time.Second+1500*time.Millisecond))
	if n := f.patchCount(); n != 2 {
		t.Fatalf("%d PATCHes before the second retry was due, want 2", n)
	}
	fc.Advance(1500 * time.Millisecond)
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

// A deferred acknowledgement (Change.Later) is sent when the clock reaches it, not before, and
// one that a newer desired version superseded is not sent at all.
func TestSyncDeferredAckOnFakeClock(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	fc := clock.NewFake(t0)
	f := newFakeHub()
	f.setDesired(`{"mode":"a"}`) // version 2
	cfg := twinsync.Config{DeviceID: "d4", Clock: fc, Logger: zaptest.NewLogger(t), Handlers: map[string]twinsync.Handler{
		"mode": func(_ context.Context, c twinsync.Change) twinsync.Ack {
			c.Later(10*time.Minute, twinsync.Ack{Status: 200, Description: "done"})
			return twinsync.Ack{Status: 202}
		},
	}}
	s, err := twinsync.New(f, cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	defer stop()
	s.Connected()
	f.waitReported(t, "202 for version 2", func(r map[string]any) bool { ac, av, _ := ackOf(r, "mode"); return ac == 202 && av == 2 })
	waitTimer(t, fc, t0.Add(10*time.Minute))
	fc.Advance(10 * time.Minute)
	r := f.waitReported(t, "200 for version 2", func(r map[string]any) bool { ac, av, _ := ackOf(r, "mode"); return ac == 200 && av == 2 })
	if m := r["mode"].(map[string]any); m["ad"] != "done" || m["value"] != "a" {
		t.Fatalf("final ack %v", m)
	}

	// version 3 is superseded by version 4 before its ack is due: only 4 is acknowledged 200
	t1 := fc.Now()
	s.Desired(f.setDesired(`{"mode":"b"}`))
	f.waitReported(t, "202 for version 3", func(r map[string]any) bool { ac, av, _ := ackOf(r, "mode"); return ac == 202 && av == 3 })
	waitTimer(t, fc, t1.Add(10*time.Minute))
	fc.Advance(time.Minute)
	s.Desired(f.setDesired(`{"mode":"c"}`))
	f.waitReported(t, "202 for version 4", func(r map[string]any) bool { ac, av, _ := ackOf(r, "mode"); return ac == 202 && av == 4 })
	fc.Advance(9 * time.Minute) // version 3's ack is due now, version 4's in a minute
	waitTimer(t, fc, t1.Add(11*time.Minute))
	fc.Advance(time.Minute)
	f.waitReported(t, "200 for version 4", func(r map[string]any) bool { ac, av, _ := ackOf(r, "mode"); return ac == 200 && av == 4 })
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range f.patches {
		if ac, av, _ := ackOf(p, "mode"); ac == 200 && av == 3 {
			t.Fatalf("superseded version 3 acknowledged: %v", p)
		}
	}
}

// blockingWriter is a state writer whose writes wait for release; it records what was written.
type blockingWriter struct {
	entered chan struct{}
	release chan struct{}
	mu      sync.Mutex
	writes  []map[string]any // the reported section of each write, in order
}

func (w *blockingWriter) write(_ string, b []byte) error {
	w.entered <- struct{}{}
	<-w.release
	var st struct{ Reported map[string]any }
	if err := json.Unmarshal(b, &st); err != nil {
		return err
	}
	w.mu.Lock()
	w.writes = append(w.writes, st.Reported)
	w.mu.Unlock()
	return nil
}

func within(t *testing.T, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); f() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not complete while a state write was blocked", what)
	}
}

// The state file is written outside the lock that the session's delivery paths take: with a
// write stuck on the disk, Connected, Desired and Intended still complete, and writes queued
// behind it never put an older snapshot over a newer one.
func TestSyncStateWriteDoesNotBlockDelivery(t *testing.T) {
	w := &blockingWriter{entered: make(chan struct{}, 16), release: make(chan struct{})}
	f := newFakeHub()
	s, err := twinsync.New(f, twinsync.Config{DeviceID: "d5", StateDir: t.TempDir(), WriteFile: w.write})
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 3)
	go func() { errs <- s.Report(map[string]any{"a": "1"}) }()
	select {
	case <-w.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the first write never started")
	}
	// the write of {a} is stuck; the delivery paths go on
	within(t, "Connected", s.Connected)
	within(t, "Desired", func() { s.Desired(&hub.DesiredPatch{Version: 2, Body: []byte(`{"x":1,"$version":2}`)}) })
	within(t, "Intended", func() { _ = s.Intended() })
	// two more reports queue behind the stuck write; their changes are in memory at once
	go func() { errs <- s.Report(map[string]any{"b": "2"}) }()
	go func() { errs <- s.Report(map[string]any{"c": "3"}) }()
	close(w.release)
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.writes) < 2 || len(w.writes) > 3 {
		t.Fatalf("%d writes, want 2 or 3: %v", len(w.writes), w.writes)
	}
	for i := 1; i < len(w.writes); i++ {
		if len(w.writes[i]) < len(w.writes[i-1]) {
			t.Fatalf("write %d (%v) is older than write %d (%v)", i, w.writes[i], i-1, w.writes[i-1])
		}
	}
	if last := w.writes[len(w.writes)-1]; fmt.Sprint(last) != "map[a:1 b:2 c:3]" {
		t.Fatalf("last write %v, want a, b and c", last)
	}
}

// With an unwritable state directory the sync goes on from memory: Report says the change was
// not saved (and still sends it), desired properties are applied and acknowledged, and the
// failure is logged with the path.
func TestSyncUnwritableStateDir(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	core, logs := observer.New(zap.ErrorLevel)
	f := newFakeHub()
	f.setDesired(`{"interval":5}`)
	s, err := twinsync.New(f, twinsync.Config{DeviceID: "d6", StateDir: stateDir, Logger: zap.New(core),
		Default: func(context.Context, twinsync.Change) twinsync.Ack { return twinsync.Ack{Status: 200} }})
	if err != nil {
		t.Fatal(err)
	}
	// the state directory's name is taken by a regular file: no write can succeed, even as root
	if err := os.WriteFile(stateDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	defer stop()
	err = s.Report(map[string]any{"a": "1"})
	if !errors.Is(err, twinsync.ErrNotPersisted) || !strings.Contains(err.Error(), stateDir) {
		t.Fatalf("Report: %v, want ErrNotPersisted naming %s", err, stateDir)
	}
	s.Connected()
	f.waitReported(t, "a and the ack of interval", func(r map[string]any) bool {
		ac, av, _ := ackOf(r, "interval")
		return r["a"] == "1" && ac == 200 && av == 2
	})
	stop()
	found := false
	for _, e := range logs.FilterMessageSnippet("twin state not saved").All() {
		if strings.Contains(fmt.Sprint(e.ContextMap()["path"]), stateDir) {
			found = true
		}
	}
	if !found {
		t.Fatalf("no error logged naming the state path; logs: %v", logs.All())
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

// A damaged state file is set aside (renamed with a timestamp, logged) and the sync starts
// from the hub's twin instead of failing: the agent must not exit and restart forever.
func TestSyncDamagedStateSetAside(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "twin-d9.json")
	if err := os.WriteFile(p, []byte(`{"desiredVersion": 4, "desired": {`), 0o600); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.WarnLevel)
	f := newFakeHub()
	f.setDesired(`{"interval":5}`)
	s, err := twinsync.New(f, twinsync.Config{DeviceID: "d9", StateDir: dir, Logger: zap.New(core),
		Default: func(context.Context, twinsync.Change) twinsync.Ack { return twinsync.Ack{Status: 200} }})
	if err != nil {
		t.Fatalf("New with a damaged state file: %v", err)
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("damaged state file still in place: %v", err)
	}
	aside, _ := filepath.Glob(p + ".damaged-*")
	if len(aside) != 1 {
		t.Fatalf("set-aside files: %v", aside)
	}
	if b, _ := os.ReadFile(aside[0]); string(b) != `{"desiredVersion": 4, "desired": {` {
		t.Fatalf("set-aside content changed: %q", b)
	}
	w := logs.FilterMessageSnippet("twin state file damaged").All()
	if len(w) != 1 || fmt.Sprint(w[0].ContextMap()["set_aside_as"]) != aside[0] {
		t.Fatalf("warning: %+v", w)
	}
	stop := run(t, s)
	defer stop()
	s.Connected()
	f.waitReported(t, "the ack of interval from the hub's twin", func(r map[string]any) bool {
		ac, _, _ := ackOf(r, "interval")
		return ac == 200
	})
}

// SetHandlers swaps the handlers of a running sync: the next change goes to the new handlers
// (a new path, and the default), what was acknowledged before is not acknowledged again.
func TestSyncSetHandlers(t *testing.T) {
	f := newFakeHub()
	f.setDesired(`{"mode":"a","other":1}`) // version 2
	accept := func(context.Context, twinsync.Change) twinsync.Ack { return twinsync.Ack{Status: 200} }
	s, err := twinsync.New(f, twinsync.Config{DeviceID: "d1", Logger: zaptest.NewLogger(t),
		Handlers: map[string]twinsync.Handler{"mode": accept}, Default: accept})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	defer stop()
	s.Connected()
	f.waitReported(t, "acks for version 2", func(r map[string]any) bool {
		ac, av, _ := ackOf(r, "mode")
		ac2, _, _ := ackOf(r, "other")
		return ac == 200 && av == 2 && ac2 == 200
	})
	reject := func(context.Context, twinsync.Change) twinsync.Ack { return twinsync.Ack{Status: 409, Value: "kept"} }
	s.SetHandlers(map[string]twinsync.Handler{"mode": reject, "net.speed": reject}, nil)
	patches := f.patchCount()
	s.Desired(f.setDesired(`{"mode":"b","net":{"speed":9},"other":2}`)) // version 3
	r := f.waitReported(t, "acks for version 3", func(r map[string]any) bool {
		_, av, _ := ackOf(r, "mode")
		return av == 3
	})
	if ac, _, v := ackOf(r, "mode"); ac != 409 || v != "kept" {
		t.Errorf("mode after SetHandlers: ac %v value %v, want the new handler's 409", ac, v)
	}
	speed, _ := r["net"].(map[string]any)
	if ac, _, _ := ackOf(speed, "speed"); ac != 409 {
		t.Errorf("net.speed (a path only the new handlers cover): ac %v, want 409", ac)
	}
	if _, av, _ := ackOf(r, "other"); av != 2 {
		t.Errorf("other acknowledged at version %v after the default was removed, want still 2", av)
	}
	if n := f.patchCount() - patches; n != 1 {
		t.Errorf("%d reported patches for version 3, want 1", n)
	}
}

// SetFacts reports new and changed facts at once and deletes the facts no longer given; the
// next connect reports the new facts.
func TestSyncSetFacts(t *testing.T) {
	f := newFakeHub()
	s, err := twinsync.New(f, twinsync.Config{DeviceID: "d1", Logger: zaptest.NewLogger(t),
		Facts: map[string]any{"agentVersion": "1", "rack": 3}})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	defer stop()
	s.Connected()
	f.waitReported(t, "the first facts", func(r map[string]any) bool { return r["rack"] == 3.0 && r["agentVersion"] == "1" })
	if err := s.SetFacts(map[string]any{"agentVersion": "1", "site": "lab"}); err != nil {
		t.Fatal(err)
	}
	r := f.waitReported(t, "the new facts", func(r map[string]any) bool { return r["site"] == "lab" })
	if _, ok := r["rack"]; ok {
		t.Errorf("rack still reported after SetFacts dropped it: %v", r)
	}
	f.mu.Lock()
	last := f.patches[len(f.patches)-1]
	f.mu.Unlock()
	if _, sent := last["agentVersion"]; sent {
		t.Errorf("unchanged fact sent again: %v", last)
	}
}

// A first connect that brings nothing to remember (the facts, which come from the
// configuration, and a desired document with only its version moved on) writes no state file;
// the first real change writes the whole state, facts included. After a restart on that
// state the device acknowledges nothing twice.
func TestSyncWritesStateOnlyForChanges(t *testing.T) {
	dir := t.TempDir()
	var mu sync.Mutex
	var writes []string
	write := func(path string, data []byte) error {
		mu.Lock()
		writes = append(writes, string(data))
		mu.Unlock()
		return os.WriteFile(path, data, 0o600)
	}
	nwrites := func() int { mu.Lock(); defer mu.Unlock(); return len(writes) }
	f := newFakeHub() // desired version 1, empty
	acks := 0
	cfg := twinsync.Config{DeviceID: "d9", StateDir: dir, WriteFile: write, Logger: zaptest.NewLogger(t),
		Facts: map[string]any{"agentVersion": "v1"},
		Default: func(context.Context, twinsync.Change) twinsync.Ack {
			mu.Lock()
			acks++
			mu.Unlock()
			return twinsync.Ack{Status: 200}
		}}
	s, err := twinsync.New(f, cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, s)
	s.Connected()
	f.waitReported(t, "the facts", func(r map[string]any) bool { return r["agentVersion"] == "v1" })
	if n := nwrites(); n != 0 {
		t.Fatalf("the first connect wrote the state file %d times (%q); nothing in it needs keeping", n, writes)
	}
	s.Desired(f.setDesired(`{"interval":5}`))
	f.waitReported(t, "the ack of interval", func(r map[string]any) bool { ac, av, _ := ackOf(r, "interval"); return ac == 200 && av == 2 })
	stop()
	mu.Lock()
	last := writes[len(writes)-1]
	mu.Unlock()
	if !strings.Contains(last, `"desiredVersion":2`) || !strings.Contains(last, `"agentVersion":"v1"`) {
		t.Fatalf("the change wrote %s; want desired version 2 with the facts", last)
	}
	// A restart on that state: the same twin again is not applied again (the GET is applied
	// on the sync's goroutine before stop returns).
	got := &notifyGet{fakeHub: f, got: make(chan struct{}, 1)}
	s, err = twinsync.New(got, cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop = run(t, s)
	defer stop()
	s.Connected()
	select {
	case <-got.got:
	case <-time.After(10 * time.Second):
		t.Fatal("no twin GET after the restart's connect")
	}
	stop()
	mu.Lock()
	defer mu.Unlock()
	if acks != 1 {
		t.Fatalf("interval acknowledged %d times across the restart, want 1", acks)
	}
}

// notifyGet is a fakeHub that signals each twin GET it answered.
type notifyGet struct {
	*fakeHub
	got chan struct{}
}

func (n *notifyGet) TwinGet(ctx context.Context) (hub.Response, error) {
	r, err := n.fakeHub.TwinGet(ctx)
	select {
	case n.got <- struct{}{}:
	default:
	}
	return r, err
}
