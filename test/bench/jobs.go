package main

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/service"
)

// benchJobs compares a twin-update job over n devices with the same update sent to each device
// one by one through the REST API (PATCH /twins/{id}), on one in-process hubsim, alternating
// rounds; devices per second, medians compared. The job's time runs from PUT /jobs/v2/{id} to
// the first GET that reads it completed (polled every 5 ms, as a client would poll). Devices are
// not connected: both paths change the same twins and would notify the same sessions.
func benchJobs(ctx context.Context, n, rounds, parallelism int, report func(string, float64, bool, string)) error {
	srv, stop, err := startHub(ctx, func(c *hubsim.Config) { c.JobParallelism = parallelism })
	if err != nil {
		return err
	}
	defer stop()
	if _, err := createHubDevices(srv, n); err != nil {
		return err
	}
	ep := srv.Endpoints()
	svc, err := service.New(service.Config{ConnectionString: ep.ServiceConnectionString, Address: ep.HTTPSAddress, CAFile: ep.CAFile})
	if err != nil {
		return err
	}
	defer svc.Close()

	var restRates, jobRates []float64
	for r := range rounds {
		patch := json.RawMessage(fmt.Sprintf(`{"properties":{"desired":{"benchRound":%d,"via":"rest"}}}`, r))
		start := time.Now()
		for i := range n {
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			_, err := svc.UpdateTwin(cctx, devID(i), patch, "*")
			cancel()
			if err != nil {
				return fmt.Errorf("REST update %s: %w", devID(i), err)
			}
		}
		restRates = append(restRates, float64(n)/time.Since(start).Seconds())

		id := fmt.Sprintf("bench-%d", r)
		jpatch := json.RawMessage(fmt.Sprintf(`{"etag":"*","properties":{"desired":{"benchRound":%d,"via":"job"}}}`, r))
		start = time.Now()
		jctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		j, err := svc.ScheduleJob(jctx, service.JobRequest{JobID: id, Type: service.JobTypeUpdateTwin, QueryCondition: "*", UpdateTwin: jpatch})
		for err == nil && !service.JobFinished(j.Status) {
			select {
			case <-time.After(5 * time.Millisecond):
			case <-jctx.Done():
				err = jctx.Err()
				continue
			}
			j, err = svc.GetJob(jctx, id)
		}
		cancel()
		if err != nil {
			return fmt.Errorf("job %s: %w", id, err)
		}
		elapsed := time.Since(start)
		if j.Status != service.JobCompleted || j.DeviceJobStatistics == nil || j.DeviceJobStatistics.SucceededCount != n {
			return fmt.Errorf("job %s ended %s with %+v", id, j.Status, j.DeviceJobStatistics)
		}
		jobRates = append(jobRates, float64(n)/elapsed.Seconds())
		fmt.Printf("jobs round %d: REST one by one %.0f devices/s, twin-update job %.0f devices/s\n", r+1, restRates[r], jobRates[r])
	}
	ratio := median(jobRates) / median(restRates)
	fmt.Printf("jobs: %d devices, job parallelism %d: job %.0f devices/s, REST one by one %.0f devices/s (medians of %d)\n",
		n, parallelism, median(jobRates), median(restRates), rounds)
	report("jobs twin update/REST", ratio, ratio >= 1, ">= 1")
	return nil
}
