package main

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/service"
)

func methodCommand(g *globals) *cobra.Command {
	m := &cobra.Command{Use: "method", Short: "Call direct methods on devices"}
	var payload string
	var timeout, connectTimeout int
	invoke := &cobra.Command{
		Use:   "invoke DEVICE_ID METHOD",
		Short: "Call a direct method and print the device's status and payload",
		Long: "Call a direct method and print the device's status and payload. The command fails when\n" +
			"the device is not connected (404103) or does not answer within --timeout (504101); a\n" +
			"device's own error status is printed, and is not a failure of the command.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var p json.RawMessage
			if payload != "" {
				if !json.Valid([]byte(payload)) {
					return fmt.Errorf("--payload is not valid JSON")
				}
				p = json.RawMessage(payload)
			}
			if timeout < 5 || timeout > 300 || connectTimeout < 0 || connectTimeout > 300 {
				return fmt.Errorf("--timeout must be 5 to 300 and --connect-timeout 0 to 300 (seconds)")
			}
			// The whole command gets the hub's waits plus a margin, beyond the global default.
			if need := time.Duration(timeout+connectTimeout)*time.Second + 30*time.Second; g.timeout < need {
				g.timeout = need
			}
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				res, err := c.InvokeMethod(ctx, args[0], service.MethodCall{
					MethodName: args[1], Payload: p,
					ResponseTimeout: time.Duration(timeout) * time.Second,
					ConnectTimeout:  time.Duration(connectTimeout) * time.Second,
				})
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(res)
				}
				fmt.Fprintf(g.stdout, "status:  %d\npayload: %s\n", res.Status, res.Payload)
				return nil
			})
		},
	}
	f := invoke.Flags()
	f.StringVar(&payload, "payload", "", "request payload (JSON; default null)")
	f.IntVar(&timeout, "timeout", 30, "seconds the hub waits for the device's answer (5 to 300)")
	f.IntVar(&connectTimeout, "connect-timeout", 0, "seconds the hub waits for the device to connect (0 to 300)")
	m.AddCommand(invoke)
	return m
}
