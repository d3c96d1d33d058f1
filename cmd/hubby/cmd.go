package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/connstr"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

type globals struct {
	connString  string
	address     string
	caFile      string
	hubsimState string
	output      string
	timeout     time.Duration
	stdout      io.Writer

	// mqttAddress is hubsim's device endpoint, known only with --hubsim-state.
	mqttAddress string
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	g := &globals{stdout: stdout}
	root := &cobra.Command{
		Use:           "hubby",
		Short:         "Fleet CLI for Azure IoT Hub and hubsim",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	pf := root.PersistentFlags()
	pf.StringVar(&g.connString, "connection-string", "", "service connection string (default $IOTHUB_CONNECTION_STRING)")
	pf.StringVar(&g.address, "address", "", "host:port to send requests to, if not the connection string's HostName on 443")
	pf.StringVar(&g.caFile, "ca-file", "", "PEM file of the CA to trust for the hub's certificate")
	pf.StringVar(&g.hubsimState, "hubsim-state", "", "hubsim state directory: take address, CA and connection string from its endpoints.json")
	pf.StringVarP(&g.output, "output", "o", "table", "output format: table or json")
	pf.DurationVar(&g.timeout, "timeout", 30*time.Second, "deadline for the whole command")
	root.AddCommand(deviceCommand(g))
	root.AddCommand(twinCommand(g))
	root.AddCommand(methodCommand(g))
	root.AddCommand(pkiCommand(g))
	return root
}

func (g *globals) client() (*service.Client, error) {
	if g.output != "table" && g.output != "json" {
		return nil, fmt.Errorf("--output must be table or json, not %q", g.output)
	}
	if g.hubsimState != "" {
		c, e, err := service.ForHubsim(g.hubsimState)
		if err != nil {
			return nil, fmt.Errorf("hubsim state %s: %w", g.hubsimState, err)
		}
		g.mqttAddress = e.MQTTAddress
		return c, nil
	}
	cs := g.connString
	if cs == "" {
		cs = os.Getenv("IOTHUB_CONNECTION_STRING")
	}
	if cs == "" {
		return nil, errors.New("no hub given: use --connection-string, IOTHUB_CONNECTION_STRING or --hubsim-state")
	}
	return service.New(service.Config{ConnectionString: cs, Address: g.address, CAFile: g.caFile})
}

// with runs f with a client and a context bounded by --timeout.
func (g *globals) with(cmd *cobra.Command, f func(ctx context.Context, c *service.Client) error) error {
	c, err := g.client()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
	defer cancel()
	return f(ctx, c)
}

func (g *globals) printJSON(v any) error {
	enc := json.NewEncoder(g.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func deviceCommand(g *globals) *cobra.Command {
	dev := &cobra.Command{Use: "device", Short: "Manage device identities"}

	var ifMissing, disabled bool
	var primary, secondary, thumb1, thumb2 string
	create := &cobra.Command{
		Use:   "create DEVICE_ID",
		Short: "Create a device (symmetric keys generated unless given, or X.509 thumbprints)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				d := service.Device{DeviceID: args[0], Status: "enabled"}
				if disabled {
					d.Status = "disabled"
				}
				switch {
				case thumb1 != "":
					d.Authentication = &service.Authentication{Type: "selfSigned",
						X509Thumbprint: &service.X509Thumbprint{PrimaryThumbprint: thumb1, SecondaryThumbprint: thumb2}}
				default:
					d.Authentication = &service.Authentication{Type: "sas",
						SymmetricKey: &service.SymmetricKey{PrimaryKey: primary, SecondaryKey: secondary}}
				}
				out, err := c.CreateDevice(ctx, d)
				if ifMissing && errors.Is(err, wire.ErrDeviceAlreadyExists) {
					out, err = c.GetDevice(ctx, args[0])
				}
				if err != nil {
					return err
				}
				return g.printDevices([]service.Device{out})
			})
		},
	}
	create.Flags().BoolVar(&ifMissing, "if-missing", false, "succeed, showing the existing device, if it already exists")
	create.Flags().BoolVar(&disabled, "disabled", false, "create the device disabled")
	create.Flags().StringVar(&primary, "primary-key", "", "primary symmetric key (base64); generated when empty")
	create.Flags().StringVar(&secondary, "secondary-key", "", "secondary symmetric key (base64); generated when empty")
	create.Flags().StringVar(&thumb1, "primary-thumbprint", "", "X.509 self-signed: primary certificate thumbprint (SHA-1 or SHA-256 hex)")
	create.Flags().StringVar(&thumb2, "secondary-thumbprint", "", "X.509 self-signed: secondary certificate thumbprint")

	get := &cobra.Command{
		Use:   "get DEVICE_ID",
		Short: "Show a device",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				d, err := c.GetDevice(ctx, args[0])
				if err != nil {
					return err
				}
				return g.printDevices([]service.Device{d})
			})
		},
	}

	var top int
	list := &cobra.Command{
		Use:   "list",
		Short: "List devices",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				ds, err := c.ListDevices(ctx, top)
				if err != nil {
					return err
				}
				return g.printDevices(ds)
			})
		},
	}
	list.Flags().IntVar(&top, "top", 0, "at most this many devices (0: the service's default)")

	var etag string
	del := &cobra.Command{
		Use:   "delete DEVICE_ID",
		Short: "Delete a device",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				return c.DeleteDevice(ctx, args[0], etag)
			})
		},
	}
	del.Flags().StringVar(&etag, "etag", "", "delete only if the device's etag matches (default: unconditional)")

	var secondaryKey bool
	cs := &cobra.Command{
		Use:   "connection-string DEVICE_ID",
		Short: "Print a device connection string (with GatewayHostName for hubsim's MQTT port)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				d, err := c.GetDevice(ctx, args[0])
				if err != nil {
					return err
				}
				out := connstr.ConnectionString{HostName: c.HostName(), DeviceID: d.DeviceID, GatewayHostName: g.mqttAddress}
				switch {
				case d.Authentication != nil && d.Authentication.SymmetricKey != nil && d.Authentication.Type == "sas":
					out.SharedAccessKey = d.Authentication.SymmetricKey.PrimaryKey
					if secondaryKey {
						out.SharedAccessKey = d.Authentication.SymmetricKey.SecondaryKey
					}
				default:
					out.X509 = true
				}
				_, err = fmt.Fprintln(g.stdout, out.String())
				return err
			})
		},
	}
	cs.Flags().BoolVar(&secondaryKey, "secondary", false, "use the secondary key")

	dev.AddCommand(create, get, list, del, cs)
	return dev
}

func (g *globals) printDevices(ds []service.Device) error {
	if g.output == "json" {
		if len(ds) == 1 {
			return g.printJSON(ds[0])
		}
		return g.printJSON(ds)
	}
	tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tSTATUS\tCONNECTION\tAUTH\tLAST ACTIVITY")
	for _, d := range ds {
		auth := ""
		if d.Authentication != nil {
			auth = d.Authentication.Type
		}
		last := "-"
		if d.LastActivityTime != nil && !d.LastActivityTime.IsZero() && d.LastActivityTime.Year() > 1 {
			last = d.LastActivityTime.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", d.DeviceID, d.Status, strings.ToLower(d.ConnectionState), auth, last)
	}
	return tw.Flush()
}
