package main

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hubsim"
)

// benchDurable measures the agent's telemetry throughput with the durable queue
// (queue.persist: true, default fsync policy: interval, 1 s) against the in-memory queue, in the
// same run against one in-process hubsim. Each round runs a pkg/agent Device in this process
// (the agent's own telemetry loop, hub session, queue and spool; telemetry.count n messages at
// a 20 µs interval, so the loop sends as fast as it can and the queue, sized to hold them all,
// never refuses one) from its first message queued to the hub's PUBACK of its last; rounds
// alternate in-memory / persisted, the medians are compared. It also counts the spool's fsyncs
// (segment and cursor, including the final ones at Close) per message.
// Target: persisted/in-memory >= 0.5.
func benchDurable(ctx context.Context, n, rounds int, report func(string, float64, bool, string)) error {
	srv, stop, err := startHub(ctx, nil)
	if err != nil {
		return err
	}
	defer stop()
	keys, err := createHubDevices(srv, 1)
	if err != nil {
		return err
	}
	rates := map[bool][]float64{}
	var fsyncsPerMsg []float64
	for r := range rounds {
		for _, persist := range []bool{false, true} {
			rate, fsyncs, err := durableRound(ctx, srv, base64.StdEncoding.EncodeToString(keys[0]), n, persist)
			if err != nil {
				return fmt.Errorf("round %d persist=%v: %w", r+1, persist, err)
			}
			name := "in-memory"
			if persist {
				name = "persisted"
				fsyncsPerMsg = append(fsyncsPerMsg, float64(fsyncs)/float64(n))
			}
			fmt.Printf("durable: round %d %-9s %d messages, %.0f msg/s", r+1, name, n, rate)
			if persist {
				fmt.Printf(", %d fsyncs (%.4f per message)", fsyncs, float64(fsyncs)/float64(n))
			}
			fmt.Println()
			rates[persist] = append(rates[persist], rate)
		}
	}
	fmt.Printf("durable: fsyncs per message (fsync: interval, 1s) median %.4f\n", median(fsyncsPerMsg))
	ratio := median(rates[true]) / median(rates[false])
	report("durable persisted / in-memory", ratio, ratio >= 0.5, ">= 0.5")
	return nil
}

// durableRound runs one device until n messages are acknowledged and returns the messages per
// second from the first queued to the last acknowledged, and the spool's fsyncs (0 without
// persist).
func durableRound(ctx context.Context, srv *hubsim.Server, key string, n int, persist bool) (float64, uint64, error) {
	ep := srv.Endpoints()
	c := agent.Default()
	c.Host, c.DeviceID, c.Address = ep.HubHostName, devID(0), ep.MQTTAddress
	c.Auth.SymmetricKey = key
	c.TLS.CAFile = ep.CAFile
	c.Telemetry.Interval = 20 * time.Microsecond
	c.Telemetry.Count = uint64(n)
	c.Queue.Capacity = n + 1
	c.Queue.MaxBytes = 1 << 30
	if persist {
		dir, err := os.MkdirTemp("", "iothubby-bench-durable-")
		if err != nil {
			return 0, 0, err
		}
		defer os.RemoveAll(dir)
		c.StateDir = dir
		c.Queue.Persist = true
	}
	obs := &countingObserver{n: uint64(n), done: make(chan struct{})}
	c.Shared.Observer = obs
	d, err := agent.New(c, zap.NewNop())
	if err != nil {
		return 0, 0, err
	}
	runCtx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() { errc <- d.Run(runCtx) }()
	deadline := time.NewTimer(5*time.Minute + time.Duration(n)*time.Millisecond)
	defer deadline.Stop()
	var runErr error
	select {
	case <-obs.done:
	case runErr = <-errc:
		if runErr == nil {
			runErr = errors.New("the device stopped before its messages were acknowledged")
		}
	case <-deadline.C:
		runErr = fmt.Errorf("timed out: %d of %d acknowledged", obs.ok.Load(), n)
	}
	cancel()
	if runErr == nil {
		runErr = <-errc
	}
	d.Close()
	if runErr != nil {
		return 0, 0, runErr
	}
	if f := obs.failed.Load(); f > 0 {
		return 0, 0, fmt.Errorf("%d messages failed", f)
	}
	var fsyncs uint64
	if st, ok := d.QueueStats(); ok {
		fsyncs = st.Fsyncs
	} else if persist {
		return 0, 0, errors.New("no disk queue statistics")
	}
	obs.mu.Lock()
	elapsed := obs.last.Sub(obs.first)
	obs.mu.Unlock()
	return float64(n) / elapsed.Seconds(), fsyncs, nil
}

// countingObserver records when the first message was queued and when the n-th outcome came.
type countingObserver struct {
	agent.NopObserver
	n                 uint64
	ok, failed, total atomic.Uint64
	done              chan struct{}

	mu          sync.Mutex
	first, last time.Time
}

func (o *countingObserver) TelemetrySent(string) {
	o.mu.Lock()
	if o.first.IsZero() {
		o.first = time.Now()
	}
	o.mu.Unlock()
}

func (o *countingObserver) TelemetryDone(_ string, _ time.Duration, err error) {
	c := &o.ok
	if err != nil {
		c = &o.failed
	}
	c.Add(1)
	if o.total.Add(1) == o.n {
		o.mu.Lock()
		o.last = time.Now()
		o.mu.Unlock()
		close(o.done)
	}
}
