package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hubsim/methods"
	"github.com/iothubby/iothubby/pkg/hubsim/twins"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// memStore is an in-memory Store.
type memStore struct {
	mu      sync.Mutex
	b       map[string]map[string][]byte
	changed chan struct{} // signalled after every write
}

func (s *memStore) LoadBlobs(bucket string) (map[string][]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.b[bucket]), nil
}
func (s *memStore) StoreBlobs(bucket string, put map[string][]byte, del []string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b == nil {
		s.b = map[string]map[string][]byte{}
	}
	if s.b[bucket] == nil {
		s.b[bucket] = map[string][]byte{}
	}
	for k, v := range put {
		s.b[bucket][k] = v
	}
	for _, k := range del {
		delete(s.b[bucket], k)
	}
	select {
	case s.changed <- struct{}{}:
	default:
	}
	return nil
}

// fakeDevices are twins in memory.
type fakeDevices struct {
	mu      sync.Mutex
	tags    map[string]map[string]any
	patches map[string][]string
}

func newDevices(tags map[string]map[string]any) *fakeDevices {
	return &fakeDevices{tags: tags, patches: map[string][]string{}}
}
func (d *fakeDevices) IDs() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Sorted(maps.Keys(d.tags))
}
func (d *fakeDevices) Get(id string) (twins.Twin, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t, ok := d.tags[id]
	if !ok {
		return twins.Twin{}, wire.ErrDeviceNotFound
	}
	return twins.Twin{DeviceID: id, Tags: maps.Clone(t)}, nil
}
func (d *fakeDevices) Update(id, ifMatch string, body []byte) (twins.Twin, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.tags[id]; !ok {
		return twins.Twin{}, wire.ErrDeviceNotFound.WithText("Device %s not registered", id)
	}
	if ifMatch != "*" {
		return twins.Twin{}, errors.New("job sent If-Match " + ifMatch)
	}
	d.patches[id] = append(d.patches[id], string(body))
	return twins.Twin{DeviceID: id}, nil
}
func (d *fakeDevices) patched() map[string]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[string]int{}
	for k, v := range d.patches {
		out[k] = len(v)
	}
	return out
}

// fakeMethods answers 200 for online devices, 404103 for the others; calls to blocked devices
// wait until released or cancelled.
type fakeMethods struct {
	offline map[string]bool
	block   chan struct{} // nil: never block
	started chan string
}

func (m *fakeMethods) Invoke(ctx context.Context, id string, req methods.Request) (methods.Result, error) {
	if m.started != nil {
		m.started <- id
	}
	if m.offline[id] {
		return methods.Result{}, &methods.CallError{Status: 404, Code: 404103, Message: "Timed out waiting for device to connect."}
	}
	if m.block != nil {
		select {
		case <-m.block:
		case <-ctx.Done():
			return methods.Result{}, ctx.Err()
		}
	}
	return methods.Result{Status: 200, Payload: json.RawMessage(`{"id":"` + id + `","m":"` + req.MethodName + `"}`)}, nil
}

type env struct {
	t     *testing.T
	clk   *clock.Fake
	store *memStore
	devs  *fakeDevices
	meth  *fakeMethods
	r     *Runner
}

func newEnv(t *testing.T, cfg Config) *env {
	e := &env{t: t, clk: clock.NewFake(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)), store: &memStore{changed: make(chan struct{}, 1)}, meth: &fakeMethods{}}
	e.devs = newDevices(map[string]map[string]any{
		"a1": {"site": "north"}, "a2": {"site": "north"}, "b1": {"site": "south"}, "c1": {},
	})
	e.open(cfg)
	return e
}

