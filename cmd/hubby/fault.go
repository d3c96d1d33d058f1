package main

import (
	"context"
	"encoding/json"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/service"
)

// hubsimCommand is `hubby hubsim`: hubsim's own additions (fault injection, tier throttles).
func hubsimCommand(g *globals) *cobra.Command {
	h := &cobra.Command{Use: "hubsim", Short: "hubsim's own additions (not in a real IoT Hub)"}
	h.AddCommand(faultCommand(g))
	h.AddCommand(throttleCommand(g)) // throttle.go
	return h
}

// faultCommand is `hubby hubsim fault ...` over /hubsim/faults (docs/hubsim.md).
func faultCommand(g *globals) *cobra.Command {
	f := &cobra.Command{Use: "fault", Short: "Inject faults into hubsim's device endpoint (/hubsim/faults)"}
	call := func(cmd *cobra.Command, method string, body any) error {
		return g.with(cmd, func(ctx context.Context, c *service.Client) error {
			var out json.RawMessage
			if err := c.HubsimFaults(ctx, method, body, &out); err != nil {
				return err
			}
			return g.printJSON(out)
		})
	}
	f.AddCommand(&cobra.Command{
		Use: "list", Short: "List active fault windows and rules, counters and the recent fault log",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return call(cmd, service.FaultsGet, nil) },
	})
	f.AddCommand(&cobra.Command{
		Use: "drop [DEVICE_ID]", Short: "Close a device's connection now (every device's without DEVICE_ID)",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			body := map[string]any{"action": "drop"}
			if len(args) == 1 {
				body["deviceId"] = args[0]
			}
			return call(cmd, service.FaultsPost, body)
		},
	})
	var code int
	var dur time.Duration
	var prob float64
	var seed uint64
	refuse := &cobra.Command{
		Use:   "refuse-connect [DEVICE_ID]",
		Short: "Refuse CONNECTs with a CONNACK return code for a while (seeded, reproducible)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			body := map[string]any{"action": "refuse-connect", "code": code, "durationSecs": dur.Seconds(), "probability": prob, "seed": seed}
			if len(args) == 1 {
				body["deviceId"] = args[0]
			}
			return call(cmd, service.FaultsPost, body)
		},
	}
	refuse.Flags().IntVar(&code, "code", 3, "CONNACK return code (1 to 5; 3 is server unavailable, 5 not authorized)")
	refuse.Flags().DurationVar(&dur, "duration", 30*time.Second, "how long the rule lasts (at most 1h)")
	refuse.Flags().Float64Var(&prob, "probability", 1, "probability that a CONNECT is refused (0 < p <= 1)")
	refuse.Flags().Uint64Var(&seed, "seed", 1, "seed of the rule's random draws")
	f.AddCommand(refuse)
	f.AddCommand(&cobra.Command{
		Use: "clear", Short: "End every fault rule and window",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return call(cmd, service.FaultsDelete, nil) },
	})
	return f
}
