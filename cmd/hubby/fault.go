package main

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/hubsim/faults"
	"github.com/iothubby/iothubby/pkg/service"
)

// hubsimCommand is `hubby hubsim`: hubsim's own additions (fault injection, tier throttles).
func hubsimCommand(g *globals) *cobra.Command {
	h := &cobra.Command{Use: "hubsim", Short: "hubsim's own additions (not in a real IoT Hub)"}
	h.AddCommand(faultCommand(g))
	h.AddCommand(throttleCommand(g)) // throttle.go
	return h
}

// faultFlags are the parameters a fault kind takes, as flags.
type faultFlags uint

const (
	fDuration faultFlags = 1 << iota
	fDelay
	fConnack
	fHTTPCode
	fRetryAfter
	fDraw // --probability, --seed
	fREST // --path-prefix, --method
	fCount
)

// faultKinds are the admin fault kinds hubby offers, in docs/hubsim.md's order (drop and
// refuse-connect first, as before).
var faultKinds = []struct {
	action, short string
	flags         faultFlags
}{
	{faults.ActionDrop, "Close a device's connection now (every device's without DEVICE_ID)", 0},
	{faults.ActionRefuseConnect, "Refuse CONNECTs with a CONNACK return code for a while (seeded, reproducible)", fDuration | fConnack | fDraw},
	{faults.ActionPubackDelay, "Hold the PUBACKs of a device's telemetry for --delay", fDuration | fDelay | fDraw},
	{faults.ActionPubackDrop, "Never acknowledge telemetry (the publish is discarded; the device must re-send it)", fDuration | fDraw},
	{faults.ActionRESTError, "Answer service REST calls with 429/500/503 and Retry-After", fDuration | fHTTPCode | fRetryAfter | fDraw | fREST},
	{faults.ActionRESTDelay, "Delay service REST calls by --delay", fDuration | fDelay | fDraw | fREST},
	{faults.ActionDPSError, "Answer DPS registrations (MQTT and HTTPS) with 429/500/503 and a retry-after (DEVICE_ID: registration ID)", fDuration | fHTTPCode | fRetryAfter | fDraw},
	{faults.ActionDPSDelay, "Delay DPS registrations by --delay (DEVICE_ID: registration ID)", fDuration | fDelay | fDraw},
	{faults.ActionTokenExpire, "Close the connection as at SAS token expiry, --delay from now", fDelay},
	{faults.ActionStall, "Stop reading from and writing to the open connection for --duration (it stays open)", fDuration},
	{faults.ActionC2DDuplicate, "Deliver the next --count cloud-to-device messages twice (same message ID)", fDuration | fCount | fDraw},
}

// faultCommand is `hubby hubsim fault ...` over /hubsim/faults (docs/hubsim.md).
func faultCommand(g *globals) *cobra.Command {
	f := &cobra.Command{Use: "fault", Short: "Inject faults into hubsim (/hubsim/faults): list, clear, or one of the fault kinds"}
	status := func(cmd *cobra.Command, method string) error {
		return g.with(cmd, func(ctx context.Context, c *service.Client) error {
			var st faults.Status
			if err := c.HubsimFaults(ctx, method, nil, &st); err != nil {
				return err
			}
			return g.printFaultStatus(st)
		})
	}
	f.AddCommand(&cobra.Command{
		Use: "list", Short: "List fault rules and windows in force, counters and the recent fault log",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return status(cmd, service.FaultsGet) },
	})
	f.AddCommand(&cobra.Command{
		Use: "clear", Short: "End every fault rule and window (stalls released, token expiries cancelled)",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				var out struct {
					Cleared int `json:"cleared"`
				}
				if err := c.HubsimFaults(ctx, service.FaultsDelete, nil, &out); err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(out)
				}
				_, err := fmt.Fprintf(g.stdout, "cleared %d\n", out.Cleared)
				return err
			})
		},
	})
	for _, k := range faultKinds {
		f.AddCommand(faultKindCommand(g, k.action, k.short, k.flags))
	}
	return f
}

