package main

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/service"
)

// methodCommand is the older spelling, `hubby method invoke`, kept working.
func methodCommand(g *globals) *cobra.Command {
	m := &cobra.Command{Use: "method", Short: "Call direct methods on devices (see also invoke-method)"}
	m.AddCommand(newInvoke(g, "invoke DEVICE_ID METHOD"))
	return m
}

// invokeCommand is `hubby invoke-method` (az iot hub invoke-device-method).
func invokeCommand(g *globals) *cobra.Command {
	c := newInvoke(g, "invoke-method DEVICE_ID METHOD")
	c.Aliases = []string{"invoke-device-method", "invoke"}
	return c
}

// methodFlags are a direct method's payload and timeouts.
type methodFlags struct {
	payload                 string
	timeout, connectTimeout int
}

func (m *methodFlags) register(c *cobra.Command, prefix string) {
	f := c.Flags()
	f.StringVar(&m.payload, prefix+"payload", "", "request payload (JSON; default null)")
	f.IntVar(&m.timeout, prefix+"timeout", 30, "seconds the hub waits for the device's answer (5 to 300)")
	f.IntVar(&m.connectTimeout, prefix+"connect-timeout", 0, "seconds the hub waits for the device to connect (0 to 300)")
}

func (m *methodFlags) call(name string) (service.MethodCall, error) {
	var p json.RawMessage
	if m.payload != "" {
		if !json.Valid([]byte(m.payload)) {
			return service.MethodCall{}, fmt.Errorf("--payload is not valid JSON")
		}
		p = json.RawMessage(m.payload)
	}
	if m.timeout < 5 || m.timeout > 300 || m.connectTimeout < 0 || m.connectTimeout > 300 {
		return service.MethodCall{}, fmt.Errorf("the method timeout must be 5 to 300 and the connect timeout 0 to 300 (seconds)")
	}
	return service.MethodCall{MethodName: name, Payload: p,
		ResponseTimeout: time.Duration(m.timeout) * time.Second,
		ConnectTimeout:  time.Duration(m.connectTimeout) * time.Second}, nil
}

// wait is how long one call may take: the hub's waits plus a margin.
func (m *methodFlags) wait() time.Duration {
	return time.Duration(m.timeout+m.connectTimeout)*time.Second + 30*time.Second
}

func newInvoke(g *globals, use string) *cobra.Command {
	var mf methodFlags
	invoke := &cobra.Command{
		Use:   use,
		Short: "Call a direct method and print the device's status and payload",
		Long: "Call a direct method and print the device's status and payload. The command fails when\n" +
			"the device is not connected (404103) or does not answer within --timeout (504101); a\n" +
			"device's own error status is printed, and is not a failure of the command.",
		Args: exactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			call, err := mf.call(args[1])
			if err != nil {
				return usageError{err}
			}
			if need := mf.wait(); g.timeout < need {
				g.timeout = need
			}
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				res, err := c.InvokeMethod(ctx, args[0], call)
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
	mf.register(invoke, "")
	return invoke
}
