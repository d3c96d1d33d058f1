package hubsim_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	goamqp "github.com/Azure/go-amqp"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/eventhubs"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	ehclient "github.com/iothubby/iothubby/pkg/service/eventhubs"
)

func ehCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

// newEHEnv starts hubsim with AMQP on a free port and the Event Hubs endpoint.
func newEHEnv(t *testing.T, mutate ...func(*hubsim.Config)) *env {
	t.Helper()
	return newEnv(t, append([]func(*hubsim.Config){func(c *hubsim.Config) {
		c.AMQPAddr = "127.0.0.1:0"
		c.Events.Partitions = 2
	}}, mutate...)...)
}

func (e *env) ehClient(cs string) *ehclient.Client {
	e.t.Helper()
	if cs == "" {
		cs = e.srv.Endpoints().EventHubsCompatibleConnectionString
	}
	c, err := ehclient.Dial(ehCtx(e.t), ehclient.Config{ConnectionString: cs, TLSConfig: e.srv.ClientTLSConfig()})
	if err != nil {
		e.t.Fatalf("dial the Event Hubs endpoint: %v", err)
	}
	e.t.Cleanup(func() { _ = c.Close() })
	return c
}

// sendTelemetry publishes n messages from a connected device and waits until they are recorded.
func (e *env) sendTelemetry(rc *rawConn, dev string, n int, body func(i int) string) {
	e.t.Helper()
	for i := range n {
		mark := e.ev.mark()
		rc.send(publishPkt("devices/"+dev+"/messages/events/%24.mid="+fmt.Sprint("mid-", i)+"&%24.ct=application%2Fjson&seq="+fmt.Sprint(i),
			[]byte(body(i)), 1, uint16(i+1), false))
		if p := rc.mustRead(); p.typ != 4 {
			e.t.Fatalf("expected PUBACK, got %d", p.typ)
		}
		e.ev.waitFrom(e.t, mark, "telemetry", func(ev broker.Event) bool { return ev.Kind == broker.EventTelemetry })
	}
}

