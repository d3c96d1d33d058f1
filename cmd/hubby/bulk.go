package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/backoff"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// targetFlags choose the devices a bulk command runs over: a query condition, a file of IDs,
// or IDs as arguments.
type targetFlags struct {
	query    string
	idsFile  string
	parallel int
	rate     float64
	dryRun   bool
	retries  int
}

func (t *targetFlags) register(c *cobra.Command) {
	f := c.Flags()
	f.StringVarP(&t.query, "query", "q", "", `devices whose twins match this WHERE condition (e.g. "tags.site = 'lab'"; * for all) or a whole SELECT ... FROM devices query`)
	f.StringVar(&t.idsFile, "ids-file", "", "file of device IDs, one a line (# comments), or JSON lines with deviceId (- for stdin)")
	f.IntVar(&t.parallel, "parallel", 8, "requests in flight at once")
	f.Float64Var(&t.rate, "rate", 0, "at most this many requests per second (0: no limit; an S1 hub allows about 10 twin updates/s per unit)")
	f.BoolVar(&t.dryRun, "dry-run", false, "list the devices that would be changed, change nothing")
	f.IntVar(&t.retries, "retries", 3, "retries of a request throttled (429) or refused as unavailable (503)")
}

func (t *targetFlags) check() error {
	if t.parallel < 1 || t.parallel > 256 {
		return usageError{fmt.Errorf("--parallel must be 1 to 256, not %d", t.parallel)}
	}
	if t.rate < 0 {
		return usageError{errors.New("--rate must not be negative")}
	}
	return nil
}

// targets resolves the device IDs, in a stable order (the file's or the query's), without
// duplicates.
func (g *globals) targets(ctx context.Context, c *service.Client, t *targetFlags, args []string) ([]string, error) {
	n := 0
	for _, given := range []bool{t.query != "", t.idsFile != "", len(args) > 0} {
		if given {
			n++
		}
	}
	if n != 1 {
		return nil, usageError{errors.New("choose the devices with exactly one of --query, --ids-file or device IDs as arguments")}
	}
	var ids []string
	switch {
	case len(args) > 0:
		ids = args
	case t.idsFile != "":
		var r io.Reader
		if t.idsFile == "-" {
			r = os.Stdin
		} else {
			f, err := os.Open(t.idsFile)
			if err != nil {
				return nil, err
			}
			defer f.Close()
			r = f
		}
		var err error
		if ids, err = readIDs(r); err != nil {
			return nil, fmt.Errorf("%s: %w", t.idsFile, err)
		}
	default:
		var err error
		if ids, err = g.queryIDs(ctx, c, t.query); err != nil {
			return nil, err
		}
	}
	seen := make(map[string]bool, len(ids))
	out := ids[:0:0]
	for _, id := range ids {
		if !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	return out, nil
}

// readIDs reads device IDs: one a line, or JSON objects with deviceId (or id) a line.
func readIDs(r io.Reader) ([]string, error) {
	var ids []string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		if strings.HasPrefix(s, "{") {
			var d struct {
				DeviceID string `json:"deviceId"`
				ID       string `json:"id"`
			}
			if err := json.Unmarshal([]byte(s), &d); err != nil {
				return nil, fmt.Errorf("line %d: %v", line, err)
			}
			if d.DeviceID == "" {
				d.DeviceID = d.ID
			}
			if d.DeviceID == "" {
				return nil, fmt.Errorf("line %d: no deviceId", line)
			}
			s = d.DeviceID
		}
		if strings.ContainsAny(s, " \t") || len(s) > 128 {
			return nil, fmt.Errorf("line %d: %q is not a device ID", line, s)
		}
		ids = append(ids, s)
	}
	return ids, sc.Err()
}

// outcome is one device's result in a bulk command.
type outcome struct {
	DeviceID string          `json:"deviceId"`
	OK       bool            `json:"ok"`
	Status   int             `json:"status,omitempty"`
	Payload  json.RawMessage `json:"payload,omitempty"`
	Error    string          `json:"error,omitempty"`

	retry bool // throttled (429) or unavailable (503): worth another try
}

// forEach runs op over ids with t.parallel workers and t.rate, retrying throttling, with
// progress on stderr; outcomes are in the order of ids. Devices not reached because ctx ended
// are reported as not attempted.
func (g *globals) forEach(ctx context.Context, t *targetFlags, label string, ids []string, op func(ctx context.Context, id string) outcome) []outcome {
	out := make([]outcome, len(ids))
	prog := g.newProgress(label, len(ids))
	lim := newLimiter(clock.Real(), t.rate)
	work := make(chan int)
	var wg sync.WaitGroup
	workers := min(t.parallel, len(ids))
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				out[i] = g.attempt(ctx, t, lim, ids[i], op)
				prog.add(out[i].OK)
			}
		}()
	}
	sent := 0
