package main

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/wire"
)

// connectSwarm registers n SAS devices in srv and connects a paho client for each; subscribe,
// when set, runs once per client before the next connects (it must not block on traffic). The
// clients are returned even on error, so the caller can disconnect what did connect.
func connectSwarm(ctx context.Context, srv *hubsim.Server, n int, subscribe func(i int, c paho.Client) error) ([]paho.Client, error) {
	keys, err := createHubDevices(srv, n)
	if err != nil {
		return nil, err
	}
	ep := srv.Endpoints()
	tlsCfg := srv.ClientTLSConfig()
	clients := make([]paho.Client, 0, n)
	for i, key := range keys {
		c, err := connectPaho(ctx, ep.MQTTAddress, ep.HubHostName, devID(i), key, tlsCfg)
		if err != nil {
			return clients, fmt.Errorf("device %d: %w", i, err)
		}
		clients = append(clients, c)
		if subscribe != nil {
			if err := subscribe(i, c); err != nil {
				return clients, fmt.Errorf("device %d: %w", i, err)
			}
		}
	}
	return clients, nil
}

// subscribeWait subscribes c to filter and waits for the SUBACK.
func subscribeWait(c paho.Client, filter string, qos byte, h paho.MessageHandler) error {
	tok := c.Subscribe(filter, qos, h)
	if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
		return fmt.Errorf("subscribe %s: %v", filter, tok.Error())
	}
	return nil
}

// pairedLatency runs 2*samples timed operations from workers goroutines: sample i runs a when
// i is even and b when it is odd, so both kinds see the same load at the same time. op gets the
// worker's number w and the sample's number i. The first error stops every worker and is
// returned; so is a cancelled ctx.
func pairedLatency(ctx context.Context, workers, samples int, a, b func(w, i int) error) (ra, rb []time.Duration, err error) {
	var (
		mu     sync.Mutex
		next   atomic.Int64
		first  error
		once   sync.Once
		failed atomic.Bool
		wg     sync.WaitGroup
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= 2*samples || ctx.Err() != nil || failed.Load() {
					return
				}
				op, into := a, &ra
				if i%2 == 1 {
					op, into = b, &rb
				}
				start := time.Now()
				if err := op(w, i); err != nil {
					once.Do(func() { first = err; failed.Store(true) })
					return
				}
				el := time.Since(start)
				mu.Lock()
				*into = append(*into, el)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return nil, nil, first
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	return ra, rb, nil
}

// reportPair prints both kinds' p50 and p99 and reports their ratios (a over b): p50 for
// information, p99 against limit.
func reportPair(report func(string, float64, bool, string), what, aName, bName string, n int, ra, rb []time.Duration, limit float64) {
	ap50, ap99 := pct(ra, 0.50), pct(ra, 0.99)
	bp50, bp99 := pct(rb, 0.50), pct(rb, 0.99)
	fmt.Printf("%s: %d devices, %d samples: %s p50 %v p99 %v; %s p50 %v p99 %v\n",
		what, n, len(ra)+len(rb), aName, ap50, ap99, bName, bp50, bp99)
	report(fmt.Sprintf("%s p50 / %s p50 (%d)", aName, bName, n), float64(ap50)/float64(bp50), true, "(informational)")
	r99 := float64(ap99) / float64(bp99)
	report(fmt.Sprintf("%s p99 / %s p99 (%d)", aName, bName, n), r99, r99 <= limit, fmt.Sprintf("<= %g", limit))
}

// telemetryAck is an operation for pairedLatency: a QoS 1 telemetry publish from device i
// (modulo the swarm; clients[d] is devID(d)) to its PUBACK.
func telemetryAck(clients []paho.Client) func(w, i int) error {
	return func(_, i int) error {
		d := i % len(clients)
		tok := clients[d].Publish(wire.Telemetry(devID(d), nil), 1, false, []byte(`{"bench":true}`))
		if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			return fmt.Errorf("telemetry PUBACK: %v", tok.Error())
		}
		return nil
	}
}

// pct is the p-quantile (0..1) of xs by nearest rank below; 0 for no samples.
func pct(xs []time.Duration, p float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), xs...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(p * float64(len(s)-1))
	return s[i]
}
