package hubsim_test

import (
	"testing"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/eventhubs"
)

// Telemetry reaches the Event Hubs-compatible endpoint's store in the device's partition, with
// IoT Hub's annotations and the message's properties, and survives a restart.
func TestTelemetryFeedsEventHubs(t *testing.T) {
	dir := t.TempDir()
	e := newEnvIn(t, dir, func(c *hubsim.Config) {
		c.Events = hubsim.EventsConfig{Partitions: 2, ConsumerGroups: []string{"backend"}}
	})
	d := e.createSAS("dev-eh")
	rc := e.connectSAS(d)
	mark := e.ev.mark()
	rc.send(publishPkt("devices/dev-eh/messages/events/%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8&color=red&bare",
		[]byte(`{"t":21}`), 1, 3, false))
	if p := rc.mustRead(); p.typ != 4 {
		t.Fatalf("expected PUBACK, got %d", p.typ)
	}
	e.ev.waitFrom(t, mark, "telemetry", func(ev broker.Event) bool { return ev.Kind == broker.EventTelemetry })

	st := e.srv.EventHubs()
	if st.Partitions() != 2 || !st.HasConsumerGroup("$Default") || !st.HasConsumerGroup("BACKEND") {
		t.Fatalf("partitions %d, groups %v", st.Partitions(), st.ConsumerGroups())
	}
	p := eventhubs.PartitionFor("dev-eh", 2)
	evs, _, _, err := st.Read(p, 0, 10)
	if err != nil || len(evs) != 1 {
		t.Fatalf("partition %d: %d events, %v", p, len(evs), err)
	}
	ev := evs[0]
	if string(ev.Body) != `{"t":21}` || ev.SequenceNumber != 0 ||
		ev.System["message-id"] != "m1" || ev.System["content-type"] != "application/json" || ev.System["content-encoding"] != "utf-8" ||
		ev.Annotations["iothub-connection-device-id"] != "dev-eh" || ev.Annotations["iothub-message-source"] != "Telemetry" ||
		ev.Annotations["iothub-connection-auth-generation-id"] != d.GenerationID || ev.Annotations["iothub-enqueuedtime"] == "" ||
		ev.Annotations["iothub-connection-auth-method"] == "" {
		t.Fatalf("event %+v", ev)
	}
	if len(ev.Properties) != 2 || ev.Properties[0] != (eventhubs.Property{Key: "color", Value: "red"}) || !ev.Properties[1].Null {
		t.Fatalf("properties %+v", ev.Properties)
	}
	if _, ok := ev.System["iothub-connection-device-id"]; ok {
		t.Fatal("an annotation in the properties section")
	}
	if e.srv.EventHubName() != "localhost" {
		t.Fatalf("event hub name %q", e.srv.EventHubName())
	}
	_ = rc.c.Close()
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}

	e2 := newEnvIn(t, dir, func(c *hubsim.Config) { c.Events = hubsim.EventsConfig{Partitions: 2} })
	evs, _, _, _ = e2.srv.EventHubs().Read(p, 0, 10)
	if len(evs) != 1 || string(evs[0].Body) != `{"t":21}` || !e2.srv.EventHubs().HasConsumerGroup("backend") {
		t.Fatalf("after restart: %d events, groups %v", len(evs), e2.srv.EventHubs().ConsumerGroups())
	}
}