feed:
	for ; sent < len(ids); sent++ {
		select {
		case work <- sent:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	prog.finish()
	for i := sent; i < len(ids); i++ {
		out[i] = outcome{DeviceID: ids[i], Error: "not attempted: interrupted"}
	}
	return out
}

// attempt runs op once, and again after throttling (429) or unavailability (503).
func (g *globals) attempt(ctx context.Context, t *targetFlags, lim *limiter, id string, op func(ctx context.Context, id string) outcome) outcome {
	pol := backoff.Policy{Min: time.Second, Max: 30 * time.Second}
	for a := 0; ; a++ {
		if err := lim.wait(ctx); err != nil {
			return outcome{DeviceID: id, Error: "not attempted: interrupted"}
		}
		o := op(ctx, id)
		o.DeviceID = id
		if o.OK || a >= t.retries || !o.retry || ctx.Err() != nil {
			return o
		}
		tm := time.NewTimer(pol.Delay(a, rand.Float64()))
		select {
		case <-tm.C:
		case <-ctx.Done():
			tm.Stop()
			return o
		}
	}
}

// failure is the outcome of a failed request.
func failure(err error) outcome {
	var se wire.ServiceError
	retry := errors.As(err, &se) && (se.Status == 429 || se.Status == 503)
	return outcome{Error: strings.Join(strings.Fields(explain(err).Error()), " "), retry: retry}
}

// report prints bulk outcomes and returns a partialError when some device failed.
func (g *globals) report(outs []outcome, what string) error {
	failed := 0
	for _, o := range outs {
		if !o.OK {
			failed++
		}
	}
	if g.output == "json" {
		if outs == nil {
			outs = []outcome{}
		}
		if err := g.printJSON(struct {
			Succeeded int       `json:"succeeded"`
			Failed    int       `json:"failed"`
			Results   []outcome `json:"results"`
		}{len(outs) - failed, failed, outs}); err != nil {
			return err
		}
	} else {
		rows := make([][]string, 0, len(outs))
		for _, o := range outs {
			res, detail := "ok", ""
			if !o.OK {
				res, detail = "failed", o.Error
			}
			if o.Status != 0 || len(o.Payload) > 0 {
				detail = strings.TrimSpace(strconv.Itoa(o.Status) + " " + compact(o.Payload) + " " + detail)
			}
			rows = append(rows, []string{o.DeviceID, res, detail})
		}
		if err := g.table([]string{"DEVICE", "RESULT", "DETAIL"}, rows); err != nil {
			return err
		}
		fmt.Fprintf(g.stdout, "%s: %d succeeded, %d failed\n", what, len(outs)-failed, failed)
	}
	if failed > 0 {
		return partialError{failed: failed, total: len(outs)}
	}
	return nil
}

func compact(raw json.RawMessage) string {
	if len(raw) == 0 {
		return ""
	}
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return string(raw)
	}
	return b.String()
}

// printTargets is a dry run's output.
func (g *globals) printTargets(ids []string, action string) error {
	if g.output == "json" {
		if ids == nil {
			ids = []string{}
		}
		return g.printJSON(map[string]any{"dryRun": true, "action": action, "count": len(ids), "targets": ids})
	}
	fmt.Fprintf(g.stdout, "dry run: would %s on %d device(s):\n", action, len(ids))
	for _, id := range ids {
		fmt.Fprintln(g.stdout, id)
	}
	return nil
}

// bulkCommand is `hubby bulk ...`: changes over many devices sent directly, one request per
// device, without a job.
func bulkCommand(g *globals) *cobra.Command {
	b := &cobra.Command{
		Use:   "bulk",
		Short: "Run an operation on many devices directly (no job), in parallel and rate-limited",
		Long: `Run an operation on many devices, chosen by --query, --ids-file or IDs as arguments, one
request per device sent directly by hubby: --parallel requests in flight, at most --rate per
second, throttled requests (429/503) retried. --dry-run lists the devices and changes nothing.
Prints one line (or JSON result) per device; exits 3 if any device failed.
A job (hubby jobs create) does the same on the hub's side and survives hubby exiting.`,
	}
	b.AddCommand(bulkTwinUpdate(g), bulkInvoke(g), bulkDelete(g), bulkSetStatus(g))
	return b
}

