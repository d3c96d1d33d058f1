// Command agent is the iothubby device agent: it connects one device to Azure IoT Hub (or
// hubsim) over MQTT/TLS, sends periodic telemetry and logs what the cloud sends it.
//
//	agent run --config configs/agent.yaml [flags]
//	agent tpm show --config configs/agent.yaml   (what a TPM enrollment needs)
//
// Identity comes from a device connection string — preferably from a file
// (--connection-string-file) or the IOTHUBBY_CONNECTION_STRING environment variable, since
// command-line arguments are visible to every local user in ps — or from --host, --device-id and
// a key file or X.509 certificate. Flags override the config file.
//
// SIGHUP reloads the configuration (cmd/agent/systemd.go; systemd's notify protocol too).
// SIGINT and SIGTERM drain queued telemetry (within shutdownTimeout), disconnect cleanly and exit
// 0. Exit status: 1 runtime failure, 2 configuration or usage error, 3 the hub refused the
// credentials (not authorized).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/internal/logging"
	"github.com/iothubby/iothubby/internal/rlimit"
	"github.com/iothubby/iothubby/internal/version"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hub"
)

// EnvConnectionString names the environment variable that may hold the connection string.
const EnvConnectionString = "IOTHUBBY_CONNECTION_STRING"

// Exit codes.
const (
	exitFailure       = 1
	exitConfig        = 2
	exitNotAuthorized = 3
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(exitCode(err, os.Stderr))
}

// usageError marks command-line mistakes.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// exitCode prints err (if any) and maps it to the process exit status.
func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	fmt.Fprintln(stderr, "agent:", err)
	var ue usageError
	switch {
	case errors.Is(err, hub.ErrNotAuthorized), errors.Is(err, hub.ErrConnectionRefused):
		fmt.Fprintln(stderr, "agent: the hub refused the device's credentials; check the key or certificate and that the device exists and is enabled")
		return exitNotAuthorized
	case errors.Is(err, agent.ErrConfig), errors.Is(err, hub.ErrConfig), errors.As(err, &ue):
		return exitConfig
	}
	return exitFailure
}

// run is the whole program; main only adds signals and the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	root := newRootCmd(stdout, stderr)
	root.SetArgs(args)
	return root.ExecuteContext(ctx)
}

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "agent",
		Short:         "iothubby device agent for Azure IoT Hub",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(newRunCmd(stderr), newTPMCmd(stdout, stderr), newCheckCmd(stdout, stderr))
	root.AddCommand(newFleetCmd(stderr))
	version.Attach(root)
	return root
}

