package hubsim_test

import (
	"strings"
	"testing"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
)

// IoT Hub documents no property-bag limit of its own: properties count toward the 256 KB message
// size, and a topic is bounded by MQTT's 65,535 bytes. A 40 KB bag is delivered; a malformed bag
// closes the connection with that reason (it was "publish to a topic devices may not publish to").
func TestTelemetryPropertyBag(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("bag")
	rc := e.connectSAS(d)
	mark := e.ev.mark()
	wide := "devices/bag/messages/events/big=" + strings.Repeat("v", 40_000)
	rc.send(publishPkt(wide, []byte("{}"), 1, 1, false))
	if p := rc.mustRead(); p.typ != 4 {
		t.Fatalf("40 KB property bag: got packet type %d, want PUBACK", p.typ)
	}
	e.ev.waitFrom(t, mark, "telemetry", func(ev broker.Event) bool { return ev.Kind == broker.EventTelemetry })

	mark = e.ev.mark()
	rc.send(publishPkt("devices/bag/messages/events/a=%ZZ", []byte("{}"), 1, 2, false))
	rc.expectClosed()
	ev := e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool { return ev.Kind == broker.EventDisconnected })
	if !strings.HasPrefix(ev.Reason, broker.ReasonBadPropertyBag+" (") {
		t.Fatalf("closed for %q, want the malformed property bag named", ev.Reason)
	}
}
