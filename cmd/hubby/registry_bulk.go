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
	"strings"
	"text/template"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/backoff"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// importCommand is `hubby devices import`: create (or update, or delete) many identities through
// the bulk registry operation, 100 a call.
func importCommand(g *globals) *cobra.Command {
	var count, startAt int
	var pattern, file, mode string
	var dryRun bool
	c := &cobra.Command{
		Use:     "import",
		Aliases: []string{"create-many"},
		Short:   "Create many devices from a pattern or a file, 100 per bulk registry call",
		Long: `Create (--mode create), create-or-update (update) or delete (delete) device identities through
the bulk registry operation (POST /devices), 100 devices a call. The devices are either --count
IDs made from --pattern, a Go template given .Index (from --start), or read from --file: JSON
lines as hubby devices export writes them (id or deviceId, status, authentication; keys are
kept), or one device ID a line. Devices the hub refuses are listed; exit 3 if any.`,
		Example: `  hubby devices import --count 1000 --pattern 'sim-{{printf "%05d" .Index}}'
  hubby devices export > fleet.jsonl && hubby devices import --file fleet.jsonl --mode update`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			switch mode {
			case "create":
				mode = service.ImportCreate
			case "update":
				mode = service.ImportUpdate
			case "delete":
				mode = service.ImportDelete
			default:
				return usageError{fmt.Errorf("--mode must be create, update or delete, not %q", mode)}
			}
			var devs []service.BulkDevice
			switch {
			case (count > 0) == (file != ""):
				return usageError{errors.New("give --count with --pattern, or --file")}
			case count > 0:
				if count > 1_000_000 {
					return usageError{errors.New("--count is at most 1000000")}
				}
				tmpl, err := template.New("pattern").Option("missingkey=error").Parse(pattern)
				if err != nil {
					return usageError{fmt.Errorf("--pattern: %v", err)}
				}
				seen := map[string]bool{}
				for i := startAt; i < startAt+count; i++ {
					var b bytes.Buffer
					if err := tmpl.Execute(&b, struct{ Index int }{i}); err != nil {
						return usageError{fmt.Errorf("--pattern: %v", err)}
					}
					id := b.String()
					if err := checkDeviceID(id); err != nil {
						return usageError{fmt.Errorf("--pattern gives %q for index %d: %v", id, i, err)}
					}
					if seen[id] {
						return usageError{fmt.Errorf("--pattern gives %q twice (use .Index)", id)}
					}
					seen[id] = true
					devs = append(devs, service.BulkDevice{ID: id})
				}
			default:
				var r io.Reader = os.Stdin
				if file != "-" {
					f, err := os.Open(file)
					if err != nil {
						return err
					}
					defer f.Close()
					r = f
				}
				var err error
				if devs, err = readBulkDevices(r); err != nil {
					return usageError{fmt.Errorf("%s: %w", file, err)}
				}
			}
			for i := range devs {
				devs[i].ImportMode = mode
				if mode != service.ImportCreate {
					devs[i].ETag = ""
				}
			}
			if dryRun {
				ids := make([]string, len(devs))
				for i, d := range devs {
					ids[i] = d.ID
				}
				return g.printTargets(ids, mode+" devices")
			}
			return g.withLong(cmd, func(ctx context.Context, c *service.Client) error {
				return g.bulkRegistry(ctx, c, devs, mode)
			})
		},
	}
	f := c.Flags()
	f.IntVar(&count, "count", 0, "how many devices to make from --pattern")
	f.IntVar(&startAt, "start", 0, "the first .Index")
	f.StringVar(&pattern, "pattern", `device-{{.Index}}`, `device ID template, e.g. 'sim-{{printf "%05d" .Index}}'`)
	f.StringVar(&file, "file", "", "JSON lines of devices (as devices export writes), or one ID a line (- for stdin)")
	f.StringVar(&mode, "mode", "create", "create, update (create or update) or delete")
	f.BoolVar(&dryRun, "dry-run", false, "list the devices, change nothing")
	return c
}

func checkDeviceID(id string) error {
	if id == "" || len(id) > 128 {
		return errors.New("a device ID is 1 to 128 characters")
	}
	for _, r := range id {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-.%_*?!(),:=@$'+", r)
		if !ok {
			return fmt.Errorf("%q is not allowed in a device ID", r)
		}
	}
	return nil
}

// readBulkDevices reads JSON lines of devices, or device IDs one a line.
func readBulkDevices(r io.Reader) ([]service.BulkDevice, error) {
	var out []service.BulkDevice
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		var d service.BulkDevice
		if strings.HasPrefix(s, "{") {
			var row struct {
				service.BulkDevice
				DeviceID string `json:"deviceId"`
			}
			dec := json.NewDecoder(strings.NewReader(s))
			if err := dec.Decode(&row); err != nil {
				return nil, fmt.Errorf("line %d: %v", line, err)
			}
			d = row.BulkDevice
			if d.ID == "" {
				d.ID = row.DeviceID
			}
		} else {
			d.ID = s
		}
		if err := checkDeviceID(d.ID); err != nil {
			return nil, fmt.Errorf("line %d: %v", line, err)
		}
		out = append(out, d)
	}
	return out, sc.Err()
}