func newTPMCmd(stdout, stderr io.Writer) *cobra.Command {
	t := &cobra.Command{Use: "tpm", Short: "Inspect the device's TPM"}
	var f runFlags
	show := &cobra.Command{
		Use:   "show",
		Short: "Print the TPM's registration ID, endorsement key and storage root key as JSON",
		Long: `Print what an individual TPM enrollment needs: the registration ID the agent will use and
the endorsement key (base64 TPM2B_PUBLIC, as DPS takes it). Keys missing from the TPM are
created from the TCG default templates and persisted, as the agent would at first start.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, log, err := configAndLogger(cmd, &f, stderr)
			if err != nil {
				return err
			}
			defer func() { _ = log.Sync() }()
			id, err := agent.ReadTPMIdentity(cfg, log)
			if err != nil {
				return err
			}
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(id)
		},
	}
	bindRunFlags(show, &f)
	t.AddCommand(show)
	return t
}

// runFlags are the command-line overrides of the config file.
type runFlags struct {
	stateDir              string
	reprovision           bool
	config                string
	connectionString      string
	connectionStringFile  string
	host, address         string
	deviceID, moduleID    string
	modelID               string
	key, keyFile          string
	certFile, certKeyFile string
	allowInsecureKeyFile  bool
	caFile                string
	telemetryInterval     time.Duration
	shutdownTimeout       time.Duration
	logLevel, logFormat   string
}

func newRunCmd(stderr io.Writer) *cobra.Command {
	var f runFlags
	var of obsFlags
	var tf testHookFlags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Connect the device and run until SIGINT/SIGTERM",
		Long: `Connect the device and run until SIGINT or SIGTERM.

Identity: a device connection string from --connection-string-file (preferred),
$` + EnvConnectionString + ` or --connection-string (visible in ps; avoid), or
--host + --device-id + --key-file (or --cert-file/--cert-key-file for X.509).
Flags override the config file; the environment variable overrides the file's identity.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			hooks, stopHooks, err := tf.setup()
			if err != nil {
				return err
			}
			defer stopHooks()
			hup, stopHup := notifySignals()
			defer stopHup()
			cfg, err := loadConfig(cmd, &f)
			if err != nil {
				return err
			}
			log, level, err := serveLogger(cfg.Log, stderr)
			if err != nil {
				return err
			}
			defer func() { _ = log.Sync() }()
			_, _ = rlimit.RaiseNoFile(log) // logs a failure itself; one device needs few descriptors
			obs := newObservability(&of, &cfg)
			if err := obs.serve(&of, log); err != nil {
				return err
			}
			defer func() { _ = obs.close() }()
			load := func() (agent.Config, error) {
				c, err := loadConfig(cmd, &f)
				obs.attach(&c)
				return c, err
			}
			return serve(cmd.Context(), cfg, load, hup, log, level, hooks)
		},
	}
	bindRunFlags(cmd, &f)
	bindObsFlags(cmd, &of)
	bindTestHookFlags(cmd, &tf)
	return cmd
}

// bindRunFlags declares the run command's flags.
func bindRunFlags(cmd *cobra.Command, f *runFlags) {
	fl := cmd.Flags()
	fl.StringVarP(&f.config, "config", "c", "", "YAML config file (see configs/agent.yaml)")
	fl.StringVar(&f.connectionString, "connection-string", "", "device connection string (visible in ps: prefer --connection-string-file or $"+EnvConnectionString+")")
	fl.StringVar(&f.connectionStringFile, "connection-string-file", "", "file holding the device connection string (mode 0600)")
	fl.StringVar(&f.host, "host", "", "hub host name, e.g. myhub.azure-devices.net")
	fl.StringVar(&f.address, "address", "", "dial address host:port (default host:8883)")
	fl.StringVar(&f.deviceID, "device-id", "", "device id")
	fl.StringVar(&f.moduleID, "module-id", "", "module id (module identity)")
	fl.StringVar(&f.modelID, "model-id", "", "IoT Plug and Play model id")
	fl.StringVar(&f.key, "key", "", "base64 symmetric key (visible in ps: prefer --key-file)")
	fl.StringVar(&f.keyFile, "key-file", "", "file holding the base64 symmetric key (mode 0600)")
	fl.StringVar(&f.certFile, "cert-file", "", "PEM client certificate chain for X.509 authentication")
	fl.StringVar(&f.certKeyFile, "cert-key-file", "", "PEM private key of --cert-file (mode 0600)")
	fl.BoolVar(&f.allowInsecureKeyFile, "allow-insecure-key-file", false, "accept key files readable by group or others")
	fl.StringVar(&f.caFile, "ca-file", "", "PEM CA bundle trusted for the hub's certificate (default: system roots)")
	fl.DurationVar(&f.telemetryInterval, "telemetry-interval", 0, "interval between telemetry messages (0s disables)")
	fl.DurationVar(&f.shutdownTimeout, "shutdown-timeout", 0, "bound on draining queued telemetry at shutdown")
	fl.StringVar(&f.logLevel, "log-level", "", "log level: debug, info, warn, error (default info)")
	fl.StringVar(&f.logFormat, "log-format", "", "log format: console or json (default console)")
	fl.StringVar(&f.stateDir, "state-dir", "", "directory for state that survives a restart (intended reported properties, last desired version, DPS result)")
	fl.BoolVar(&f.reprovision, "reprovision", false, "with DPS: ignore the cached provisioning result and register again")
}

