package main

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
)

// send publishes bodies from a device through hubsim's MQTT endpoint.
func send(t *testing.T, srv *hubsim.Server, id string, bodies ...string) {
	t.Helper()
	d, err := srv.Registry().Create(registry.Device{DeviceID: id})
	if err != nil {
		t.Fatal(err)
	}
	key, _ := sas.ParseKey(d.Authentication.SymmetricKey.PrimaryKey)
	_, port, _ := net.SplitHostPort(srv.Endpoints().MQTTAddress)
	s, err := hub.New(hub.Config{Host: "localhost", Address: "127.0.0.1:" + port, DeviceID: id, Signer: key, RootCAs: srv.CA().Pool()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	defer func() { _ = s.Close(ctx) }()
	for _, b := range bodies {
		if err := s.Send(ctx, &hub.Message{Body: []byte(b), Properties: map[string]string{"k": "v"}}); err != nil {
			t.Fatal(err)
		}
	}
}

func TestMonitorEvents(t *testing.T) {
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0",
		HTTPSAddr: "127.0.0.1:0", AMQPAddr: "127.0.0.1:0"}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	st := "--hubsim-state=" + srv.StateDir()
	send(t, srv, "m1", `{"n":1}`, "not json")
	send(t, srv, "m2", `{"other":true}`)

	out, err := hubby(t, st, "monitor-events", "--from-beginning", "--device-id", "m1", "--count", "2", "--properties", "app,sys")
	if err != nil {
		t.Fatalf("monitor-events: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("want 2 lines, got %q", out)
	}
	payloads := map[string]bool{}
	for _, l := range lines {
		var v struct {
			Event struct {
				Origin     string          `json:"origin"`
				Payload    json.RawMessage `json:"payload"`
				Properties struct {
					System      map[string]any `json:"system"`
					Application map[string]any `json:"application"`
				} `json:"properties"`
			} `json:"event"`
		}
		if err := json.Unmarshal([]byte(l), &v); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		if v.Event.Origin != "m1" || v.Event.Properties.Application["k"] != "v" || v.Event.Properties.System == nil {
			t.Fatalf("line %q", l)
		}
		payloads[string(v.Event.Payload)] = true
	}
	if !payloads[`{"n":1}`] || !payloads[`"not json"`] {
		t.Fatalf("payloads %v (JSON kept as JSON, other bodies as strings)", payloads)
	}

	// The default starts at the end: nothing old, until the duration ends.
	out, err = hubby(t, st, "monitor-events", "--duration", "300ms")
	if err != nil || out != "" {
		t.Fatalf("from now on: %q %v", out, err)
	}
	var ue usageError
	if _, err := hubby(t, st, "monitor-events", "--from-beginning", "--enqueued-time", "1"); !errors.As(err, &ue) {
		t.Fatalf("both positions: %v", err)
	}
	if _, err := hubby(t, st, "monitor-events", "--enqueued-time", "yesterday"); !errors.As(err, &ue) {
		t.Fatalf("bad time: %v", err)
	}
	if _, err := hubby(t, st, "monitor-events", "--consumer-group", "nope", "--count", "1"); err == nil || !strings.Contains(err.Error(), "amqp:not-found") {
		t.Fatalf("unknown consumer group: %v", err)
	}
}
