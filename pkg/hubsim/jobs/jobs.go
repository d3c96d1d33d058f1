// Package jobs is hubsim's jobs v2 runner: scheduled twin updates and direct-method calls over
// the devices a query condition selects, with IoT Hub's lifecycle (queued, scheduled, running,
// completed, failed, cancelled), per-device outcomes (the rows of devices.jobs), device job
// statistics, a limit on concurrently running jobs (S1: one; more jobs wait, queued), and
// persistence: jobs and their per-device rows are kept in the registry's database and a job
// that was running when hubsim stopped resumes where it stopped when hubsim starts again
// (devices whose outcome was not yet written, at most a second's worth after a crash, run
// again).
//
// A Runner owns one scheduler goroutine and one goroutine per running job (each with a bounded
// pool of device workers); Close stops them all. Scheduling (start times, the maximum execution
// time) runs on an injected clock. No lock is held while a device is called or the store is
// written.
package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hubsim/methods"
	"github.com/iothubby/iothubby/pkg/hubsim/query"
	"github.com/iothubby/iothubby/pkg/hubsim/twins"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Defaults.
const (
	// DefaultMaxConcurrent is IoT Hub S1's (and Free's) limit on concurrently running jobs.
	DefaultMaxConcurrent = 1
	// DefaultParallelism is how many devices a running job works on at once.
	DefaultParallelism = 16
	// Finished device rows are written in one transaction once flushBatch of them wait or
	// flushEvery has passed since the last write (and when the job stops): a hubsim killed
	// without Close redoes at most that much of a job.
	flushBatch = 512
	flushEvery = time.Second
)

// Storage buckets in the registry's database.
const (
	bucketJobs    = "jobs"
	bucketDevJobs = "jobdevices"
)

// Errors.
var (
	ErrJobNotFound      = service.ErrJobNotFound
	ErrJobAlreadyExists = service.ErrJobAlreadyExists
)

// Store keeps opaque records (the registry's blob buckets).
type Store interface {
	LoadBlobs(bucket string) (map[string][]byte, error)
	StoreBlobs(bucket string, put map[string][]byte, del []string) error
}

// Devices lists the device twins a query condition is evaluated over and changes them.
type Devices interface {
	// IDs lists every device ID, sorted.
	IDs() []string
	Get(id string) (twins.Twin, error)
	Update(id, ifMatch string, body []byte) (twins.Twin, error)
}

// Methods calls direct methods.
type Methods interface {
	Invoke(ctx context.Context, deviceID string, req methods.Request) (methods.Result, error)
}

// Config configures a Runner.
type Config struct {
	Store   Store
	Devices Devices
	Methods Methods
	// Clock schedules start times and the maximum execution time; nil: the real clock.
	Clock clock.Clock
	// MaxConcurrent is how many jobs may run at once (0: DefaultMaxConcurrent); the others
	// wait in status queued.
	MaxConcurrent int
	// Parallelism is how many devices one job works on at once (0: DefaultParallelism).
	Parallelism int
}

type job struct {
	j       service.Job
	seq     int64 // creation order
	cond    query.Expr
	req     methods.Request // method jobs
	devices []*service.DeviceJob
	byID    map[string]*service.DeviceJob
	// selected: the targets have been chosen (and persisted).
	selected bool
	cancel   context.CancelCauseFunc // while running
	deadline time.Time
}

// record is a job as persisted.
type record struct {
	Job      service.Job `json:"job"`
	Seq      int64       `json:"seq"`
	Selected bool        `json:"selected"`
}

var (
	errCancelled = errors.New("job cancelled")
	errExpired   = errors.New("job exceeded its maximum execution time")
	errClosing   = errors.New("hubsim is stopping")
)

// Runner runs jobs.
type Runner struct {
	cfg Config
	log *zap.Logger

	mu      sync.Mutex
	jobs    map[string]*job
	seq     int64
	running int
	closed  bool

	wake chan struct{}
	stop chan struct{}
	wg   sync.WaitGroup
}

