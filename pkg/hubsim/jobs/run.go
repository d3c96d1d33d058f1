package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/methods"
	"github.com/iothubby/iothubby/pkg/hubsim/query"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// idle is how long the scheduler sleeps when nothing is due.
const idle = time.Hour

// scheduler starts due jobs when a slot is free and fails running jobs whose maximum execution
// time has passed.
func (r *Runner) scheduler() {
	defer r.wg.Done()
	t := r.cfg.Clock.NewTimer(idle)
	defer t.Stop()
	for {
		next := r.tick()
		t.Stop()
		t.Reset(next)
		select {
		case <-r.stop:
			return
		case <-r.wake:
		case <-t.C():
		}
	}
}

// tick does what is due and returns how long until something else may be.
func (r *Runner) tick() time.Duration {
	now := r.cfg.Clock.Now()
	next := idle
	due := func(at time.Time) {
		if d := at.Sub(now); d < next {
			next = max(d, time.Millisecond)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return next
	}
	var waiting []*job
	for _, j := range r.jobs {
		switch j.j.Status {
		case service.JobRunning:
			if j.cancel == nil {
				continue
			}
			if !now.Before(j.deadline) {
				j.cancel(errExpired)
			} else {
				due(j.deadline)
			}
		case service.JobScheduled, service.JobQueued:
			if now.Before(*j.j.StartTime) {
				due(*j.j.StartTime)
				continue
			}
			j.j.Status = service.JobQueued
			waiting = append(waiting, j)
		}
	}
	slices.SortFunc(waiting, func(a, b *job) int { return int(a.seq - b.seq) })
	for _, j := range waiting {
		if r.running >= r.cfg.MaxConcurrent {
			break
		}
		r.running++
		ctx, cancel := context.WithCancelCause(context.Background())
		j.cancel = cancel
		j.j.Status = service.JobRunning
		j.deadline = j.j.StartTime.Add(time.Duration(j.j.MaxExecutionTimeInSeconds) * time.Second)
		if j.deadline.Before(now) {
			// started late (after a restart, or behind other jobs): it still gets its run
			j.deadline = now.Add(time.Duration(j.j.MaxExecutionTimeInSeconds) * time.Second)
		}
		due(j.deadline)
		r.wg.Add(1)
		go r.run(ctx, j)
	}
	return next
}

// run executes one job: it selects the targets (once), works through the pending devices with
// bounded parallelism, and finishes the job.
func (r *Runner) run(ctx context.Context, j *job) {
	defer r.wg.Done()
	log := r.log.With(zap.String("job", j.j.JobID))
	r.mu.Lock()
	id, selected, cond := j.j.JobID, j.selected, j.cond
	rec := r.recordLocked(j)
	r.mu.Unlock()
	r.store(map[string][]byte{id: rec}, nil, log)
	if !selected {
		rows := r.select_(cond)
		r.mu.Lock()
		now := ptr(r.cfg.Clock.Now())
		put := map[string][]byte{}
		for _, dev := range rows {
			dj := &service.DeviceJob{DeviceID: dev, JobID: id, JobType: j.j.Type, Status: service.DeviceJobPending,
				CreatedDateTimeUTC: now, LastUpdatedDateTimeUTC: now}
			j.devices = append(j.devices, dj)
			j.byID[dev] = dj
			put[id+"\x00"+dev], _ = json.Marshal(dj)
		}
		j.selected = true
		j.recount()
		put2 := map[string][]byte{id: r.recordLocked(j)}
		r.mu.Unlock()
		r.store(put2, put, log)
		log.Info("job started", zap.Int("devices", len(rows)))
	}
	r.mu.Lock()
	var todo []*service.DeviceJob
	for _, d := range j.devices {
		if d.Status == service.DeviceJobPending || d.Status == service.DeviceJobRunning {
			todo = append(todo, d)
		}
	}
	r.mu.Unlock()

	work := make(chan *service.DeviceJob)
	finished := make(chan service.DeviceJob)
	var wg sync.WaitGroup
	for range min(r.cfg.Parallelism, max(len(todo), 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range work {
				if res, ok := r.device(ctx, j, d); ok {
					finished <- res
				}
			}
		}()
	}
	go func() {
		defer close(work)
		for _, d := range todo {
			select {
			case work <- d:
			case <-ctx.Done():
				return
			}
		}
	}()
	go func() { wg.Wait(); close(finished) }()
	batch := map[string][]byte{}
	lastFlush := r.cfg.Clock.Now()
	for res := range finished {
		r.mu.Lock()
		if d := j.byID[res.DeviceID]; d != nil {
			j.move(d, res.Status)
			*d = res
		}
		r.mu.Unlock()
		batch[id+"\x00"+res.DeviceID], _ = json.Marshal(res)
		if now := r.cfg.Clock.Now(); len(batch) >= flushBatch || now.Sub(lastFlush) >= flushEvery {
			lastFlush = now
			r.mu.Lock()
			rec := r.recordLocked(j)
			r.mu.Unlock()
			r.store(map[string][]byte{id: rec}, batch, log)
			batch = map[string][]byte{}
		}
	}
	cause := context.Cause(ctx)
	r.mu.Lock()
	j.cancel = nil
	r.running--
	now := r.cfg.Clock.Now()
	switch {
	case errors.Is(cause, errClosing):
		j.j.Status = service.JobRunning // resumes at the next start
		for _, d := range j.devices {
			if d.Status == service.DeviceJobRunning {
				d.Status = service.DeviceJobPending
			}
		}
	case errors.Is(cause, errCancelled):
		j.j.Status, j.j.EndTime = service.JobCancelled, ptr(now)
	case errors.Is(cause, errExpired):
		j.j.Status, j.j.EndTime = service.JobFailed, ptr(now)
		j.j.FailureReason = "The job did not finish within maxExecutionTimeInSeconds."
	default:
		j.j.Status, j.j.EndTime = service.JobCompleted, ptr(now)
	}
	j.recount()
	rec = r.recordLocked(j)
	st, stats := j.j.Status, *j.j.DeviceJobStatistics
	r.mu.Unlock()
	r.store(map[string][]byte{id: rec}, batch, log)
	log.Info("job stopped", zap.String("status", st), zap.Int("succeeded", stats.SucceededCount),
		zap.Int("failed", stats.FailedCount), zap.Int("pending", stats.PendingCount))
	r.kick()
}

// store writes job records and device rows; a failure is logged (the job goes on in memory).
func (r *Runner) store(jobs, rows map[string][]byte, log *zap.Logger) {
	if len(rows) > 0 {
		if err := r.cfg.Store.StoreBlobs(bucketDevJobs, rows, nil); err != nil {
			log.Error("storing device job rows", zap.Error(err))
		}
	}
	if len(jobs) > 0 {
		if err := r.cfg.Store.StoreBlobs(bucketJobs, jobs, nil); err != nil {
			log.Error("storing a job", zap.Error(err))
		}
	}
}

// select_ evaluates the condition over every device's twin.
func (r *Runner) select_(cond query.Expr) []string {
	var out []string
	for _, id := range r.cfg.Devices.IDs() {
		if cond == nil {
			out = append(out, id)
			continue
		}
		t, err := r.cfg.Devices.Get(id)
		if err != nil {
			continue // deleted meanwhile
		}
		row, err := query.Row(t)
		if err == nil && query.Match(cond, query.Devices, row) {
			out = append(out, id)
		}
	}
	return out
}

// device runs the job on one device and returns its finished row; ok is false when the job
// stopped before the device was done (the row stays pending).
func (r *Runner) device(ctx context.Context, j *job, d *service.DeviceJob) (service.DeviceJob, bool) {
	if ctx.Err() != nil {
		return service.DeviceJob{}, false
	}
	r.mu.Lock()
	res := *d
	res.Status = service.DeviceJobRunning
	res.StartTimeUTC = ptr(r.cfg.Clock.Now())
	j.move(d, res.Status)
	d.StartTimeUTC = res.StartTimeUTC
	jobType, patch, req := j.j.Type, j.j.UpdateTwin, j.req
	r.mu.Unlock()

	var err error
	switch jobType {
	case service.JobTypeUpdateTwin:
		_, err = r.cfg.Devices.Update(res.DeviceID, "*", patch)
	case service.JobTypeDeviceMethod:
		var mr methods.Result
		mr, err = r.cfg.Methods.Invoke(ctx, res.DeviceID, req)
		if err == nil {
			res.Outcome = &service.DeviceJobOutcome{DeviceMethodResponse: &service.MethodResult{Status: mr.Status, Payload: mr.Payload}}
		}
	}
	if err != nil && ctx.Err() != nil {
		r.mu.Lock()
		j.move(d, service.DeviceJobPending)
		d.StartTimeUTC = nil
		r.mu.Unlock()
		return service.DeviceJob{}, false
	}
	now := ptr(r.cfg.Clock.Now())
	res.EndTimeUTC, res.LastUpdatedDateTimeUTC = now, now
	if err != nil {
		res.Status = service.DeviceJobFailed
		res.Error = deviceError(err)
	} else {
		res.Status = service.DeviceJobCompleted
	}
	return res, true
}

func deviceError(err error) *service.DeviceJobError {
	var ce *methods.CallError
	if errors.As(err, &ce) {
		code := "DeviceNotOnline"
		if ce.Status == 504 {
			code = "GatewayTimeout"
		}
		return &service.DeviceJobError{Code: code, Description: ce.Message}
	}
	var se wire.ServiceError
	if errors.As(err, &se) {
		return &service.DeviceJobError{Code: se.Code, Description: se.Text}
	}
	return &service.DeviceJobError{Code: "ServerError", Description: err.Error()}
}
