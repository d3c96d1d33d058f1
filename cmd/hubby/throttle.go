package main

import (
	"context"
	"fmt"
	"net/http"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
	"github.com/iothubby/iothubby/pkg/service"
)

// throttleCommand is `hubby hubsim throttle`: hubsim's tier throttle counters
// (GET /hubsim/throttle; hubsim serve --tier).
func throttleCommand(g *globals) *cobra.Command {
	show := func(cmd *cobra.Command, method string, body any) error {
		return g.with(cmd, func(ctx context.Context, c *service.Client) error {
			var st throttle.Status
			if err := c.HubsimThrottle(ctx, method, body, &st); err != nil {
				return err
			}
			return g.printThrottle(st)
		})
	}
	var units int
	var limits map[string]string
	set := &cobra.Command{
		Use:   "set TIER",
		Short: "Throttle as an IoT Hub tier from now on (F1, S1, S2, S3, B1-B3): full buckets, counters from zero",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			body := map[string]any{"tier": args[0], "units": units}
			if len(limits) > 0 {
				rates := map[string]float64{}
				for op, v := range limits {
					r, err := strconv.ParseFloat(v, 64)
					if err != nil {
						return usageError{fmt.Errorf("--limit %s=%s: the rate is not a number", op, v)}
					}
					rates[op] = r
				}
				body["limits"] = rates
			}
			return show(cmd, http.MethodPost, body)
		},
	}
	set.Flags().IntVar(&units, "units", 1, "units of the tier")
	set.Flags().StringToStringVar(&limits, "limit", nil, "OP=RATE: replace the tier's rate per second of an operation (connect, d2c, registry, twin-read, twin-update, method, job, query); repeatable")
	t := &cobra.Command{
		Use:   "throttle",
		Short: "Show hubsim's tier throttles: per operation the limit, calls allowed and calls throttled",
		Long: `Show hubsim's IoT Hub tier throttles (hubsim serve --tier T --units N): per operation its
limit per second, how many calls were allowed and how many throttled since the tier was set.
Without a tier only DPS registrations are listed. "set" and "off" change the tier while hubsim
runs.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return show(cmd, http.MethodGet, nil) },
	}
	t.AddCommand(set, &cobra.Command{
		Use: "off", Short: "Stop throttling", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return show(cmd, http.MethodDelete, nil) },
	})
	return t
}

func (g *globals) printThrottle(st throttle.Status) error {
	if g.output == "json" {
		return g.printJSON(st)
	}
	if st.Tier == "" {
		fmt.Fprintln(g.stdout, "tier: none (throttling off)")
	} else {
		fmt.Fprintf(g.stdout, "tier: %s, %d unit(s)\n", st.Tier, st.Units)
	}
	rows := make([][]string, 0, len(st.Operations))
	for _, o := range st.Operations {
		limit := "-"
		if o.PerSecond > 0 {
			limit = strconv.FormatFloat(o.PerSecond, 'f', 2, 64)
		}
		rows = append(rows, []string{string(o.Op), limit, strconv.FormatUint(o.Allowed, 10), strconv.FormatUint(o.Throttled, 10)})
	}
	return g.table([]string{"OPERATION", "PER SECOND", "ALLOWED", "THROTTLED"}, rows)
}
