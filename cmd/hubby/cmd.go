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

	"github.com/iothubby/iothubby/internal/version"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

type globals struct {
	connString    string
	dpsConnString string
	address       string
	caFile        string
	hubsimState   string
	configPath    string
	output        string
	progress      string
	timeout       time.Duration
	stdout        io.Writer
	stderr        io.Writer

	// mqttAddress is hubsim's device endpoint, known only with --hubsim-state.
	mqttAddress string
	// idScope is hubsim's DPS ID scope, known only with --hubsim-state.
	idScope string
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	g := &globals{stdout: stdout, stderr: stderr}
	root := &cobra.Command{
		Use:   "hubby",
		Short: "Fleet CLI for Azure IoT Hub and hubsim",
		Long: `hubby manages a fleet on Azure IoT Hub or hubsim: device identities, twins, direct methods,
queries, jobs, DPS enrollments, bulk operations and canary rollouts.

The hub is taken from, in this order: --hubsim-state or --connection-string; the
IOTHUB_CONNECTION_STRING environment variable; the config file (--config, default
~/.config/hubby/config.yaml: keys connectionString, dpsConnectionString, address, caFile,
hubsimState). DPS commands use --dps-connection-string, IOTHUB_DPS_CONNECTION_STRING or
dpsConnectionString (or hubsim's, with --hubsim-state).

Exit status: 0 every device succeeded; 1 the command failed; 2 usage error; 3 some devices
failed (bulk operations, jobs, rollouts); 130 interrupted.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if g.output != "table" && g.output != "json" {
				return usageError{fmt.Errorf("--output must be table or json, not %q", g.output)}
			}
			switch g.progress {
			case "auto", "bar", "plain", "none":
			default:
				return usageError{fmt.Errorf("--progress must be auto, bar, plain or none, not %q", g.progress)}
			}
			return nil
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	pf := root.PersistentFlags()
	pf.StringVar(&g.connString, "connection-string", "", "service connection string (default $IOTHUB_CONNECTION_STRING, then the config file)")
	pf.StringVar(&g.dpsConnString, "dps-connection-string", "", "DPS service connection string (default $IOTHUB_DPS_CONNECTION_STRING, then the config file)")
	pf.StringVar(&g.address, "address", "", "host:port to send requests to, if not the connection string's HostName on 443")
	pf.StringVar(&g.caFile, "ca-file", "", "PEM file of the CA to trust for the hub's certificate")
	pf.StringVar(&g.hubsimState, "hubsim-state", "", "hubsim state directory: take address, CA and connection strings from its endpoints.json")
	pf.StringVar(&g.configPath, "config", "", "config file (default ~/.config/hubby/config.yaml, if it exists)")
	pf.StringVarP(&g.output, "output", "o", "table", "output format: table or json")
	pf.StringVar(&g.progress, "progress", "auto", "progress of commands over many devices, on stderr: auto (a bar on a terminal, else plain), bar, plain (a line every tenth) or none")
	pf.DurationVar(&g.timeout, "timeout", 30*time.Second, "deadline for each request (and for the whole of a single-device command)")

	// One command per line, so that branches adding commands merge cleanly.
	version.Attach(root)
	root.AddCommand(deviceCommand(g))
	root.AddCommand(twinCommand(g))
	root.AddCommand(methodCommand(g))
	root.AddCommand(invokeCommand(g))
	root.AddCommand(queryCommand(g))
	root.AddCommand(jobCommand(g))
	root.AddCommand(bulkCommand(g))
	root.AddCommand(rolloutCommand(g))
	root.AddCommand(dpsCommand(g))
	root.AddCommand(pkiCommand(g))
	root.AddCommand(firmwareCommand(g))
	root.AddCommand(monitorEvents(g))
	root.AddCommand(hubsimCommand(g))
	groupsRejectUnknown(root)
	return root
}

// groupsRejectUnknown makes every command that only groups others fail with a usage error on an
// unknown subcommand (cobra would print help and succeed).
func groupsRejectUnknown(c *cobra.Command) {
	for _, sub := range c.Commands() {
		groupsRejectUnknown(sub)
	}
	if c.HasParent() && c.HasSubCommands() && c.Run == nil && c.RunE == nil {
		c.RunE = func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError{fmt.Errorf("unknown command %q for %q", args[0], cmd.CommandPath())}
			}
			return cmd.Help()
		}
	}
}

// resolve fills the connection settings from the environment and the config file where the
// flags left them empty (flag > environment > file).
func (g *globals) resolve() error {
	cfg, err := loadConfig(g.configPath)
	if err != nil {
		return err
	}
	if g.connString != "" && g.hubsimState != "" {
		return usageError{errors.New("give --connection-string or --hubsim-state, not both")}
	}
	if g.connString == "" && g.hubsimState == "" {
		switch env := os.Getenv("IOTHUB_CONNECTION_STRING"); {
		case env != "":
			g.connString = env
		case cfg.ConnectionString != "":
			g.connString = cfg.ConnectionString
		case cfg.HubsimState != "":
			g.hubsimState = cfg.HubsimState
		}
	}
	if g.dpsConnString == "" {
		g.dpsConnString = os.Getenv("IOTHUB_DPS_CONNECTION_STRING")
		if g.dpsConnString == "" {
			g.dpsConnString = cfg.DPSConnectionString
		}
	}
	if g.address == "" {
		g.address = cfg.Address
	}
	if g.caFile == "" {
		g.caFile = cfg.CAFile
	}
	return nil
}

func (g *globals) client() (*service.Client, error) {
	if err := g.resolve(); err != nil {
		return nil, err
	}
	if g.hubsimState != "" {
		c, e, err := service.ForHubsim(g.hubsimState)
		if err != nil {
			return nil, fmt.Errorf("hubsim state %s: %w", g.hubsimState, err)
		}
		g.mqttAddress, g.idScope = e.MQTTAddress, e.IDScope
		return c, nil
	}
	if g.connString == "" {
		return nil, errors.New("no hub given: use --connection-string, IOTHUB_CONNECTION_STRING, --hubsim-state or a config file (see hubby --help)")
	}
	c, err := service.New(service.Config{ConnectionString: g.connString, Address: g.address, CAFile: g.caFile})
	if err != nil {
		return nil, fmt.Errorf("connection string: %w", err)
	}
	return c, nil
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

// withLong runs f with a client and the command's context (no overall deadline): for commands
// that run over many devices or wait; each request is bounded by reqCtx.
func (g *globals) withLong(cmd *cobra.Command, f func(ctx context.Context, c *service.Client) error) error {
	c, err := g.client()
	if err != nil {
		return err
	}
	defer c.Close()
	return f(cmd.Context(), c)
}

// reqCtx bounds one request by --timeout.
func (g *globals) reqCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, g.timeout)
}

func (g *globals) printJSON(v any) error {
	enc := json.NewEncoder(g.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table writes rows under a header, aligned.
func (g *globals) table(header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

// explain adds what to do to errors whose service text alone does not say it.
func explain(err error) error {
	var se wire.ServiceError
	if errors.As(err, &se) && se.Status == 401 {
		return fmt.Errorf("not authorized: %s (this command needs a connection string whose policy has the right: iothubowner has all; registryRead/registryReadWrite for identities, service for twins, methods, queries and jobs)", se.Text)
	}
	if errors.As(err, &se) && se.Code == "" {
		return fmt.Errorf("%d: %s", se.Status, se.Text)
	}
	return err
}

// Argument validators that report a usage error (exit 2).
func exactArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if err := cobra.ExactArgs(n)(cmd, args); err != nil {
			return usageError{fmt.Errorf("%s: %w (usage: %s)", cmd.CommandPath(), err, cmd.UseLine())}
		}
		return nil
	}
}

func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageError{fmt.Errorf("%s takes no arguments, got %q", cmd.CommandPath(), args)}
	}
	return nil
}
