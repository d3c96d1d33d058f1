package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/hubsim/endpoints"
	"github.com/iothubby/iothubby/pkg/service/eventhubs"
)

// monitorEvents is `hubby monitor-events`, as `az iot hub monitor-events`: it reads the hub's
// built-in Event Hubs-compatible endpoint and prints each event as one JSON line.
func monitorEvents(g *globals) *cobra.Command {
	var (
		ehConnString string
		deviceIDs    []string
		group        string
		enqueued     string
		fromStart    bool
		properties   []string
		count        int
		duration     time.Duration
	)
	cmd := &cobra.Command{
		Use:   "monitor-events",
		Short: "Print device-to-cloud events as they arrive at the built-in endpoint (JSON lines)",
		Long: `monitor-events reads the hub's built-in Event Hubs-compatible endpoint over AMQP, every partition
at once, and prints one JSON line per event:

  {"event":{"origin":"<device>","module":"","partition":"0","sequenceNumber":7,"enqueuedTime":"...","payload":...}}

The payload is the body as JSON when it is JSON, otherwise a string. --properties adds
"annotations" (anno), "properties":{"system"} (sys), "properties":{"application"} (app), or all.

With --hubsim-state the endpoint comes from hubsim's endpoints.json; for a real hub pass its
Event Hub-compatible connection string (portal: Built-in endpoints) with
--event-hub-connection-string or $IOTHUB_EVENTHUB_CONNECTION_STRING. By default only events
enqueued from now on are shown (as az does); --from-beginning shows everything retained and
--enqueued-time starts after a time (RFC 3339 or milliseconds since the epoch).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if fromStart && enqueued != "" {
				return usageError{errors.New("give --from-beginning or --enqueued-time, not both")}
			}
			pos := eventhubs.Latest()
			switch {
			case fromStart:
				pos = eventhubs.Earliest()
			case enqueued != "":
				t, err := parseEnqueued(enqueued)
				if err != nil {
					return usageError{err}
				}
				pos = eventhubs.FromEnqueuedTime(t)
			}
			for _, p := range properties {
				switch p {
				case "sys", "app", "anno", "all":
				default:
					return usageError{fmt.Errorf("--properties takes sys, app, anno or all, not %q", p)}
				}
			}
			cfg, err := g.eventHubsConfig(ehConnString)
			if err != nil {
				return err
			}
			cfg.ConsumerGroup = group
			ctx := cmd.Context()
			if duration > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, duration)
				defer cancel()
			}
			return g.monitor(ctx, cfg, pos, deviceIDs, properties, count)
		},
	}
	f := cmd.Flags()
	f.StringVar(&ehConnString, "event-hub-connection-string", "", "the hub's Event Hub-compatible connection string (default $IOTHUB_EVENTHUB_CONNECTION_STRING, or hubsim's with --hubsim-state)")
	f.StringSliceVarP(&deviceIDs, "device-id", "d", nil, "only events from these devices (repeatable)")
	f.StringVarP(&group, "consumer-group", "c", eventhubs.DefaultConsumerGroup, "consumer group to read as")
	f.StringVarP(&enqueued, "enqueued-time", "e", "", "start after this enqueued time (RFC 3339, or ms since the epoch)")
	f.BoolVar(&fromStart, "from-beginning", false, "start at the oldest retained event")
	f.StringSliceVarP(&properties, "properties", "p", nil, "also print: sys, app, anno, all")
	f.IntVar(&count, "count", 0, "stop after this many events (0: until interrupted)")
	f.DurationVar(&duration, "duration", 0, "stop after this long (0: until interrupted)")
	return cmd
}

func parseEnqueued(s string) (time.Time, error) {
	if ms, err := strconv.ParseInt(s, 10, 64); err == nil {
		return time.UnixMilli(ms), nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return t, fmt.Errorf("--enqueued-time %q: not RFC 3339 or milliseconds", s)
	}
	return t, nil
}

// eventHubsConfig finds the endpoint: flag, environment, hubsim's endpoints.json.
func (g *globals) eventHubsConfig(flagCS string) (eventhubs.Config, error) {
	if err := g.resolve(); err != nil {
		return eventhubs.Config{}, err
	}
	cs := flagCS
	if cs == "" {
		cs = os.Getenv("IOTHUB_EVENTHUB_CONNECTION_STRING")
	}
	caFile := g.caFile
	if cs == "" && g.hubsimState != "" {
		e, err := endpoints.Read(g.hubsimState)
		if err != nil {
			return eventhubs.Config{}, fmt.Errorf("hubsim state %s: %w", g.hubsimState, err)
		}
		if e.EventHubsCompatibleConnectionString == "" {
			return eventhubs.Config{}, errors.New("this hubsim serves no Event Hubs-compatible endpoint (no AMQP listener)")
		}
		cs, caFile = e.EventHubsCompatibleConnectionString, e.CAFile
	}
	if cs == "" {
		return eventhubs.Config{}, usageError{errors.New("no Event Hub-compatible endpoint: use --event-hub-connection-string, IOTHUB_EVENTHUB_CONNECTION_STRING or --hubsim-state")}
	}
	cfg := eventhubs.Config{ConnectionString: cs}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return cfg, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return cfg, fmt.Errorf("%s: no PEM certificates", caFile)
		}
		cfg.TLSConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return cfg, nil
}

// monitor reads every partition until ctx ends or count events were printed.
func (g *globals) monitor(ctx context.Context, cfg eventhubs.Config, pos eventhubs.Position, devices, props []string, count int) error {
	dctx, cancel := context.WithTimeout(ctx, g.timeout)
	c, err := eventhubs.Dial(dctx, cfg)
	if err != nil {
		cancel()
		return err
	}
	defer c.Close()
	hp, err := c.Properties(dctx)
	cancel()
	if err != nil {
		return err
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	events := make(chan eventhubs.Event)
	errc := make(chan error, len(hp.PartitionIDs))
	var wg sync.WaitGroup
	for _, id := range hp.PartitionIDs {
		actx, acancel := context.WithTimeout(ctx, g.timeout)
		r, err := c.Receive(actx, id, pos, nil)
		acancel()
		if err != nil {
			stop()
			wg.Wait()
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				ev, err := r.Next(ctx)
				if err != nil {
					if ctx.Err() == nil {
						errc <- fmt.Errorf("partition %s: %w", id, err)
					}
					return
				}
				select {
				case events <- ev:
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	defer wg.Wait()
	defer stop()
	printed := 0
	for {
		select {
		case <-ctx.Done():
			return nil // interrupted or --duration: a normal end
		case err := <-errc:
			return err
		case ev := <-events:
			if len(devices) > 0 && !slices.Contains(devices, ev.DeviceID) {
				continue
			}
			if err := g.printEvent(ev, props); err != nil {
				return err
			}
			printed++
			if count > 0 && printed >= count {
				return nil
			}
		}
	}
}

func (g *globals) printEvent(ev eventhubs.Event, props []string) error {
	var payload any = string(ev.Body)
	if json.Valid(ev.Body) && len(ev.Body) > 0 {
		payload = json.RawMessage(ev.Body)
	}
	out := map[string]any{
		"origin": ev.DeviceID, "module": ev.ModuleID, "partition": ev.Partition,
		"sequenceNumber": ev.SequenceNumber, "enqueuedTime": ev.EnqueuedTime.UTC().Format(time.RFC3339Nano),
		"payload": payload,
	}
	if c, ok := ev.Annotations["dt-subject"].(string); ok {
		out["component"] = c
	}
	want := func(p string) bool { return slices.Contains(props, p) || slices.Contains(props, "all") }
	if want("anno") {
		out["annotations"] = ev.Annotations
	}
	pp := map[string]any{}
	if want("sys") {
		pp["system"] = ev.SystemProperties
	}
	if want("app") {
		pp["application"] = ev.Properties
	}
	if len(pp) > 0 {
		out["properties"] = pp
	}
	b, err := json.Marshal(map[string]any{"event": out})
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(g.stdout, "%s\n", strings.TrimSpace(string(b)))
	return err
}