// configAndLogger loads the configuration of a command and the logger it asks for.
func configAndLogger(cmd *cobra.Command, f *runFlags, stderr io.Writer) (agent.Config, *zap.Logger, error) {
	cfg, err := loadConfig(cmd, f)
	if err != nil {
		return cfg, nil, err
	}
	log, err := newLogger(cfg.Log, stderr)
	return cfg, log, err
}

// loadConfig reads the config file (if any) and applies the environment and flags.
func loadConfig(cmd *cobra.Command, f *runFlags) (agent.Config, error) {
	cfg := agent.Default()
	if f.config != "" {
		var err error
		if cfg, err = agent.LoadConfig(f.config); err != nil {
			return cfg, err
		}
	}
	changed := cmd.Flags().Changed
	// Identity: a connection string given by flag or environment replaces the file's identity;
	// host/device/key flags replace a connection string from the file.
	cs, csSet := f.connectionString, changed("connection-string")
	if !csSet && !changed("connection-string-file") {
		if v, ok := os.LookupEnv(EnvConnectionString); ok && v != "" {
			cs, csSet = v, true
		}
	}
	if csSet || changed("connection-string-file") {
		cfg.ConnectionString, cfg.ConnectionStringFile = "", ""
		cfg.Host, cfg.DeviceID, cfg.ModuleID = "", "", ""
		cfg.Auth.SymmetricKey, cfg.Auth.SymmetricKeyFile = "", ""
		if csSet {
			cfg.ConnectionString = cs
		}
		if changed("connection-string-file") {
			cfg.ConnectionStringFile = f.connectionStringFile
		}
	} else if changed("host") || changed("device-id") || changed("key") || changed("key-file") {
		cfg.ConnectionString, cfg.ConnectionStringFile = "", ""
	}
	set := func(name string, dst *string, v string) {
		if changed(name) {
			*dst = v
		}
	}
	set("host", &cfg.Host, f.host)
	set("address", &cfg.Address, f.address)
	set("device-id", &cfg.DeviceID, f.deviceID)
	set("module-id", &cfg.ModuleID, f.moduleID)
	set("model-id", &cfg.ModelID, f.modelID)
	if changed("key") || changed("key-file") {
		cfg.Auth.SymmetricKey, cfg.Auth.SymmetricKeyFile = "", ""
	}
	set("key", &cfg.Auth.SymmetricKey, f.key)
	set("key-file", &cfg.Auth.SymmetricKeyFile, f.keyFile)
	set("cert-file", &cfg.Auth.CertFile, f.certFile)
	set("cert-key-file", &cfg.Auth.KeyFile, f.certKeyFile)
	if changed("allow-insecure-key-file") {
		cfg.Auth.AllowInsecureKeyFile = f.allowInsecureKeyFile
	}
	set("ca-file", &cfg.TLS.CAFile, f.caFile)
	if changed("telemetry-interval") {
		cfg.Telemetry.Interval = f.telemetryInterval
	}
	if changed("shutdown-timeout") {
		cfg.ShutdownTimeout = f.shutdownTimeout
	}
	set("log-level", &cfg.Log.Level, f.logLevel)
	set("log-format", &cfg.Log.Format, f.logFormat)
	set("state-dir", &cfg.StateDir, f.stateDir)
	if changed("reprovision") {
		cfg.DPS.Reprovision = f.reprovision
	}
	return cfg, nil
}

// newLogger builds the agent's zap logger on w.
func newLogger(c agent.LogConfig, w io.Writer) (*zap.Logger, error) {
	log, err := logging.New(w, c.Level, c.Format)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", agent.ErrConfig, err)
	}
	return log, nil
}