func bulkTwinUpdate(g *globals) *cobra.Command {
	var t targetFlags
	var pf patchFlags
	c := &cobra.Command{
		Use:   "twin-update [DEVICE_ID...]",
		Short: "Merge a patch (tags, desired properties) into many twins",
		RunE: func(cmd *cobra.Command, args []string) error {
			doc, err := pf.doc()
			if err != nil {
				return usageError{err}
			}
			return g.runBulk(cmd, &t, args, "update twins", func(ctx context.Context, c *service.Client, id string) outcome {
				if _, err := c.UpdateTwin(ctx, id, doc, "*"); err != nil {
					return failure(err)
				}
				return outcome{OK: true}
			})
		},
	}
	t.register(c)
	pf.register(c)
	return c
}

func bulkInvoke(g *globals) *cobra.Command {
	var t targetFlags
	var mf methodFlags
	c := &cobra.Command{
		Use:   "invoke-method METHOD [DEVICE_ID...]",
		Short: "Call a direct method on many devices; a device's status >= 400 counts as a failure",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 {
				return usageError{fmt.Errorf("%s needs the method name (usage: %s)", cmd.CommandPath(), cmd.UseLine())}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			call, err := mf.call(args[0])
			if err != nil {
				return usageError{err}
			}
			if need := mf.wait(); g.timeout < need {
				g.timeout = need
			}
			return g.runBulk(cmd, &t, args[1:], "invoke "+args[0], func(ctx context.Context, c *service.Client, id string) outcome {
				res, err := c.InvokeMethod(ctx, id, call)
				if err != nil {
					return failure(err)
				}
				o := outcome{OK: res.Status < 400, Status: res.Status, Payload: res.Payload}
				if !o.OK {
					o.Error = fmt.Sprintf("device answered %d", res.Status)
				}
				return o
			})
		},
	}
	t.register(c)
	mf.register(c, "method-")
	return c
}

func bulkDelete(g *globals) *cobra.Command {
	var t targetFlags
	var yes bool
	c := &cobra.Command{
		Use:   "delete [DEVICE_ID...]",
		Short: "Delete many device identities",
		RunE: func(cmd *cobra.Command, args []string) error {
			if !yes && !t.dryRun {
				return usageError{errors.New("deleting devices needs --yes (or --dry-run to see which)")}
			}
			return g.runBulk(cmd, &t, args, "delete devices", func(ctx context.Context, c *service.Client, id string) outcome {
				if err := c.DeleteDevice(ctx, id, ""); err != nil {
					return failure(err)
				}
				return outcome{OK: true}
			})
		},
	}
	t.register(c)
	c.Flags().BoolVar(&yes, "yes", false, "really delete")
	return c
}

func bulkSetStatus(g *globals) *cobra.Command {
	var t targetFlags
	var reason string
	c := &cobra.Command{
		Use:   "set-status enabled|disabled [DEVICE_ID...]",
		Short: "Enable or disable many devices (read, change, write each with its etag)",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 || (args[0] != "enabled" && args[0] != "disabled") {
				return usageError{fmt.Errorf("%s needs enabled or disabled first (usage: %s)", cmd.CommandPath(), cmd.UseLine())}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			status := args[0]
			return g.runBulk(cmd, &t, args[1:], "set status "+status, func(ctx context.Context, c *service.Client, id string) outcome {
				d, err := c.GetDevice(ctx, id)
				if err != nil {
					return failure(err)
				}
				d.Status = hubapi.Status(status)
				if reason != "" {
					d.StatusReason = reason
				}
				if _, err := c.UpdateDevice(ctx, d, d.ETag); err != nil {
					return failure(err)
				}
				return outcome{OK: true}
			})
		},
	}
	t.register(c)
	c.Flags().StringVar(&reason, "status-reason", "", "why")
	return c
}

// runBulk resolves the targets and runs op over them (or lists them with --dry-run).
func (g *globals) runBulk(cmd *cobra.Command, t *targetFlags, args []string, what string, op func(ctx context.Context, c *service.Client, id string) outcome) error {
	if err := t.check(); err != nil {
		return err
	}
	return g.withLong(cmd, func(ctx context.Context, c *service.Client) error {
		ids, err := g.targets(ctx, c, t, args)
		if err != nil {
			return err
		}
		if t.dryRun {
			return g.printTargets(ids, what)
		}
		outs := g.forEach(ctx, t, what, ids, func(ctx context.Context, id string) outcome {
			rctx, cancel := g.reqCtx(ctx)
			defer cancel()
			return op(rctx, c, id)
		})
		if err := ctx.Err(); err != nil {
			_ = g.report(outs, what)
			return err
		}
		return g.report(outs, what)
	})
}
