package main

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/iothubby/iothubby/pkg/wire"
)

// benchTwin measures the reported-PATCH round trip (publish to the 204 on $iothub/twin/res/)
// with n devices connected to an in-process hubsim, against a plain QoS 1 telemetry publish to
// its PUBACK on the same broker in the same run. Samples alternate between the two kinds, from
// 32 workers over all devices; p50 and p99 of each are compared. Target: p99 ratio <= 2.
func benchTwin(ctx context.Context, n, samples int, report func(string, float64, bool, string)) error {
	srv, stop, err := startHub(ctx, nil)
	if err != nil {
		return err
	}
	defer stop()
	host := srv.Endpoints().HubHostName
	tlsCfg := srv.ClientTLSConfig()

	type dev struct {
		c       paho.Client
		id      string
		pending sync.Map // rid -> chan struct{}
	}
	devs := make([]*dev, n)
	keys, err := createHubDevices(srv, n)
	if err != nil {
		return err
	}
	for i, key := range keys {
		devs[i] = &dev{id: devID(i)}
		c, err := connectPaho(ctx, srv.Endpoints().MQTTAddress, host, devID(i), key, tlsCfg)
		if err != nil {
			return fmt.Errorf("device %d: %w", i, err)
		}
		devs[i].c = c
		dv := devs[i]
		// the callback only hands the answer over; it never blocks
		tok := c.Subscribe(wire.TwinResponseFilter, 0, func(_ paho.Client, m paho.Message) {
			t, err := wire.Parse(m.Topic())
			if err != nil {
				return
			}
			if ch, ok := dv.pending.LoadAndDelete(t.RequestID); ok {
				select {
				case ch.(chan int) <- t.Status:
				default:
				}
			}
		})
		if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			return fmt.Errorf("subscribe %d: %v", i, tok.Error())
		}
	}
	defer func() {
		clients := make([]paho.Client, 0, n)
		for _, d := range devs {
			if d != nil && d.c != nil {
				clients = append(clients, d.c)
			}
		}
		disconnectAll(clients)
	}()

	var (
		mu     sync.Mutex
		twinRT []time.Duration
		ackRT  []time.Duration
		next   atomic.Int64
		rid    atomic.Uint64
		first  error
		once   sync.Once
		wg     sync.WaitGroup
	)
	var failed atomic.Bool
	fail := func(err error) { once.Do(func() { first = err; failed.Store(true) }) }
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= 2*samples || ctx.Err() != nil || failed.Load() {
					return
				}
				d := devs[i%n]
				if i%2 == 0 {
					r := strconv.FormatUint(rid.Add(1), 10)
					ch := make(chan int, 1)
					d.pending.Store(r, ch)
					body := []byte(`{"bench":{"seq":` + strconv.Itoa(i) + `,"ok":true}}`)
					start := time.Now()
					d.c.Publish(wire.TwinPatchReported(r), 0, false, body)
					select {
					case st := <-ch:
						if st != 204 {
							fail(fmt.Errorf("reported PATCH answered %d", st))
							return
						}
					case <-time.After(30 * time.Second):
						fail(fmt.Errorf("no answer to reported PATCH %s", r))
						return
					}
					el := time.Since(start)
					mu.Lock()
					twinRT = append(twinRT, el)
					mu.Unlock()
				} else {
					start := time.Now()
					tok := d.c.Publish(wire.Telemetry(d.id, nil), 1, false, []byte(`{"bench":true}`))
					if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
						fail(fmt.Errorf("telemetry PUBACK: %v", tok.Error()))
						return
					}
					el := time.Since(start)
					mu.Lock()
					ackRT = append(ackRT, el)
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return first
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	tp50, tp99 := pct(twinRT, 0.50), pct(twinRT, 0.99)
	ap50, ap99 := pct(ackRT, 0.50), pct(ackRT, 0.99)
	fmt.Printf("twin: %d devices, %d samples each: reported PATCH p50 %v p99 %v; QoS 1 PUBACK p50 %v p99 %v\n",
		n, samples, tp50, tp99, ap50, ap99)
	report(fmt.Sprintf("twin PATCH p50 / PUBACK p50 (%d)", n), float64(tp50)/float64(ap50), true, "(informational)")
	r99 := float64(tp99) / float64(ap99)
	report(fmt.Sprintf("twin PATCH p99 / PUBACK p99 (%d)", n), r99, r99 <= 2, "<= 2")
	return nil
}

func pct(xs []time.Duration, p float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), xs...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(p * float64(len(s)-1))
	return s[i]
}