// faultKindCommand is `hubby hubsim fault KIND [DEVICE_ID] --flags`: POST /hubsim/faults.
func faultKindCommand(g *globals, action, short string, ff faultFlags) *cobra.Command {
	var (
		dur, delay, retryAfter time.Duration
		code, count            int
		prob                   float64
		seed                   uint64
		prefix, method         string
	)
	cmd := &cobra.Command{
		Use:   action + " [DEVICE_ID]",
		Short: short,
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			body := map[string]any{"action": action}
			if len(args) == 1 {
				body["deviceId"] = args[0]
			}
			if ff&fDuration != 0 && (action != faults.ActionC2DDuplicate || cmd.Flags().Changed("duration")) {
				body["durationSecs"] = dur.Seconds()
			}
			if ff&fDelay != 0 {
				body["delaySecs"] = delay.Seconds()
			}
			if ff&(fConnack|fHTTPCode) != 0 {
				body["code"] = code
			}
			if ff&fRetryAfter != 0 {
				if retryAfter%time.Second != 0 || retryAfter < 0 {
					return usageError{fmt.Errorf("--retry-after must be a whole number of seconds, not %v", retryAfter)}
				}
				body["retryAfterSecs"] = int(retryAfter / time.Second)
			}
			if ff&fDraw != 0 {
				body["probability"], body["seed"] = prob, seed
			}
			if ff&fREST != 0 && prefix != "" {
				body["pathPrefix"] = prefix
			}
			if ff&fREST != 0 && method != "" {
				body["method"] = method
			}
			if ff&fCount != 0 {
				body["count"] = count
			}
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				var r faults.Rule
				if err := c.HubsimFaults(ctx, service.FaultsPost, body, &r); err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(r)
				}
				return g.table(ruleHeader, [][]string{ruleRow(r)})
			})
		},
	}
	fl := cmd.Flags()
	if ff&fDuration != 0 {
		def, what := 30*time.Second, "how long the rule lasts (at most 1h)"
		switch action {
		case faults.ActionStall:
			what = "how long the connection stays stalled (at most 1h)"
		case faults.ActionC2DDuplicate:
			def, what = time.Hour, "how long the rule waits for deliveries to duplicate (at most 1h)"
		}
		fl.DurationVar(&dur, "duration", def, what)
	}
	if ff&fDelay != 0 {
		def, what := time.Second, "the delay (at most 1h)"
		if action == faults.ActionTokenExpire {
			def, what = 0, "when the token expires, from now (0: now; at most 1h)"
		}
		fl.DurationVar(&delay, "delay", def, what)
	}
	if ff&fConnack != 0 {
		fl.IntVar(&code, "code", 3, "CONNACK return code (1 to 5; 3 is server unavailable, 5 not authorized)")
	}
	if ff&fHTTPCode != 0 {
		fl.IntVar(&code, "code", http.StatusServiceUnavailable, "HTTP status: 429, 500 or 503")
	}
	if ff&fRetryAfter != 0 {
		fl.DurationVar(&retryAfter, "retry-after", time.Second, "the Retry-After sent (whole seconds, at most 1h)")
	}
	if ff&fDraw != 0 {
		fl.Float64Var(&prob, "probability", 1, "probability that an event is faulted (0 < p <= 1)")
		fl.Uint64Var(&seed, "seed", 1, "seed of the rule's random draws (same seed, same faults)")
	}
	if ff&fREST != 0 {
		fl.StringVar(&prefix, "path-prefix", "", "only requests whose path starts with this (e.g. /twins/)")
		fl.StringVar(&method, "method", "", "only requests with this HTTP method (GET, PUT, POST, PATCH, DELETE)")
	}
	if ff&fCount != 0 {
		fl.IntVar(&count, "count", 1, "how many deliveries to duplicate (1 to 1000)")
	}
	return cmd
}

var ruleHeader = []string{"ID", "ACTION", "DEVICE", "UNTIL", "PARAMETERS"}

func ruleRow(r faults.Rule) []string {
	dev := r.DeviceID
	if dev == "" {
		dev = "*"
	}
	var p []string
	add := func(k, v string) { p = append(p, k+"="+v) }
	switch r.Action {
	case faults.ActionDrop:
		add("dropped", strconv.Itoa(r.Code))
	case faults.ActionStall:
		add("connections", strconv.Itoa(r.Count))
	default:
		if r.Code != 0 {
			add("code", strconv.Itoa(r.Code))
		}
		if r.DelaySecs != 0 {
			add("delay", fmtSecs(r.DelaySecs))
		}
		if r.Action == faults.ActionRESTError || r.Action == faults.ActionDPSError {
			add("retry-after", strconv.Itoa(r.RetryAfterSecs)+"s")
		}
		if r.PathPrefix != "" {
			add("path-prefix", r.PathPrefix)
		}
		if r.Method != "" {
			add("method", r.Method)
		}
		if r.Count != 0 {
			add("count", strconv.Itoa(r.Count))
		}
		if r.Seed != 0 {
			add("p", strconv.FormatFloat(r.Probability, 'g', -1, 64))
			add("seed", strconv.FormatUint(r.Seed, 10))
		}
	}
	return []string{strconv.Itoa(r.ID), r.Action, dev, r.Until.Format(time.RFC3339), strings.Join(p, " ")}
}

func fmtSecs(s float64) string { return (time.Duration(s * float64(time.Second))).String() }

// faultLogRows is how many of the most recent fault log records the table shows.
const faultLogRows = 20

func (g *globals) printFaultStatus(st faults.Status) error {
	if g.output == "json" {
		return g.printJSON(st)
	}
	rows := make([][]string, 0, len(st.Rules)+len(st.Active))
	for _, r := range st.Rules {
		rows = append(rows, ruleRow(r))
	}
	for _, a := range st.Active {
		rows = append(rows, []string{"-", a.Type, a.DeviceID, a.Until.Format(time.RFC3339), "window (" + a.Kind + ")"})
	}
	if err := g.table(ruleHeader, rows); err != nil {
		return err
	}
	keys := make([]string, 0, len(st.Counters))
	for k := range st.Counters {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	rows = rows[:0]
	for _, k := range keys {
		typ, what, _ := strings.Cut(k, "/")
		rows = append(rows, []string{typ, what, strconv.FormatInt(st.Counters[k], 10)})
	}
	fmt.Fprintln(g.stdout)
	if err := g.table([]string{"FAULT", "ACTION", "COUNT"}, rows); err != nil {
		return err
	}
	log := st.Log
	if len(log) > faultLogRows {
		log = log[len(log)-faultLogRows:]
	}
	rows = rows[:0]
	for _, r := range log {
		rows = append(rows, []string{r.Time.Format(time.RFC3339), r.DeviceID, r.Type, r.Action, r.Reason})
	}
	fmt.Fprintf(g.stdout, "\nlast %d of %d log records\n", len(log), len(st.Log))
	return g.table([]string{"TIME", "DEVICE", "FAULT", "ACTION", "REASON"}, rows)
}
