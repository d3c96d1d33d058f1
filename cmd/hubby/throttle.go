package main

import (
	"context"
	"fmt"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
	"github.com/iothubby/iothubby/pkg/service"
)

// throttleCommand is `hubby hubsim throttle`: hubsim's tier throttle counters
// (GET /hubsim/throttle; hubsim serve --tier).
func throttleCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "throttle",
		Short: "Show hubsim's tier throttles: per operation the limit, calls allowed and calls throttled",
		Long: `Show hubsim's IoT Hub tier throttles (hubsim serve --tier T --units N): per operation its
limit per second (0: not throttled), how many calls were allowed and how many throttled since
hubsim started. Without --tier only DPS registrations are listed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				var st throttle.Status
				if err := c.HubsimThrottle(ctx, &st); err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(st)
				}
				if st.Tier == "" {
					fmt.Fprintln(g.stdout, "tier: none (hubsim runs without --tier)")
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
			})
		},
	}
}
