package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// benchMethods measures the direct-method round trip through hubsim's REST API
// (POST /twins/{id}/methods, delivered over MQTT, answered by the device, returned over HTTPS)
// with n devices connected to an in-process hubsim, against a plain MQTT request and reply on
// the same broker in the same run: a QoS 1 telemetry publish to its PUBACK. Samples alternate
// between the two kinds, from 32 workers over all devices; p50 and p99 are compared.
// Target: p99 ratio <= 3 (the figure is at 1,000 devices: -methods-n 1000).
func benchMethods(ctx context.Context, n, samples int, report func(string, float64, bool, string)) error {
	state, err := os.MkdirTemp("", "iothubby-bench-methods-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(state)
	srv, err := hubsim.Start(ctx, hubsim.Config{StateDir: state, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", TelemetryPerDevice: -1}, zap.NewNop())
	if err != nil {
		return err
	}
	defer srv.Close()
	ep := srv.Endpoints()
	svc, err := service.New(service.Config{ConnectionString: ep.ServiceConnectionString, Address: ep.HTTPSAddress, CAFile: ep.CAFile})
	if err != nil {
		return err
	}
	defer svc.Close()
	tlsCfg := srv.ClientTLSConfig()

	clients := make([]paho.Client, 0, n)
	defer func() { disconnectAll(clients) }()
	for i := range n {
		d, err := srv.Registry().Create(registry.Device{DeviceID: devID(i)})
		if err != nil {
			return err
		}
		key, err := sas.ParseKey(d.Authentication.SymmetricKey.PrimaryKey)
		if err != nil {
			return err
		}
		c, err := connectPaho(ctx, ep.MQTTAddress, ep.HubHostName, devID(i), key, tlsCfg)
		if err != nil {
			return fmt.Errorf("device %d: %w", i, err)
		}
		clients = append(clients, c)
		// the device answers every call with its payload; the callback only publishes (QoS 0,
		// no wait), so it never blocks
		tok := c.Subscribe(wire.MethodsFilter, 0, func(cl paho.Client, m paho.Message) {
			t, err := wire.Parse(m.Topic())
			if err != nil || t.Kind != wire.KindMethodRequest {
				return
			}
			cl.Publish(wire.MethodResponse(200, t.RequestID), 0, false, m.Payload())
		})
		if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			return fmt.Errorf("subscribe %d: %v", i, tok.Error())
		}
	}

	var (
		mu       sync.Mutex
		methodRT []time.Duration
		ackRT    []time.Duration
		next     atomic.Int64
		first    error
		once     sync.Once
		wg       sync.WaitGroup
		failed   atomic.Bool
	)
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
				dev := i % n
				if i%2 == 0 {
					payload := json.RawMessage(fmt.Sprintf(`{"seq":%d}`, i))
					start := time.Now()
					res, err := svc.InvokeMethod(ctx, devID(dev), service.MethodCall{MethodName: "bench", Payload: payload, ResponseTimeout: 30 * time.Second})
					if err != nil {
						fail(fmt.Errorf("invoke: %w", err))
						return
					}
					if res.Status != 200 || string(res.Payload) != string(payload) {
						fail(fmt.Errorf("invoke answered %d %s", res.Status, res.Payload))
						return
					}
					el := time.Since(start)
					mu.Lock()
					methodRT = append(methodRT, el)
					mu.Unlock()
				} else {
					start := time.Now()
					tok := clients[dev].Publish(wire.Telemetry(devID(dev), nil), 1, false, []byte(`{"bench":true}`))
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
	mp50, mp99 := pct(methodRT, 0.50), pct(methodRT, 0.99)
	ap50, ap99 := pct(ackRT, 0.50), pct(ackRT, 0.99)
	fmt.Printf("methods: %d devices, %d samples each: method round trip (REST) p50 %v p99 %v; QoS 1 PUBACK p50 %v p99 %v\n",
		n, samples, mp50, mp99, ap50, ap99)
	report(fmt.Sprintf("method p50 / PUBACK p50 (%d)", n), float64(mp50)/float64(ap50), true, "(informational)")
	r99 := float64(mp99) / float64(ap99)
	report(fmt.Sprintf("method p99 / PUBACK p99 (%d)", n), r99, r99 <= 3, "<= 3")
	return nil
}
