package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/iothubby/iothubby/pkg/firmware"
	"github.com/iothubby/iothubby/pkg/service"
)

func firmwareUpdate(g *globals) *cobra.Command {
	var via, query string
	var wait, poll time.Duration
	cmd := &cobra.Command{
		Use:   "update (DEVICE | --query Q) MANIFEST [--via method|twin]",
		Short: "Start a firmware update and follow the device's progress until current or failed",
		Long: `Start a firmware update with a manifest (from sign or publish; "-" reads standard input) and
follow the device's reported firmware state (downloading, verifying, applying, rebooting) until
it is current or failed, with a progress bar on a terminal and plain lines otherwise.

--via method (default) calls the device's firmwareUpdate method: a device that refuses the
manifest (bad signature, a downgrade, a URL it cannot use, another update under way) answers at
once and hubby reports its reason. --via twin sets the desired property firmware: the device
takes it when it next connects, and a refusal shows in its reported firmware state.

--query Q updates every device the query selects (a WHERE clause or a whole SELECT).

Exit status: 0 the device runs the manifest's version (also when it already did); 1 it refused
or failed the update, with its reason, or no progress came within --wait; 3 some of the
devices of --query failed.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if want := 2 - min(len(query), 1); len(args) != want {
				return usageError{fmt.Errorf("%s: give DEVICE and MANIFEST, or --query Q and MANIFEST (usage: %s)", cmd.CommandPath(), cmd.UseLine())}
			}
			if via != "method" && via != "twin" {
				return usageError{fmt.Errorf("--via must be method or twin, not %q", via)}
			}
			if wait <= 0 || poll <= 0 {
				return usageError{errors.New("--wait and --poll-interval must be positive")}
			}
			m, raw, err := readManifest(cmd, args[len(args)-1])
			if err != nil {
				return err
			}
			if m.Version == "" {
				return fmt.Errorf("manifest %s has no version", args[len(args)-1])
			}
			return g.withLong(cmd, func(ctx context.Context, c *service.Client) error {
				ids := args[:1]
				if query != "" {
					rctx, cancel := g.reqCtx(ctx)
					ids, err = g.queryIDs(rctx, c, query)
					cancel()
					if err != nil {
						return err
					}
					if len(ids) == 0 {
						return fmt.Errorf("the query selects no device: %s", query)
					}
				}
				u := &fwUpdater{g: g, c: c, m: m, raw: json.RawMessage(raw), via: via, poll: poll}
				ctx, cancel := context.WithTimeout(ctx, wait)
				defer cancel()
				return u.run(ctx, ids)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&via, "via", "method", "how to start the update: method (firmwareUpdate) or twin (desired firmware)")
	f.StringVar(&query, "query", "", "update every device this query selects")
	f.DurationVar(&wait, "wait", 15*time.Minute, "how long to follow the update before giving up")
	f.DurationVar(&poll, "poll-interval", time.Second, "how often to read the devices' twins")
	return cmd
}

// fwReport is the agent's reported `firmware` property (pkg/firmware.Status).
type fwReport struct {
	State         string `json:"state"`
	Version       string `json:"version"`
	TargetVersion string `json:"targetVersion"`
	Percent       int    `json:"percent"`
	Error         string `json:"error"`
	LastUpdated   string `json:"lastUpdated"`
}

func reportedFirmware(t service.Twin) (fwReport, string) {
	var r fwReport
	if b, err := json.Marshal(t.Properties.Reported["firmware"]); err == nil {
		_ = json.Unmarshal(b, &r)
	}
	fv, _ := t.Properties.Reported["firmwareVersion"].(string)
	return r, fv
}

// stages is the order an update goes through.
var stages = []string{string(firmware.Downloading), string(firmware.Verifying), string(firmware.Applying), string(firmware.Rebooting), string(firmware.Current)}

// fwFollow follows one device's reported firmware for one target version. It is pure: fed
// each reported state read, it says what to show and when the update is over.
type fwFollow struct {
	id, target string
	base       fwReport
	last       fwReport
	stage      int // index in stages of the last state shown; -1 none
	done, ok   bool
	reason     string
}

func newFollow(id, target string, base fwReport) *fwFollow {
	return &fwFollow{id: id, target: target, base: base, stage: -1}
}

// observe takes a reported state and returns the lines to show (a stage the device went through
// between two reads is shown as passed, never left out).
func (f *fwFollow) observe(r fwReport) []string {
	if f.done || r == f.base || r == f.last {
		return nil
	}
	relevant := r.TargetVersion == f.target || r.State == string(firmware.Current) && r.Version == f.target
	if !relevant {
		return nil
	}
	f.last = r
	var lines []string
	if r.State == string(firmware.Failed) {
		f.done, f.reason = true, r.Error
		if f.reason == "" {
			f.reason = "failed (no reason reported)"
		}
		return append(lines, fmt.Sprintf("%s: failed: %s", f.id, f.reason))
	}
	i := slices.Index(stages, r.State)
	if i < 0 {
		return append(lines, fmt.Sprintf("%s: %s", f.id, r.State))
	}
	for j := f.stage + 1; j < i; j++ {
		lines = append(lines, fmt.Sprintf("%s: %s (passed between two reads)", f.id, stages[j]))
	}
	switch {
	case r.State == string(firmware.Downloading):
		lines = append(lines, fmt.Sprintf("%s: downloading %d%%", f.id, r.Percent))
	case r.State == string(firmware.Current):
		f.done, f.ok = true, true
		lines = append(lines, fmt.Sprintf("%s: current, running %s", f.id, r.Version))
	case i != f.stage:
		lines = append(lines, fmt.Sprintf("%s: %s", f.id, r.State))
	}
	f.stage = i
	return lines
}

type fwUpdater struct {
	g    *globals
	c    *service.Client
	m    firmware.Manifest
	raw  json.RawMessage
	via  string
	poll time.Duration
	one  bool // a single device: its progress in detail
}

type fwResult struct {
	DeviceID string `json:"deviceId"`
	State    string `json:"state"`
	Version  string `json:"version,omitempty"`
	Error    string `json:"error,omitempty"`
}

// run starts the update on every device, then follows them all until each is current or
// failed, or ctx ends.
func (u *fwUpdater) run(ctx context.Context, ids []string) error {
	single := len(ids) == 1
	u.one = single
	var bar *progressbar.ProgressBar
	var prog *progress
	if single {
		if f, ok := u.g.stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
			bar = progressbar.NewOptions(100, progressbar.OptionSetWriter(f), progressbar.OptionSetDescription(ids[0]+": starting"),
				progressbar.OptionClearOnFinish(), progressbar.OptionThrottle(100*time.Millisecond))
		}
	} else {
		prog = u.g.newProgress("firmware "+u.m.Version, len(ids))
	}
	show := func(f *fwFollow, lines []string) {
		switch {
		case bar != nil:
			bar.Describe(f.id + ": " + f.last.State)
			if f.last.State == string(firmware.Downloading) {
				_ = bar.Set(f.last.Percent)
			} else if f.last.State != "" {
				_ = bar.Set(100)
			}
		case single && !(f.done && !f.ok): // a failure's reason is the command's error line
			for _, l := range lines {
				fmt.Fprintln(u.g.stderr, l)
			}
		}
	}
	results := map[string]fwResult{}
	var follows []*fwFollow
	for _, id := range ids {
		f, res := u.start(ctx, id)
		if res != nil {
			results[id] = *res
			if prog != nil {
				prog.add(res.State == string(firmware.Current))
			}
			continue
		}
		follows = append(follows, f)
	}
	t := time.NewTicker(u.poll)
	defer t.Stop()
	for len(follows) > 0 {
		select {
		case <-ctx.Done():
			for _, f := range follows {
				reason := "no progress reported (is firmware.mode set on the device, and is it connected?)"
				if f.last.State != "" {
					reason = "still " + f.last.State
				}
				results[f.id] = fwResult{DeviceID: f.id, State: "timeout", Error: fmt.Sprintf("gave up waiting (--wait): %s", reason)}
			}
			follows = nil
			continue
		case <-t.C:
		}
		var still []*fwFollow
		for _, f := range follows {
			rctx, cancel := u.g.reqCtx(ctx)
			tw, err := u.c.GetTwin(rctx, f.id)
			cancel()
			if err != nil {
				if ctx.Err() == nil {
					fmt.Fprintf(u.g.stderr, "%s: reading the twin: %v (will retry)\n", f.id, oneLine(err))
				}
				still = append(still, f)
				continue
			}
			r, _ := reportedFirmware(tw)
			show(f, f.observe(r))
			if !f.done {
				still = append(still, f)
				continue
			}
			res := fwResult{DeviceID: f.id, State: f.last.State, Version: f.last.Version, Error: f.reason}
			results[f.id] = res
			if prog != nil {
				prog.add(f.ok)
			}
		}
		follows = still
	}
	if bar != nil {
		_ = bar.Finish()
	}
	if prog != nil {
		prog.finish()
	}
	return u.report(ids, results)
}

// start sends the manifest to one device. It returns a result when the update is over before
// it started (already running, refused, unreachable), else a follower.
func (u *fwUpdater) start(ctx context.Context, id string) (*fwFollow, *fwResult) {
	rctx, cancel := u.g.reqCtx(ctx)
	defer cancel()
	tw, err := u.c.GetTwin(rctx, id)
	if err != nil {
		return nil, &fwResult{DeviceID: id, State: "error", Error: oneLine(err)}
	}
	base, running := reportedFirmware(tw)
	if running == u.m.Version && (base.State == "" || base.State == string(firmware.Current) || base.Version == u.m.Version) {
		return nil, &fwResult{DeviceID: id, State: string(firmware.Current), Version: running}
	}
	f := newFollow(id, u.m.Version, base)
	if u.via == "twin" {
		patch := map[string]any{"properties": map[string]any{"desired": map[string]any{"firmware": u.raw}}}
		if _, err := u.c.UpdateTwin(rctx, id, patch, "*"); err != nil {
			return nil, &fwResult{DeviceID: id, State: "error", Error: "setting desired firmware: " + oneLine(err)}
		}
		if u.one {
			fmt.Fprintf(u.g.stderr, "%s: desired firmware set to %s; the device takes it when connected\n", id, u.m.Version)
		}
		return f, nil
	}
	res, err := u.c.InvokeMethod(rctx, id, service.MethodCall{MethodName: "firmwareUpdate", Payload: u.raw, ResponseTimeout: 30 * time.Second})
	if err != nil {
		return nil, &fwResult{DeviceID: id, State: "error", Error: "firmwareUpdate: " + oneLine(err)}
	}
	var answer struct {
		Message string `json:"message"`
		State   string `json:"state"`
	}
	_ = json.Unmarshal(res.Payload, &answer)
	switch {
	case res.Status == 202 && answer.State == string(firmware.Failed) && base.State == string(firmware.Failed) && base.TargetVersion == u.m.Version:
		// The updater does not retry a manifest that failed on its own.
		return nil, &fwResult{DeviceID: id, State: string(firmware.Failed), Error: base.Error + " (this manifest already failed on the device; publish and send a new version)"}
	case res.Status == 202:
		if u.one {
			fmt.Fprintf(u.g.stderr, "%s: firmwareUpdate accepted (%s)\n", id, u.m.Version)
		}
		return f, nil
	case res.Status == 501:
		return nil, &fwResult{DeviceID: id, State: "refused", Error: "the device has no firmwareUpdate method (firmware.mode is off in its agent configuration)"}
	default:
		reason := answer.Message
		if reason == "" {
			reason = strings.TrimSpace(string(res.Payload))
		}
		return nil, &fwResult{DeviceID: id, State: string(firmware.Failed), Error: fmt.Sprintf("refused (%d): %s", res.Status, reason)}
	}
}

// report prints the results and turns them into the exit status.
func (u *fwUpdater) report(ids []string, results map[string]fwResult) error {
	failed := 0
	list := make([]fwResult, 0, len(ids))
	for _, id := range ids {
		r := results[id]
		list = append(list, r)
		if r.State != string(firmware.Current) {
			failed++
		}
	}
	switch {
	case u.g.output == "json":
		if err := u.g.printJSON(list); err != nil {
			return err
		}
	case len(ids) > 1 || failed == 0: // one device's failure is the error line alone
		printResults(u.g.stdout, u.m.Version, list)
	}
	switch {
	case failed == 0:
		return nil
	case len(ids) == 1:
		return fmt.Errorf("%s: firmware %s not installed: %s", ids[0], u.m.Version, list[0].Error)
	default:
		return partialError{failed: failed, total: len(ids), what: fmt.Sprintf("firmware %s: %d of %d devices not updated", u.m.Version, failed, len(ids))}
	}
}

func printResults(w io.Writer, version string, list []fwResult) {
	for _, r := range list {
		switch r.State {
		case string(firmware.Current):
			fmt.Fprintf(w, "%s: running %s\n", r.DeviceID, version)
		default:
			fmt.Fprintf(w, "%s: %s: %s\n", r.DeviceID, r.State, r.Error)
		}
	}
}
