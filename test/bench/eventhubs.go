package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/iothubby/iothubby/pkg/hubsim"
	ehclient "github.com/iothubby/iothubby/pkg/service/eventhubs"
)

// benchEventHubs compares the rate at which a go-amqp reader (pkg/service/eventhubs, one
// receiver per partition) reads events through hubsim's Event Hubs-compatible endpoint with
// the rate at which n devices publish them into hubsim (MQTT QoS 1, up to 8 in flight each,
// until every PUBACK), in the same run: the devices publish `total` events, then the reader
// reads them all from the earliest position. It also checks that every event arrived once.
// Target: read/publish >= 1 (the reader keeps up with the devices).
func benchEventHubs(ctx context.Context, n, total int, report func(string, float64, bool, string)) error {
	srv, stop, err := startHub(ctx, func(c *hubsim.Config) {
		c.AMQPAddr = "127.0.0.1:0"
		c.Events.MaxEvents = total + 1
	})
	if err != nil {
		return err
	}
	defer stop()
	ep := srv.Endpoints()
	tlsCfg := srv.ClientTLSConfig()
	keys, err := createHubDevices(srv, n)
	if err != nil {
		return err
	}
	clients := make([]paho.Client, 0, n)
	defer func() { disconnectAll(clients) }()
	for i, k := range keys {
		c, err := connectPaho(ctx, ep.MQTTAddress, ep.HubHostName, devID(i), k, tlsCfg)
		if err != nil {
			return fmt.Errorf("device %d: %w", i, err)
		}
		clients = append(clients, c)
	}

	// Publish.
	var (
		next   atomic.Int64
		failed atomic.Pointer[error]
		wg     sync.WaitGroup
	)
	start := time.Now()
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := "devices/" + devID(i) + "/messages/events/"
			var inflight []paho.Token
			flush := func() bool {
				for _, t := range inflight {
					if !t.WaitTimeout(30*time.Second) || t.Error() != nil {
						err := fmt.Errorf("publish from %s: %v", devID(i), t.Error())
						failed.CompareAndSwap(nil, &err)
						return false
					}
				}
				inflight = inflight[:0]
				return true
			}
			for {
				k := next.Add(1) - 1
				if k >= int64(total) || ctx.Err() != nil || failed.Load() != nil {
					flush()
					return
				}
				inflight = append(inflight, c.Publish(topic, 1, false, `{"k":`+strconv.FormatInt(k, 10)+`}`))
				if len(inflight) == 8 && !flush() {
					return
				}
			}
		}()
	}
	wg.Wait()
	pubDur := time.Since(start)
	if p := failed.Load(); p != nil {
		return *p
	}
	if err := ctx.Err(); err != nil {
		return err
	}

	// Read everything back.
	rctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	readStart := time.Now()
	c, err := ehclient.Dial(rctx, ehclient.Config{ConnectionString: ep.EventHubsCompatibleConnectionString, TLSConfig: tlsCfg})
	if err != nil {
		return err
	}
	defer c.Close()
	hp, err := c.Properties(rctx)
	if err != nil {
		return err
	}
	var (
		read   atomic.Int64
		seen   = make([]atomic.Bool, total)
		dup    atomic.Int64
		rerr   atomic.Pointer[error]
		rwg    sync.WaitGroup
		doneCh = make(chan struct{})
		once   sync.Once
	)
	for _, id := range hp.PartitionIDs {
		r, err := c.Receive(rctx, id, ehclient.Earliest(), &ehclient.ReceiverOptions{Credit: 500})
		if err != nil {
			return err
		}
		rwg.Add(1)
		go func() {
			defer rwg.Done()
			for {
				ev, err := r.Next(rctx)
				if err != nil {
					select {
					case <-doneCh:
					default:
						rerr.CompareAndSwap(nil, &err)
						once.Do(func() { close(doneCh) })
					}
					return
				}
				var k int
				if _, err := fmt.Sscanf(string(ev.Body), `{"k":%d}`, &k); err != nil || k < 0 || k >= total {
					err := fmt.Errorf("unexpected event body %q", ev.Body)
					rerr.CompareAndSwap(nil, &err)
					once.Do(func() { close(doneCh) })
					return
				}
				if seen[k].Swap(true) {
					dup.Add(1)
				}
				if read.Add(1) == int64(total) {
					once.Do(func() { close(doneCh) })
				}
			}
		}()
	}
	select {
	case <-doneCh:
	case <-rctx.Done():
	}
	readDur := time.Since(readStart)
	cancel()
	rwg.Wait()
	if p := rerr.Load(); p != nil && !errors.Is(*p, context.Canceled) {
		return *p
	}
	if got := read.Load(); got != int64(total) || dup.Load() != 0 {
		return fmt.Errorf("read %d of %d events (%d duplicates)", got, total, dup.Load())
	}
	pubRate := float64(total) / pubDur.Seconds()
	readRate := float64(total) / readDur.Seconds()
	fmt.Printf("eventhubs: %d devices published %d events in %v (%.0f/s); %d partitions read in %v (%.0f/s)\n",
		n, total, pubDur.Round(time.Millisecond), pubRate, len(hp.PartitionIDs), readDur.Round(time.Millisecond), readRate)
	ratio := readRate / pubRate
	report("eventhubs read/publish", ratio, ratio >= 1, ">= 1")
	return nil
}
