// Command hubsim runs a local Azure IoT Hub (see docs/hubsim.md):
//
//	hubsim serve --state DIR [--hostname localhost] [--mqtt-addr 127.0.0.1:8883]
//	             [--https-addr 127.0.0.1:8443] [--token-grace 0s] [--log-level info]
//	             [--log-format console|json] [--image-max-total 1073741824]
//	             [--image-max-upload 268435456] [--tier F1|S1|S2|S3|B1|B2|B3 --units N]
//
// serve writes DIR/endpoints.json once both listeners accept connections and removes it on a
// clean stop. SIGINT and SIGTERM stop it cleanly (exit status 0).
package main

import (
	"context"
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
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "hubsim:", err)
		os.Exit(1)
	}
}

// run executes the command line args (without the program name). It returns when ctx is done
// (serve) or the command finishes.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	root := &cobra.Command{
		Use:           "hubsim",
		Short:         "A local Azure IoT Hub: device MQTT/TLS and the service REST API",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(serveCmd(stderr))
	version.Attach(root)
	return root.ExecuteContext(ctx)
}

func serveCmd(logOut io.Writer) *cobra.Command {
	var cfg hubsim.Config
	var level, format string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve until SIGINT or SIGTERM",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfg.MaxConcurrentJobs < 1 || cfg.JobParallelism < 1 {
				return fmt.Errorf("--max-concurrent-jobs and --job-parallelism must be at least 1 (got %d and %d)", cfg.MaxConcurrentJobs, cfg.JobParallelism)
			}
			if err := checkTier(cfg.Tier, cfg.Units); err != nil {
				return err
			}
			log, err := newLogger(logOut, level, format)
			if err != nil {
				return err
			}
			defer func() { _ = log.Sync() }()
			if soft, err := rlimit.RaiseNoFile(log); err == nil {
				log.Info("open-file limit", zap.Uint64("soft", soft), zap.Uint64("device_connections_at_most", soft-min(soft, rlimit.Reserve)))
			}
			if cfg.DPSRetryAfter == 0 {
				cfg.DPSRetryAfter = -1 // Config's zero means the default
			}
			cfg.AMQPFallback = !cmd.Flags().Changed("amqp-addr")
			srv, err := hubsim.Start(cmd.Context(), cfg, log)
			if err != nil {
				return err
			}
			<-cmd.Context().Done()
			log.Info("signal received, stopping")
			return srv.Close()
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.StateDir, "state", "", "state directory (CA, server certificate, registry, endpoints.json)")
	f.StringVar(&cfg.HostName, "hostname", "localhost", "hub host name, without a port")
	f.StringVar(&cfg.MQTTAddr, "mqtt-addr", "127.0.0.1:8883", "device MQTT/TLS listen address (port 0: any free port)")
	f.StringVar(&cfg.HTTPSAddr, "https-addr", "127.0.0.1:8443", "service HTTPS listen address (port 0: any free port)")
	f.StringVar(&cfg.AMQPAddr, "amqp-addr", "127.0.0.1:5671", "service AMQP/TLS listen address (port 0: any free port; empty: none; the default moves to a free port when 5671 is taken)")
	f.DurationVar(&cfg.TokenGrace, "token-grace", 0, "how long past a device SAS token's expiry its connection stays open")
	f.Float64Var(&cfg.TwinRateLimit, "twin-rate-limit", 0, "device twin GETs and PATCHes per second across the hub; over it, 429 (0: unlimited)")
	f.IntVar(&cfg.MaxConcurrentJobs, "max-concurrent-jobs", 1, "jobs v2 that run at once; the others wait, queued (1: IoT Hub S1 and Free, 5: S2, 10: S3)")
	f.IntVar(&cfg.JobParallelism, "job-parallelism", 16, "devices one job works on at once")
	f.StringVar(&cfg.IDScope, "id-scope", "0ne00000001", "DPS ID scope")
	f.StringSliceVar(&cfg.HubHostNames, "hub-hostnames", nil, "further linked hub host names DPS may assign devices to (comma-separated)")
	f.IntVar(&cfg.DPSRetryAfter, "dps-retry-after", 1, "retry-after seconds of DPS 202 replies (0: poll at once)")
	f.Float64Var(&cfg.DPSRegistrationRate, "dps-rate", 0, "DPS register requests per second before 429 (0: no limit)")
	f.IntVar(&cfg.DPSRegistrationBurst, "dps-burst", 1, "DPS register requests allowed in a burst under --dps-rate")
	f.Int64Var(&cfg.TelemetryBytes, "telemetry-max-bytes", 256<<20, "memory the recorded telemetry (/hubsim/devices/{id}/telemetry) of all devices may hold together; the oldest messages go first")
	f.Int64Var(&cfg.ImagesMaxTotal, "image-max-total", 1<<30, "bytes all firmware images in the store (/hubsim/images) may hold together")
	f.Int64Var(&cfg.ImagesMaxUpload, "image-max-upload", 256<<20, "bytes one uploaded firmware image may hold")
	f.IntVar(&cfg.Events.Partitions, "partitions", 4, "partitions of the Event Hubs-compatible endpoint (1-32; fixed once the state directory has events)")
	f.DurationVar(&cfg.Events.Retention, "event-retention", 24*time.Hour, "how long the Event Hubs-compatible endpoint keeps events")
	f.IntVar(&cfg.Events.MaxEvents, "event-max", 100000, "events kept per partition of the Event Hubs-compatible endpoint")
	f.StringSliceVar(&cfg.Events.ConsumerGroups, "consumer-groups", nil, "consumer groups to create besides $Default (comma-separated)")
	f.StringVar(&cfg.Tier, "tier", "", "throttle like an IoT Hub of this tier: F1, S1, S2, S3 (B1-B3 as S1-S3); connects get CONNACK 3, service and twin requests 429, telemetry over the rate closes the connection (empty: no throttling)")
	f.IntVar(&cfg.Units, "units", 0, "IoT Hub units of --tier (default 1)")
	f.StringVar(&level, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&format, "log-format", "console", "log format: console or json")
	_ = cmd.MarkFlagRequired("state")
	return cmd
}

// checkTier refuses a tier or unit count hubsim cannot throttle as, before anything starts.
func checkTier(tier string, units int) error {
	if tier == "" {
		if units != 0 {
			return fmt.Errorf("--units %d needs --tier", units)
		}
		return nil
	}
	if units == 0 {
		units = 1
	}
	if _, err := throttle.ForTier(tier, units); err != nil {
		return fmt.Errorf("--tier/--units: %w", err)
	}
	return nil
}

func newLogger(w io.Writer, level, format string) (*zap.Logger, error) {
	log, err := logging.New(w, level, format)
	if err != nil {
		return nil, fmt.Errorf("--log-level/--log-format: %w", err)
	}
	return log.Named("hubsim"), nil
}
