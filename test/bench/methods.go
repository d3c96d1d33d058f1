package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim"
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

	// the device answers every call with its payload; the callback only publishes (QoS 0, no
	// wait), so it never blocks
	clients, err := connectSwarm(ctx, srv, n, func(_ int, c paho.Client) error {
		return subscribeWait(c, wire.MethodsFilter, 0, func(cl paho.Client, m paho.Message) {
			t, err := wire.Parse(m.Topic())
			if err != nil || t.Kind != wire.KindMethodRequest {
				return
			}
			cl.Publish(wire.MethodResponse(200, t.RequestID), 0, false, m.Payload())
		})
	})
	defer func() { disconnectAll(clients) }()
	if err != nil {
		return err
	}

	invoke := func(_, i int) error {
		payload := json.RawMessage(fmt.Sprintf(`{"seq":%d}`, i))
		res, err := svc.InvokeMethod(ctx, devID(i%n), service.MethodCall{MethodName: "bench", Payload: payload, ResponseTimeout: 30 * time.Second})
		if err != nil {
			return fmt.Errorf("invoke: %w", err)
		}
		if res.Status != 200 || string(res.Payload) != string(payload) {
			return fmt.Errorf("invoke answered %d %s", res.Status, res.Payload)
		}
		return nil
	}
	methodRT, ackRT, err := pairedLatency(ctx, parallel, samples, invoke, telemetryAck(clients))
	if err != nil {
		return err
	}
	reportPair(report, "methods (REST round trip vs QoS 1 PUBACK)", "method", "PUBACK", n, methodRT, ackRT, 3)
	return nil
}