// Open loads the persisted jobs and starts the scheduler; jobs that were queued, scheduled or
// running continue.
func Open(cfg Config, log *zap.Logger) (*Runner, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.Real()
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = DefaultMaxConcurrent
	}
	if cfg.Parallelism <= 0 {
		cfg.Parallelism = DefaultParallelism
	}
	r := &Runner{cfg: cfg, log: log, jobs: map[string]*job{}, wake: make(chan struct{}, 1), stop: make(chan struct{})}
	if err := r.load(); err != nil {
		return nil, err
	}
	r.wg.Add(1)
	go r.scheduler()
	return r, nil
}

func (r *Runner) load() error {
	recs, err := r.cfg.Store.LoadBlobs(bucketJobs)
	if err != nil {
		return fmt.Errorf("jobs: %w", err)
	}
	rows, err := r.cfg.Store.LoadBlobs(bucketDevJobs)
	if err != nil {
		return fmt.Errorf("jobs: %w", err)
	}
	for k, v := range recs {
		var rec record
		if err := json.Unmarshal(v, &rec); err != nil {
			return fmt.Errorf("jobs: job %q: %w", k, err)
		}
		j, err := newJob(rec.Job)
		if err != nil {
			return fmt.Errorf("jobs: job %q: %w", k, err)
		}
		j.seq, j.selected = rec.Seq, rec.Selected
		if j.seq > r.seq {
			r.seq = j.seq
		}
		if j.j.Status == service.JobRunning {
			j.j.Status = service.JobQueued // it runs again when a slot is free
		}
		r.jobs[k] = j
	}
	for k, v := range rows {
		jobID, _, ok := strings.Cut(k, "\x00")
		j := r.jobs[jobID]
		if !ok || j == nil {
			continue
		}
		var dj service.DeviceJob
		if err := json.Unmarshal(v, &dj); err != nil {
			return fmt.Errorf("jobs: device row %q: %w", k, err)
		}
		if dj.Status == service.DeviceJobRunning {
			dj.Status = service.DeviceJobPending
		}
		j.devices = append(j.devices, &dj)
		j.byID[dj.DeviceID] = &dj
	}
	for _, j := range r.jobs {
		sort.Slice(j.devices, func(a, b int) bool { return j.devices[a].DeviceID < j.devices[b].DeviceID })
		j.recount()
	}
	if len(r.jobs) > 0 {
		r.log.Info("jobs loaded", zap.Int("jobs", len(r.jobs)))
	}
	return nil
}

// newJob validates a request and makes the job (status queued).
func newJob(req service.Job) (*job, error) {
	j := &job{j: req, byID: map[string]*service.DeviceJob{}}
	cond, err := query.ParseCondition(req.QueryCondition)
	if err != nil {
		return nil, wire.ErrArgumentInvalid.WithText("queryCondition: %v", err)
	}
	j.cond = cond
	switch req.Type {
	case service.JobTypeUpdateTwin:
		if err := checkTwinPatch(req.UpdateTwin); err != nil {
			return nil, err
		}
	case service.JobTypeDeviceMethod:
		m := req.CloudToDeviceMethod
		if m == nil {
			return nil, wire.ErrArgumentInvalid.WithText("a scheduleDeviceMethod job needs cloudToDeviceMethod")
		}
		j.req = methods.Request{MethodName: m.MethodName, Payload: m.Payload}
		if m.ResponseTimeoutInSeconds != 0 {
			v := m.ResponseTimeoutInSeconds
			j.req.ResponseTimeoutInSeconds = &v
		}
		v := m.ConnectTimeoutInSeconds
		j.req.ConnectTimeoutInSeconds = &v
		if err := j.req.Validate(); err != nil {
			return nil, err
		}
	case "":
		return nil, wire.ErrArgumentInvalid.WithText("the job has no type")
	default:
		return nil, wire.ErrArgumentInvalid.WithText("job type %q is not supported (%s or %s)", req.Type, service.JobTypeUpdateTwin, service.JobTypeDeviceMethod)
	}
	return j, nil
}