func TestEventHubsEndpoint(t *testing.T) {
	e := newEHEnv(t)
	ep := e.srv.Endpoints()
	if !strings.HasPrefix(ep.EventHubsCompatibleConnectionString, "Endpoint=sb://localhost:") ||
		!strings.HasSuffix(ep.EventHubsCompatibleConnectionString, ";EntityPath=localhost") || ep.EventHubsCompatibleName != "localhost" {
		t.Fatalf("endpoints: %q %q", ep.EventHubsCompatibleConnectionString, ep.EventHubsCompatibleName)
	}
	d := e.createSAS("dev-eh-amqp")
	part := fmt.Sprint(eventhubs.PartitionFor(d.DeviceID, 2))
	rc := e.connectSAS(d)
	e.sendTelemetry(rc, d.DeviceID, 3, func(i int) string { return fmt.Sprintf(`{"n":%d}`, i) })

	c := e.ehClient("")
	ctx := ehCtx(t)
	hp, err := c.Properties(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if hp.Name != "localhost" || len(hp.PartitionIDs) != 2 || hp.PartitionIDs[0] != "0" || hp.PartitionIDs[1] != "1" || hp.CreatedAt.IsZero() {
		t.Fatalf("hub properties %+v", hp)
	}
	pp, err := c.PartitionProperties(ctx, part)
	if err != nil {
		t.Fatal(err)
	}
	if pp.IsEmpty || pp.BeginningSequenceNumber != 0 || pp.LastEnqueuedSequence != 2 || pp.LastEnqueuedOffset == "" || pp.LastEnqueuedTime.IsZero() {
		t.Fatalf("partition properties %+v", pp)
	}
	var se *ehclient.StatusError
	if _, err := c.PartitionProperties(ctx, "7"); !errors.As(err, &se) || se.Status != 404 {
		t.Fatalf("unknown partition: %v", err)
	}

	// Earliest, with credit 1: one event, the others wait for credit.
	r, err := c.Receive(ctx, part, ehclient.Earliest(), &ehclient.ReceiverOptions{Credit: -1})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.IssueCredit(1); err != nil {
		t.Fatal(err)
	}
	ev, err := r.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ev.SequenceNumber != 0 || string(ev.Body) != `{"n":0}` || ev.DeviceID != d.DeviceID ||
		ev.Annotations["iothub-message-source"] != "Telemetry" || ev.SystemProperties["message-id"] != "mid-0" ||
		ev.SystemProperties["content-type"] != "application/json" || ev.Properties["seq"] != "0" || ev.EnqueuedTime.IsZero() {
		t.Fatalf("first event %+v", ev)
	}
	if _, ok := ev.Annotations["iothub-enqueuedtime"].(time.Time); !ok {
		t.Fatalf("iothub-enqueuedtime is %T, want a timestamp", ev.Annotations["iothub-enqueuedtime"])
	}
	if _, err := c.PartitionProperties(ctx, part); err != nil { // a round trip: anything sent beyond the credit has arrived
		t.Fatal(err)
	}
	if extra, ok, _ := r.TryNext(ctx); ok {
		t.Fatalf("an event beyond the credit arrived: seq %d", extra.SequenceNumber)
	}
	if err := r.IssueCredit(5); err != nil {
		t.Fatal(err)
	}
	for want := int64(1); want <= 2; want++ {
		ev, err := r.Next(ctx)
		if err != nil || ev.SequenceNumber != want {
			t.Fatalf("event %d: %+v %v", want, ev, err)
		}
	}
	// Live: a new event arrives on the open receiver.
	e.sendTelemetry(rc, d.DeviceID, 1, func(int) string { return `{"live":true}` })
	if ev, err := r.Next(ctx); err != nil || string(ev.Body) != `{"live":true}` || ev.SequenceNumber != 3 {
		t.Fatalf("live event: %+v %v", ev, err)
	}

	// From a sequence number and from an enqueued time.
	r2, err := c.Receive(ctx, part, ehclient.FromSequenceNumber(1, false), nil)
	if err != nil {
		t.Fatal(err)
	}
	if ev, err := r2.Next(ctx); err != nil || ev.SequenceNumber != 2 {
		t.Fatalf("after sequence number 1: %+v %v", ev, err)
	}
	r3, err := c.Receive(ctx, part, ehclient.FromEnqueuedTime(time.Now().Add(-time.Hour)), nil)
	if err != nil {
		t.Fatal(err)
	}
	if ev, err := r3.Next(ctx); err != nil || ev.SequenceNumber != 0 {
		t.Fatalf("from an hour ago: %+v %v", ev, err)
	}
	// Latest: only what comes after the attach.
	r4, err := c.Receive(ctx, part, ehclient.Latest(), nil)
	if err != nil {
		t.Fatal(err)
	}
	e.sendTelemetry(rc, d.DeviceID, 1, func(int) string { return `{"after":1}` })
	if ev, err := r4.Next(ctx); err != nil || string(ev.Body) != `{"after":1}` {
		t.Fatalf("latest: %+v %v", ev, err)
	}
}

func TestEventHubsEndpointRefusals(t *testing.T) {
	e := newEHEnv(t, func(c *hubsim.Config) { c.Events.ConsumerGroups = []string{"backend"} })
	ctx := ehCtx(t)
	cs := e.srv.Endpoints().EventHubsCompatibleConnectionString
	c := e.ehClient("")

	linkCond := func(err error) string {
		var le *goamqp.LinkError
		if errors.As(err, &le) && le.RemoteErr != nil {
			return string(le.RemoteErr.Condition)
		}
		var ae *goamqp.Error
		if errors.As(err, &ae) {
			return string(ae.Condition)
		}
		return fmt.Sprintf("%v (%T)", err, err)
	}
	if _, err := c.Receive(ctx, "5", ehclient.Earliest(), nil); err == nil || linkCond(err) != "amqp:not-found" {
		t.Fatalf("unknown partition: %v", err)
	}
	bad, err := ehclient.Dial(ctx, ehclient.Config{ConnectionString: cs, TLSConfig: e.srv.ClientTLSConfig(), ConsumerGroup: "nosuchgroup"})
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	if _, err := bad.Receive(ctx, "0", ehclient.Earliest(), nil); err == nil || linkCond(err) != "amqp:not-found" {
		t.Fatalf("unknown consumer group: %v", err)
	}
	good, err := ehclient.Dial(ctx, ehclient.Config{ConnectionString: cs, TLSConfig: e.srv.ClientTLSConfig(), ConsumerGroup: "BACKEND"})
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	if _, err := good.Receive(ctx, "0", ehclient.Earliest(), nil); err != nil {
		t.Fatalf("created consumer group (other case): %v", err)
	}

	// A token signed the IoT Hub way (base64-decoded key) is refused: Event Hubs signs with the
	// key string's bytes.
	p, _ := e.srv.Registry().Policy("iothubowner")
	wrong := strings.Replace(cs, p.PrimaryKey, "AAAA"+p.PrimaryKey[4:], 1)
	wc, err := ehclient.Dial(ctx, ehclient.Config{ConnectionString: wrong, TLSConfig: e.srv.ClientTLSConfig()})
	if err != nil {
		t.Fatal(err)
	}
	defer wc.Close()
	var se *ehclient.StatusError
	if _, err := wc.Properties(ctx); !errors.As(err, &se) || se.Status != 401 {
		t.Fatalf("wrong key: %v", err)
	}
	// A policy without ServiceConnect (registryRead) cannot read.
	rr, ok := e.srv.Registry().Policy("registryRead")
	if !ok || rr.Rights.Has(registry.ServiceConnect) {
		t.Skip("no registryRead policy without ServiceConnect")
	}
	noSC := strings.Replace(strings.Replace(cs, p.PrimaryKey, rr.PrimaryKey, 1), "SharedAccessKeyName=iothubowner", "SharedAccessKeyName=registryRead", 1)
	nc, err := ehclient.Dial(ctx, ehclient.Config{ConnectionString: noSC, TLSConfig: e.srv.ClientTLSConfig()})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if _, err := nc.Receive(ctx, "0", ehclient.Earliest(), nil); err == nil || linkCond(err) != "amqp:unauthorized-access" {
		t.Fatalf("policy without ServiceConnect: %v", err)
	}
}

// Epochs: a receiver with a higher epoch takes the partition (the older one is detached with
// amqp:link:stolen); a lower epoch is refused.
func TestEventHubsEpoch(t *testing.T) {
	e := newEHEnv(t)
	ctx := ehCtx(t)
	c := e.ehClient("")
	one, two := int64(1), int64(2)
	r1, err := c.Receive(ctx, "0", ehclient.Earliest(), &ehclient.ReceiverOptions{Epoch: &one})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Receive(ctx, "0", ehclient.Earliest(), nil); err == nil || !strings.Contains(err.Error(), "amqp:link:stolen") {
		t.Fatalf("no-epoch receiver while epoch 1 holds the partition: %v", err)
	}
	if _, err := c.Receive(ctx, "0", ehclient.Earliest(), &ehclient.ReceiverOptions{Epoch: &two}); err != nil {
		t.Fatal(err)
	}
	if _, err := r1.Next(ctx); err == nil || !strings.Contains(err.Error(), "amqp:link:stolen") {
		t.Fatalf("epoch 1 receiver after epoch 2 attached: %v", err)
	}
	if _, err := c.Receive(ctx, "0", ehclient.Earliest(), &ehclient.ReceiverOptions{Epoch: &one}); err == nil || !strings.Contains(err.Error(), "amqp:link:stolen") {
		t.Fatalf("lower epoch: %v", err)
	}
}