func (e *env) open(cfg Config) {
	cfg.Store, cfg.Devices, cfg.Methods, cfg.Clock = e.store, e.devs, e.meth, e.clk
	r, err := Open(cfg, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	e.r = r
	e.t.Cleanup(func() { r.Close() })
}

// wait re-reads the job after every store write (every job transition is written) until cond
// holds, or fails after a deadline.
func (e *env) wait(id string, what string, cond func(service.Job) bool) service.Job {
	e.t.Helper()
	deadline := time.NewTimer(20 * time.Second)
	defer deadline.Stop()
	for {
		j, err := e.r.Get(id)
		if err == nil && cond(j) {
			return j
		}
		select {
		case <-e.store.changed:
		case <-deadline.C:
			e.t.Fatalf("job %s never became %s: %+v (err %v)", id, what, j, err)
		}
	}
}

func finished(j service.Job) bool { return service.JobFinished(j.Status) }

func twinJob(id, cond string) service.JobRequest {
	return service.JobRequest{JobID: id, Type: service.JobTypeUpdateTwin, QueryCondition: cond,
		UpdateTwin: json.RawMessage(`{"etag":"*","tags":{"fw":"2"},"properties":{"desired":{"x":1}}}`)}
}

func TestTwinJobReachesMatchingDevicesOnly(t *testing.T) {
	e := newEnv(t, Config{})
	j, err := e.r.Schedule(twinJob("j1", "tags.site = 'north'"))
	if err != nil {
		t.Fatal(err)
	}
	if j.Status != service.JobQueued || j.MaxExecutionTimeInSeconds != 3600 || !j.StartTime.Equal(e.clk.Now()) {
		t.Errorf("new job %+v", j)
	}
	j = e.wait("j1", "finished", finished)
	if j.Status != service.JobCompleted || j.EndTime == nil {
		t.Fatalf("job %+v", j)
	}
	s := j.DeviceJobStatistics
	if s.DeviceCount != 2 || s.SucceededCount != 2 || s.FailedCount != 0 || s.PendingCount != 0 || s.RunningCount != 0 {
		t.Errorf("statistics %+v", s)
	}
	if got := e.devs.patched(); len(got) != 2 || got["a1"] != 1 || got["a2"] != 1 {
		t.Errorf("patched %v", got)
	}
	rows := e.r.DeviceJobs()
	if len(rows) != 2 || rows[0].DeviceID != "a1" || rows[0].Status != service.DeviceJobCompleted || rows[0].JobType != service.JobTypeUpdateTwin || rows[0].EndTimeUTC == nil {
		t.Errorf("device rows %+v", rows)
	}
}

func TestMethodJobRecordsOutcomesAndOfflineDevices(t *testing.T) {
	e := newEnv(t, Config{})
	e.meth.offline = map[string]bool{"b1": true}
	_, err := e.r.Schedule(service.JobRequest{JobID: "m1", Type: service.JobTypeDeviceMethod, QueryCondition: "*",
		CloudToDeviceMethod: &service.CloudToDeviceMethod{MethodName: "ping", Payload: json.RawMessage(`{"a":1}`)}})
	if err != nil {
		t.Fatal(err)
	}
	j := e.wait("m1", "finished", finished)
	if j.Status != service.JobCompleted || j.DeviceJobStatistics.DeviceCount != 4 || j.DeviceJobStatistics.SucceededCount != 3 || j.DeviceJobStatistics.FailedCount != 1 {
		t.Fatalf("job %+v stats %+v", j, j.DeviceJobStatistics)
	}
	for _, row := range e.r.DeviceJobs() {
		switch row.DeviceID {
		case "b1":
			if row.Status != service.DeviceJobFailed || row.Error == nil || row.Error.Code != "DeviceNotOnline" || row.Outcome != nil {
				t.Errorf("offline row %+v", row)
			}
		default:
			if row.Status != service.DeviceJobCompleted || row.Outcome == nil || row.Outcome.DeviceMethodResponse.Status != 200 ||
				!strings.Contains(string(row.Outcome.DeviceMethodResponse.Payload), `"id":"`+row.DeviceID+`"`) {
				t.Errorf("row %+v", row)
			}
		}
	}
}

func TestScheduledStartWaitsForTheClock(t *testing.T) {
	e := newEnv(t, Config{})
	start := e.clk.Now().Add(time.Hour)
	req := twinJob("later", "*")
	req.StartTime = &start
	j, err := e.r.Schedule(req)
	if err != nil || j.Status != service.JobScheduled {
		t.Fatalf("%+v %v", j, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.clk.WaitTimer(ctx, start); err != nil {
		t.Fatal(err)
	}
	e.clk.Advance(59 * time.Minute)
	if j, _ := e.r.Get("later"); j.Status != service.JobScheduled || len(e.devs.patched()) != 0 {
		t.Fatalf("job ran early: %+v", j)
	}
	e.clk.Advance(time.Minute)
	j = e.wait("later", "finished", finished)
	if j.DeviceJobStatistics.SucceededCount != 4 {
		t.Errorf("stats %+v", j.DeviceJobStatistics)
	}
}

func TestConcurrencyLimitQueuesAndCancel(t *testing.T) {
	e := newEnv(t, Config{MaxConcurrent: 1, Parallelism: 1})
	e.meth.block = make(chan struct{})
	e.meth.started = make(chan string, 16)
	m := &service.CloudToDeviceMethod{MethodName: "slow"}
	if _, err := e.r.Schedule(service.JobRequest{JobID: "first", Type: service.JobTypeDeviceMethod, QueryCondition: "*", CloudToDeviceMethod: m}); err != nil {
		t.Fatal(err)
	}
	<-e.meth.started // first is running, blocked on its first device
	if _, err := e.r.Schedule(twinJob("second", "*")); err != nil {
		t.Fatal(err)
	}
	e.r.kick()
	if j, _ := e.r.Get("second"); j.Status != service.JobQueued {
		t.Fatalf("second job should wait for the slot: %+v", j)
	}
	if jobs := e.r.List("", service.JobRunning); len(jobs) != 1 || jobs[0].JobID != "first" {
		t.Fatalf("running %+v", jobs)
	}
	c, err := e.r.Cancel("first")
	if err != nil || c.Status != service.JobCancelled {
		t.Fatalf("cancel %+v %v", c, err)
	}
	j := e.wait("first", "finished", func(j service.Job) bool { return j.EndTime != nil })
	if j.Status != service.JobCancelled || j.DeviceJobStatistics.SucceededCount != 0 || j.DeviceJobStatistics.PendingCount != 4 {
		t.Errorf("cancelled job %+v %+v", j, j.DeviceJobStatistics)
	}
	j = e.wait("second", "finished", finished)
	if j.Status != service.JobCompleted {
		t.Errorf("second %+v", j)
	}
	if got := e.r.List(service.JobTypeUpdateTwin, ""); len(got) != 1 || got[0].JobID != "second" {
		t.Errorf("list by type %+v", got)
	}
	if _, err := e.r.Cancel("nope"); !errors.Is(err, ErrJobNotFound) {
		t.Errorf("cancel unknown: %v", err)
	}
}

func TestMaxExecutionTimeFailsTheJob(t *testing.T) {
	e := newEnv(t, Config{Parallelism: 1})
	e.meth.block = make(chan struct{})
	e.meth.started = make(chan string, 16)
	if _, err := e.r.Schedule(service.JobRequest{JobID: "x", Type: service.JobTypeDeviceMethod, QueryCondition: "*",
		MaxExecutionTimeInSeconds: 60, CloudToDeviceMethod: &service.CloudToDeviceMethod{MethodName: "slow"}}); err != nil {
		t.Fatal(err)
	}
	<-e.meth.started
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.clk.WaitTimer(ctx, e.clk.Now().Add(60*time.Second)); err != nil {
		t.Fatal(err)
	}
	e.clk.Advance(61 * time.Second)
	j := e.wait("x", "failed", finished)
	if j.Status != service.JobFailed || !strings.Contains(j.FailureReason, "maxExecutionTimeInSeconds") {
		t.Errorf("job %+v", j)
	}
}

func TestJobResumesAfterRestart(t *testing.T) {
	e := newEnv(t, Config{Parallelism: 1})
	e.meth.block = make(chan struct{})
	e.meth.started = make(chan string, 16)
	if _, err := e.r.Schedule(service.JobRequest{JobID: "r", Type: service.JobTypeDeviceMethod, QueryCondition: "*",
		CloudToDeviceMethod: &service.CloudToDeviceMethod{MethodName: "m"}}); err != nil {
		t.Fatal(err)
	}
	<-e.meth.started
	e.meth.block <- struct{}{} // a1 answers
	<-e.meth.started           // a2 in flight
	e.r.Close()                // stopping: the job is not cancelled
	j, _ := e.r.Get("r")
	if j.Status != service.JobRunning || j.DeviceJobStatistics.SucceededCount != 1 || j.DeviceJobStatistics.PendingCount != 3 {
		t.Fatalf("after close %+v %+v", j, j.DeviceJobStatistics)
	}
	e.meth.block = nil
	e.open(Config{})
	j = e.wait("r", "finished", finished)
	if j.Status != service.JobCompleted || j.DeviceJobStatistics.SucceededCount != 4 || j.DeviceJobStatistics.DeviceCount != 4 {
		t.Fatalf("resumed %+v %+v", j, j.DeviceJobStatistics)
	}
	var a1 []string
	for len(e.meth.started) > 0 {
		if id := <-e.meth.started; id == "a1" {
			a1 = append(a1, id)
		}
	}
	if len(a1) != 0 {
		t.Errorf("a1 was called again after the restart")
	}
}

func TestScheduleRejectsBadRequests(t *testing.T) {
	e := newEnv(t, Config{})
	if _, err := e.r.Schedule(twinJob("dup", "*")); err != nil {
		t.Fatal(err)
	}
	noEtag := twinJob("e1", "*")
	noEtag.UpdateTwin = json.RawMessage(`{"tags":{"a":1}}`)
	reported := twinJob("e2", "*")
	reported.UpdateTwin = json.RawMessage(`{"etag":"*","properties":{"reported":{"a":1}}}`)
	for _, c := range []struct {
		req  service.JobRequest
		want string
	}{
		{twinJob("dup", "*"), "already exists"},
		{twinJob("bad", "tags.a = "), "queryCondition: query: at offset 9"},
		{twinJob("bad", ""), "queryCondition is required"},
		{twinJob("bad/id", "*"), "jobId"},
		{noEtag, `etag must be "*"`},
		{reported, "may only hold desired"},
		{service.JobRequest{JobID: "t", Type: "export", QueryCondition: "*"}, "not supported"},
		{service.JobRequest{JobID: "m", Type: service.JobTypeDeviceMethod, QueryCondition: "*"}, "needs cloudToDeviceMethod"},
		{service.JobRequest{JobID: "m", Type: service.JobTypeDeviceMethod, QueryCondition: "*",
			CloudToDeviceMethod: &service.CloudToDeviceMethod{MethodName: "x", ResponseTimeoutInSeconds: 1000}}, "responseTimeoutInSeconds"},
	} {
		_, err := e.r.Schedule(c.req)
		var se wire.ServiceError
		if !errors.As(err, &se) || !strings.Contains(se.Text, c.want) {
			t.Errorf("%s: got %v, want %q", c.req.JobID, err, c.want)
		}
	}
}