// checkTwinPatch applies IoT Hub's rules for updateTwin: an object whose etag is "*", with tags
// and properties.desired objects and nothing else to change.
func checkTwinPatch(raw json.RawMessage) error {
	var p map[string]json.RawMessage
	if len(raw) == 0 || json.Unmarshal(raw, &p) != nil || p == nil {
		return wire.ErrArgumentInvalid.WithText("a scheduleUpdateTwin job needs updateTwin as a JSON object")
	}
	var etag string
	if e, ok := p["etag"]; !ok || json.Unmarshal(e, &etag) != nil || etag != "*" {
		return wire.ErrArgumentInvalid.WithText(`updateTwin.etag must be "*"`)
	}
	for k, v := range p {
		switch k {
		case "etag", "deviceId":
		case "tags":
			var m map[string]any
			if json.Unmarshal(v, &m) != nil {
				return wire.ErrArgumentInvalid.WithText("updateTwin.tags must be an object")
			}
		case "properties":
			var props map[string]json.RawMessage
			if json.Unmarshal(v, &props) != nil {
				return wire.ErrArgumentInvalid.WithText("updateTwin.properties must be an object")
			}
			for pk, pv := range props {
				var m map[string]any
				if pk != "desired" || json.Unmarshal(pv, &m) != nil {
					return wire.ErrArgumentInvalid.WithText("updateTwin.properties may only hold desired, an object")
				}
			}
		default:
			return wire.ErrArgumentInvalid.WithText("updateTwin.%s cannot be changed by a job", k)
		}
	}
	return nil
}

// recount recomputes the statistics from the device rows.
func (j *job) recount() {
	s := service.DeviceJobStatistics{DeviceCount: len(j.devices)}
	for _, d := range j.devices {
		switch d.Status {
		case service.DeviceJobCompleted:
			s.SucceededCount++
		case service.DeviceJobFailed:
			s.FailedCount++
		case service.DeviceJobRunning:
			s.RunningCount++
		default:
			s.PendingCount++
		}
	}
	j.j.DeviceJobStatistics = &s
}

// move changes a device row's status and the statistics with it.
func (j *job) move(d *service.DeviceJob, to string) {
	s := j.j.DeviceJobStatistics
	for i, st := range []string{d.Status, to} {
		delta := 1 - 2*(1-i) // -1 for the old status, +1 for the new
		switch st {
		case service.DeviceJobCompleted:
			s.SucceededCount += delta
		case service.DeviceJobFailed:
			s.FailedCount += delta
		case service.DeviceJobRunning:
			s.RunningCount += delta
		default:
			s.PendingCount += delta
		}
	}
	d.Status = to
}

func (j *job) view() service.Job {
	v := j.j
	if j.j.DeviceJobStatistics != nil {
		s := *j.j.DeviceJobStatistics
		v.DeviceJobStatistics = &s
	}
	return v
}

func ptr(t time.Time) *time.Time { t = t.UTC(); return &t }

// Schedule creates a job from a request. startTime nil means now; maxExecutionTimeInSeconds 0
// means 3600.
func (r *Runner) Schedule(req service.JobRequest) (service.Job, error) {
	if err := wire.ValidateDeviceID(req.JobID); err != nil {
		return service.Job{}, wire.ErrArgumentInvalid.WithText("jobId: %v", err)
	}
	if strings.TrimSpace(req.QueryCondition) == "" {
		return service.Job{}, wire.ErrArgumentInvalid.WithText(`queryCondition is required ("*" selects every device)`)
	}
	if req.MaxExecutionTimeInSeconds < 0 {
		return service.Job{}, wire.ErrArgumentInvalid.WithText("maxExecutionTimeInSeconds must be positive")
	}
	now := r.cfg.Clock.Now()
	start := now
	if req.StartTime != nil && !req.StartTime.IsZero() {
		start = *req.StartTime
	}
	maxExec := req.MaxExecutionTimeInSeconds
	if maxExec == 0 {
		maxExec = service.DefaultMaxExecutionTime
	}
	jv := service.Job{
		JobID: req.JobID, QueryCondition: req.QueryCondition, CreatedTime: ptr(now), StartTime: ptr(start),
		MaxExecutionTimeInSeconds: maxExec, Type: req.Type, Status: service.JobQueued,
		DeviceJobStatistics: &service.DeviceJobStatistics{},
	}
	switch req.Type {
	case service.JobTypeUpdateTwin:
		jv.UpdateTwin = req.UpdateTwin
	case service.JobTypeDeviceMethod:
		jv.CloudToDeviceMethod = req.CloudToDeviceMethod
	}
	if start.After(now) {
		jv.Status = service.JobScheduled
	}
	j, err := newJob(jv)
	if err != nil {
		return service.Job{}, err
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return service.Job{}, wire.ErrServerError.WithText("hubsim is stopping")
	}
	if _, ok := r.jobs[req.JobID]; ok {
		r.mu.Unlock()
		return service.Job{}, ErrJobAlreadyExists.WithText("a job with ID %q already exists", req.JobID)
	}
	r.seq++
	j.seq = r.seq
	r.jobs[req.JobID] = j
	rec := r.recordLocked(j)
	v := j.view()
	r.mu.Unlock()
	if err := r.cfg.Store.StoreBlobs(bucketJobs, map[string][]byte{req.JobID: rec}, nil); err != nil {
		r.mu.Lock()
		delete(r.jobs, req.JobID)
		r.mu.Unlock()
		return service.Job{}, err
	}
	r.log.Info("job scheduled", zap.String("job", req.JobID), zap.String("type", req.Type), zap.String("condition", req.QueryCondition))
	r.kick()
	return v, nil
}

