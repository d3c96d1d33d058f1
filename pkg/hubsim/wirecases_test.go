package hubsim_test

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/wire"
)

// The shared topic table, byte for byte, against hubsim's device endpoint: every topic a device
// publishes (telemetry, twin GET, reported patch) is accepted as spelled there, ParseOnly
// spellings included, and every topic of wire.BadCases closes the connection for a topic
// reason. Hub-to-device and module topics are what hubsim sends, not what a device connection
// may publish.
func TestWireCasesOnTheDeviceEndpoint(t *testing.T) {
	e := newEnv(t)
	devs := map[string]bool{}
	var pid uint16
	for _, c := range wire.Cases {
		w := c.Want
		if w.ModuleID != "" || !w.Kind.FromDevice() || w.Kind == wire.KindMethodResponse {
			continue
		}
		t.Run(c.Name, func(t *testing.T) {
			id := w.DeviceID
			if id == "" {
				id = "dev1"
			}
			if !devs[id] {
				e.createSAS(id)
				devs[id] = true
			}
			d, err := e.srv.Registry().Get(id)
			if err != nil {
				t.Fatal(err)
			}
			rc := e.connectSAS(d)
			pid++
			switch w.Kind {
			case wire.KindTelemetry:
				mark := e.ev.mark()
				rc.send(publishPkt(c.Topic, []byte(`{}`), 1, pid, false))
				if p := rc.mustRead(); p.typ != 4 || binary.BigEndian.Uint16(p.body) != pid {
					t.Fatalf("%s: want PUBACK %d, got %+v", c.Topic, pid, p)
				}
				mid, _ := w.Properties.Get(wire.PropMessageID)
				ev := e.ev.waitFrom(t, mark, "telemetry", func(ev broker.Event) bool {
					return ev.Kind == broker.EventTelemetry && ev.DeviceID == id
				})
				if ev.MessageID != mid {
					t.Fatalf("%s: recorded message ID %q, want %q", c.Topic, ev.MessageID, mid)
				}
			case wire.KindTwinGet, wire.KindTwinPatchReported:
				rc.subscribe(pid, wire.TwinResponseFilter)
				rc.send(publishPkt(c.Topic, []byte(`{"x":1}`), 0, 0, false))
				for {
					p := rc.mustRead()
					if p.typ == 4 {
						continue
					}
					pub := parsePublish(t, p)
					r, err := wire.Parse(pub.topic)
					if err != nil || r.Kind != wire.KindTwinResponse || r.RequestID != w.RequestID {
						t.Fatalf("%s: answer on %q (%v), want a twin response to $rid %s", c.Topic, pub.topic, err, w.RequestID)
					}
					want := 200
					if w.Kind == wire.KindTwinPatchReported {
						want = 204
					}
					if r.Status != want {
						t.Fatalf("%s: status %d, want %d (%s)", c.Topic, r.Status, want, pub.payload)
					}
					break
				}
			default:
				t.Fatalf("no check for kind %v: extend this test with the table", w.Kind)
			}
		})
	}

	d := e.createSAS("dev-bad")
	for _, c := range wire.BadCases {
		t.Run("bad/"+c.Name, func(t *testing.T) {
			rc := e.connectSAS(d)
			mark := e.ev.mark()
			rc.send(publishPkt(c.Topic, []byte(`{}`), 0, 0, false))
			rc.expectClosed()
			ev := e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool {
				return ev.Kind == broker.EventDisconnected && ev.DeviceID == d.DeviceID
			})
			if ev.Reason != broker.ReasonNotDeviceTopic && !strings.HasPrefix(ev.Reason, broker.ReasonBadPropertyBag+" (") &&
				ev.Reason != broker.ReasonOtherDeviceTelemetry {
				t.Fatalf("%q closed the connection for %q, want a topic reason", c.Topic, ev.Reason)
			}
		})
	}
}
