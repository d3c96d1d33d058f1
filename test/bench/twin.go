package main

import (
	"context"
	"fmt"
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

	// pending[i] maps device i's request ids to the channel its answer goes to; the callback
	// only hands the answer over, it never blocks
	pending := make([]sync.Map, n)
	clients, err := connectSwarm(ctx, srv, n, func(i int, c paho.Client) error {
		return subscribeWait(c, wire.TwinResponseFilter, 0, func(_ paho.Client, m paho.Message) {
			t, err := wire.Parse(m.Topic())
			if err != nil {
				return
			}
			if ch, ok := pending[i].LoadAndDelete(t.RequestID); ok {
				select {
				case ch.(chan int) <- t.Status:
				default:
				}
			}
		})
	})
	defer func() { disconnectAll(clients) }()
	if err != nil {
		return err
	}

	var rid atomic.Uint64
	patch := func(_, i int) error {
		d := i % n
		r := strconv.FormatUint(rid.Add(1), 10)
		ch := make(chan int, 1)
		pending[d].Store(r, ch)
		body := []byte(`{"bench":{"seq":` + strconv.Itoa(i) + `,"ok":true}}`)
		clients[d].Publish(wire.TwinPatchReported(r), 0, false, body)
		select {
		case st := <-ch:
			if st != 204 {
				return fmt.Errorf("reported PATCH answered %d", st)
			}
			return nil
		case <-time.After(30 * time.Second):
			return fmt.Errorf("no answer to reported PATCH %s", r)
		}
	}
	twinRT, ackRT, err := pairedLatency(ctx, parallel, samples, patch, telemetryAck(clients))
	if err != nil {
		return err
	}
	reportPair(report, "twin (reported PATCH vs QoS 1 PUBACK)", "twin PATCH", "PUBACK", n, twinRT, ackRT, 2)
	return nil
}