func (r *Runner) recordLocked(j *job) []byte {
	b, _ := json.Marshal(record{Job: j.view(), Seq: j.seq, Selected: j.selected})
	return b
}

func (r *Runner) kick() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Get returns a job.
func (r *Runner) Get(id string) (service.Job, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	j, ok := r.jobs[id]
	if !ok {
		return service.Job{}, ErrJobNotFound.WithText("job %q not found", id)
	}
	return j.view(), nil
}

// Cancel cancels a job that has not finished; cancelling a finished job returns it unchanged.
func (r *Runner) Cancel(id string) (service.Job, error) {
	r.mu.Lock()
	j, ok := r.jobs[id]
	if !ok {
		r.mu.Unlock()
		return service.Job{}, ErrJobNotFound.WithText("job %q not found", id)
	}
	if service.JobFinished(j.j.Status) {
		v := j.view()
		r.mu.Unlock()
		return v, nil
	}
	if j.cancel != nil {
		// running: the job's goroutine finishes it
		j.cancel(errCancelled)
		j.j.Status = service.JobCancelled
		v := j.view()
		r.mu.Unlock()
		return v, nil
	}
	j.j.Status = service.JobCancelled
	j.j.EndTime = ptr(r.cfg.Clock.Now())
	rec := r.recordLocked(j)
	v := j.view()
	r.mu.Unlock()
	if err := r.cfg.Store.StoreBlobs(bucketJobs, map[string][]byte{id: rec}, nil); err != nil {
		r.log.Error("storing a cancelled job", zap.String("job", id), zap.Error(err))
	}
	r.log.Info("job cancelled", zap.String("job", id))
	return v, nil
}

// List returns the jobs of a type and status ("" for any), oldest first.
func (r *Runner) List(jobType, status string) []service.Job {
	r.mu.Lock()
	js := make([]*job, 0, len(r.jobs))
	for _, j := range r.jobs {
		if (jobType == "" || j.j.Type == jobType) && (status == "" || j.j.Status == status) {
			js = append(js, j)
		}
	}
	slices.SortFunc(js, func(a, b *job) int { return int(a.seq - b.seq) })
	out := make([]service.Job, len(js))
	for i, j := range js {
		out[i] = j.view()
	}
	r.mu.Unlock()
	return out
}

// DeviceJobs returns every job's per-device rows (devices.jobs), by job then device.
func (r *Runner) DeviceJobs() []service.DeviceJob {
	r.mu.Lock()
	js := make([]*job, 0, len(r.jobs))
	for _, j := range r.jobs {
		js = append(js, j)
	}
	slices.SortFunc(js, func(a, b *job) int { return int(a.seq - b.seq) })
	var out []service.DeviceJob
	for _, j := range js {
		for _, d := range j.devices {
			out = append(out, *d)
		}
	}
	r.mu.Unlock()
	return out
}

// Close stops the scheduler and every running job (they resume at the next Open) and waits for
// their goroutines.
func (r *Runner) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	for _, j := range r.jobs {
		if j.cancel != nil {
			j.cancel(errClosing)
		}
	}
	r.mu.Unlock()
	close(r.stop)
	r.wg.Wait()
	return nil
}