// bulkRegistry sends devs 100 a call and reports per-device failures.
func (g *globals) bulkRegistry(ctx context.Context, c *service.Client, devs []service.BulkDevice, mode string) error {
	prog := g.newProgress(mode+" devices", len(devs))
	var failures []outcome
	for i := 0; i < len(devs); i += service.MaxBulkDevices {
		batch := devs[i:min(i+service.MaxBulkDevices, len(devs))]
		res, err := g.bulkCall(ctx, c, batch)
		if err != nil {
			prog.finish()
			return fmt.Errorf("bulk registry call for devices %d to %d: %w (the devices before them were done)", i, i+len(batch)-1, err)
		}
		bad := map[string]bool{}
		for _, e := range res.Errors {
			bad[e.DeviceID] = true
			failures = append(failures, outcome{DeviceID: e.DeviceID, Error: strings.TrimSpace(e.ErrorCode + ": " + e.ErrorStatus)})
		}
		for _, d := range batch {
			prog.add(!bad[d.ID])
		}
	}
	prog.finish()
	ok := len(devs) - len(failures)
	if g.output == "json" {
		if failures == nil {
			failures = []outcome{}
		}
		if err := g.printJSON(struct {
			Succeeded int       `json:"succeeded"`
			Failed    int       `json:"failed"`
			Failures  []outcome `json:"failures"`
		}{ok, len(failures), failures}); err != nil {
			return err
		}
	} else {
		if len(failures) > 0 {
			rows := make([][]string, 0, len(failures))
			for _, f := range failures {
				rows = append(rows, []string{f.DeviceID, f.Error})
			}
			if err := g.table([]string{"DEVICE", "ERROR"}, rows); err != nil {
				return err
			}
		}
		fmt.Fprintf(g.stdout, "%s: %d succeeded, %d failed\n", mode, ok, len(failures))
	}
	if len(failures) > 0 {
		return partialError{failed: len(failures), total: len(devs)}
	}
	return nil
}

// bulkCall sends one batch, again after throttling (429) or unavailability (503), up to three
// times with backoff.
func (g *globals) bulkCall(ctx context.Context, c *service.Client, batch []service.BulkDevice) (*service.BulkResult, error) {
	pol := backoff.Policy{Min: time.Second, Max: 30 * time.Second}
	for attempt := 0; ; attempt++ {
		rctx, cancel := g.reqCtx(ctx)
		res, err := c.BulkDevices(rctx, batch)
		cancel()
		var se wire.ServiceError
		if err == nil || attempt >= 3 || !errors.As(err, &se) || (se.Status != 429 && se.Status != 503) {
			return res, err
		}
		t := time.NewTimer(pol.Delay(attempt, rand.Float64()))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

// exportRow is a line of devices export: the bulk registry row without an import mode.
type exportRow struct {
	ID             string                  `json:"id"`
	Status         string                  `json:"status,omitempty"`
	StatusReason   string                  `json:"statusReason,omitempty"`
	Authentication *service.Authentication `json:"authentication,omitempty"`
	Capabilities   *service.Capabilities   `json:"capabilities,omitempty"`
}

// exportCommand is `hubby devices export`: the registry as JSON lines.
func exportCommand(g *globals) *cobra.Command {
	var query string
	var parallel int
	c := &cobra.Command{
		Use:   "export",
		Short: "Print device identities (with their keys) as JSON lines, one device a line",
		Long: `Print the registry as JSON lines in the bulk registry shape (id, status, authentication with
keys, capabilities), which hubby devices import --file reads back. The devices are found with a
query (--query, default every device) and read one by one (--parallel at once), since query
results carry no keys. The output holds secrets: keep it safe.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			t := targetFlags{query: query, parallel: parallel, retries: 3}
			if err := t.check(); err != nil {
				return err
			}
			return g.withLong(cmd, func(ctx context.Context, c *service.Client) error {
				ids, err := g.targets(ctx, c, &t, nil)
				if err != nil {
					return err
				}
				got := make([]service.Device, len(ids))
				idx := map[string]int{}
				for i, id := range ids {
					idx[id] = i
				}
				outs := g.forEach(ctx, &t, "export", ids, func(ctx context.Context, id string) outcome {
					rctx, cancel := g.reqCtx(ctx)
					defer cancel()
					d, err := c.GetDevice(rctx, id)
					if err != nil {
						return failure(err)
					}
					got[idx[id]] = d
					return outcome{OK: true}
				})
				if err := ctx.Err(); err != nil {
					return err
				}
				w := bufio.NewWriter(g.stdout)
				var failures []outcome
				for i, o := range outs {
					if !o.OK {
						failures = append(failures, o)
						continue
					}
					d := got[i]
					b, err := json.Marshal(exportRow{ID: d.DeviceID, Status: string(d.Status), StatusReason: d.StatusReason,
						Authentication: &d.Authentication, Capabilities: &d.Capabilities})
					if err != nil {
						return err
					}
					w.Write(b)
					w.WriteByte('\n')
				}
				if err := w.Flush(); err != nil {
					return err
				}
				for _, f := range failures {
					fmt.Fprintf(g.stderr, "export: %s: %s\n", f.DeviceID, f.Error)
				}
				if len(failures) > 0 {
					return partialError{failed: len(failures), total: len(ids)}
				}
				return nil
			})
		},
	}
	c.Flags().StringVarP(&query, "query", "q", "*", "WHERE condition choosing the devices (* for all)")
	c.Flags().IntVar(&parallel, "parallel", 8, "device reads in flight at once")
	return c
}
