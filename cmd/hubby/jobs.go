package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/service"
)

// jobCommand is `hubby jobs` (az iot hub job): scheduled twin updates and method calls that the
// hub runs over the devices a query selects.
func jobCommand(g *globals) *cobra.Command {
	j := &cobra.Command{Use: "jobs", Aliases: []string{"job"}, Short: "Jobs v2: twin updates and direct methods the hub runs over a query (az iot hub job)"}

	var typ, query, start, method string
	var ttl int64
	var wait bool
	var poll time.Duration
	var pf patchFlags
	var mf methodFlags
	create := &cobra.Command{
		Use:   "create JOB_ID",
		Short: "Schedule a twin-update or method job",
		Example: `  hubby jobs create fw-2 --type twin-update -q "tags.ring = 'canary'" --desired fw='"2.0"' --wait
  hubby jobs create reboot-lab --type method -q "tags.site = 'lab'" --method-name reboot --method-payload '{"delay":5}'`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := service.JobRequest{JobID: args[0], QueryCondition: query, MaxExecutionTimeInSeconds: ttl}
			if strings.TrimSpace(query) == "" {
				return usageError{errors.New(`--query is required: a WHERE condition, or "*" for every device`)}
			}
			switch typ {
			case "twin-update", service.JobTypeUpdateTwin:
				req.Type = service.JobTypeUpdateTwin
				doc, err := pf.doc()
				if err != nil {
					return usageError{err}
				}
				b, _ := json.Marshal(doc)
				req.UpdateTwin = b
			case "method", service.JobTypeDeviceMethod:
				req.Type = service.JobTypeDeviceMethod
				if method == "" {
					return usageError{errors.New("a method job needs --method-name")}
				}
				call, err := mf.call(method)
				if err != nil {
					return usageError{err}
				}
				req.CloudToDeviceMethod = &service.CloudToDeviceMethod{MethodName: method, Payload: call.Payload,
					ResponseTimeoutInSeconds: mf.timeout, ConnectTimeoutInSeconds: mf.connectTimeout}
			default:
				return usageError{fmt.Errorf("--type must be twin-update (scheduleUpdateTwin) or method (scheduleDeviceMethod), not %q", typ)}
			}
			if start != "" {
				t, err := time.Parse(time.RFC3339, start)
				if err != nil {
					return usageError{fmt.Errorf("--start %q is not an RFC 3339 time (2026-12-02T03:00:00Z)", start)}
				}
				req.StartTime = &t
			}
			if ttl < 0 {
				return usageError{errors.New("--ttl must not be negative")}
			}
			return g.withLong(cmd, func(ctx context.Context, c *service.Client) error {
				rctx, cancel := g.reqCtx(ctx)
				job, err := c.ScheduleJob(rctx, req)
				cancel()
				if err != nil {
					return err
				}
				if !wait {
					return g.printJobs([]service.Job{*job}, true)
				}
				return g.watchJob(ctx, c, job.JobID, poll)
			})
		},
	}
	f := create.Flags()
	f.StringVar(&typ, "type", "", "twin-update (scheduleUpdateTwin) or method (scheduleDeviceMethod)")
	f.StringVarP(&query, "query", "q", "", `WHERE condition selecting the devices ("*" for all)`)
	f.StringVar(&start, "start", "", "when to start (RFC 3339; default now)")
	f.Int64Var(&ttl, "ttl", 0, "maximum execution time in seconds (default 3600)")
	f.BoolVarP(&wait, "wait", "w", false, "watch the job until it finishes (as hubby jobs watch)")
	f.DurationVar(&poll, "poll", 2*time.Second, "with --wait: how often to read the job")
	f.StringVar(&method, "method-name", "", "method jobs: the method to call")
	pf.register(create)
	mf.register(create, "method-")

	show := &cobra.Command{
		Use:     "show JOB_ID",
		Aliases: []string{"get"},
		Short:   "Show a job and its device statistics",
		Args:    exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				job, err := c.GetJob(ctx, args[0])
				if err != nil {
					return err
				}
				return g.printJobs([]service.Job{*job}, true)
			})
		},
	}
	var ltype, lstatus string
	list := &cobra.Command{
		Use:   "list",
		Short: "List jobs",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			switch ltype {
			case "twin-update":
				ltype = service.JobTypeUpdateTwin
			case "method":
				ltype = service.JobTypeDeviceMethod
			}
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				jobs, err := c.QueryJobs(ctx, ltype, lstatus)
				if err != nil {
					return err
				}
				return g.printJobs(jobs, false)
			})
		},
	}
	list.Flags().StringVar(&ltype, "type", "", "only jobs of this type (twin-update, method)")
	list.Flags().StringVar(&lstatus, "status", "", "only jobs in this status (queued, scheduled, running, completed, failed, cancelled)")
	cancelCmd := &cobra.Command{
		Use:   "cancel JOB_ID",
		Short: "Cancel a job that has not finished",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				job, err := c.CancelJob(ctx, args[0])
				if err != nil {
					return err
				}
				return g.printJobs([]service.Job{*job}, true)
			})
		},
	}
	var wpoll time.Duration
	watch := &cobra.Command{
		Use:   "watch JOB_ID",
		Short: "Follow a job with a progress bar until it finishes, then list the devices that failed",
		Long: `Follow a job until it finishes (progress on stderr), then print the job and every device
that failed with why. Exit status 3 when the job failed or was cancelled or any device failed.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.withLong(cmd, func(ctx context.Context, c *service.Client) error {
				return g.watchJob(ctx, c, args[0], wpoll)
			})
		},
	}
	watch.Flags().DurationVar(&wpoll, "poll", 2*time.Second, "how often to read the job")
	j.AddCommand(create, show, list, cancelCmd, watch)
	return j
}

// watchJob polls a job until it finishes, with progress, then reports its devices.
func (g *globals) watchJob(ctx context.Context, c *service.Client, id string, poll time.Duration) error {
	if poll <= 0 {
		poll = 2 * time.Second
	}
	var prog *progress
	for {
		rctx, cancel := g.reqCtx(ctx)
		job, err := c.GetJob(rctx, id)
		cancel()
		if err != nil {
			return err
		}
		if st := job.DeviceJobStatistics; st != nil && st.DeviceCount > 0 {
			if prog == nil {
				prog = g.newProgress("job "+id, st.DeviceCount)
			}
			prog.set(st.SucceededCount+st.FailedCount, st.FailedCount)
		}
		if service.JobFinished(job.Status) {
			if prog != nil {
				prog.finish()
			}
			return g.jobOutcome(ctx, c, job)
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// jobOutcome prints a finished job and its failed devices; a partialError when not everything
// succeeded.
func (g *globals) jobOutcome(ctx context.Context, c *service.Client, job *service.Job) error {
	rctx, cancel := g.reqCtx(ctx)
	devs, err := c.DeviceJobs(rctx, job.JobID)
	cancel()
	if err != nil {
		return err
	}
	var bad []service.DeviceJob
	for _, d := range devs {
		if d.Status != service.DeviceJobCompleted {
			bad = append(bad, d)
			continue
		}
		if o := d.Outcome; o != nil && o.DeviceMethodResponse != nil && o.DeviceMethodResponse.Status >= 400 {
			bad = append(bad, d)
		}
	}
	if g.output == "json" {
		if devs == nil {
			devs = []service.DeviceJob{}
		}
		if err := g.printJSON(struct {
			Job     *service.Job        `json:"job"`
			Devices []service.DeviceJob `json:"devices"`
		}{job, devs}); err != nil {
			return err
		}
	} else {
		if err := g.printJobs([]service.Job{*job}, true); err != nil {
			return err
		}
		if len(bad) > 0 {
			fmt.Fprintln(g.stdout)
			rows := make([][]string, 0, len(bad))
			for _, d := range bad {
				why := ""
				switch {
				case d.Error != nil:
					why = strings.TrimSpace(d.Error.Code + " " + d.Error.Description)
				case d.Outcome != nil && d.Outcome.DeviceMethodResponse != nil:
					why = strconv.Itoa(d.Outcome.DeviceMethodResponse.Status) + " " + compact(d.Outcome.DeviceMethodResponse.Payload)
				}
				rows = append(rows, []string{d.DeviceID, d.Status, why})
			}
			if err := g.table([]string{"DEVICE", "STATUS", "WHY"}, rows); err != nil {
				return err
			}
		}
	}
	if job.Status != service.JobCompleted {
		return partialError{what: fmt.Sprintf("job %s %s%s", job.JobID, job.Status, suffix(job.FailureReason))}
	}
	if len(bad) > 0 {
		return partialError{failed: len(bad), total: len(devs)}
	}
	return nil
}

func suffix(s string) string {
	if s == "" {
		return ""
	}
	return ": " + s
}

func (g *globals) printJobs(jobs []service.Job, single bool) error {
	if g.output == "json" {
		if single && len(jobs) == 1 {
			return g.printJSON(jobs[0])
		}
		if jobs == nil {
			jobs = []service.Job{}
		}
		return g.printJSON(jobs)
	}
	rows := make([][]string, 0, len(jobs))
	for _, j := range jobs {
		stats := "-"
		if s := j.DeviceJobStatistics; s != nil {
			stats = fmt.Sprintf("%d devices: %d succeeded, %d failed, %d running, %d pending", s.DeviceCount, s.SucceededCount, s.FailedCount, s.RunningCount, s.PendingCount)
		}
		rows = append(rows, []string{j.JobID, j.Type, j.Status, j.QueryCondition, stats})
	}
	return g.table([]string{"JOB", "TYPE", "STATUS", "QUERY", "DEVICES"}, rows)
}
