package hubsim_test

import (
	"encoding/json"
	"slices"
	"sync"
	"testing"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/wire"
)

type outcomes struct {
	mu   sync.Mutex
	list []string
	ch   chan struct{}
}

func newOutcomes() *outcomes { return &outcomes{ch: make(chan struct{}, 64)} }

func (o *outcomes) record(status string) {
	o.mu.Lock()
	o.list = append(o.list, status)
	o.mu.Unlock()
	o.ch <- struct{}{}
}

func (o *outcomes) get() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.list)
}

// DELETE /devices/{id}/commands purges the device's queue as IoT Hub does: the count in the
// answer, each sender told Purged, nothing left pending.
func TestC2DPurge(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("purged")
	out := newOutcomes()
	for range 3 {
		if _, err := e.srv.Broker().SendC2D(d.DeviceID, broker.C2DMessage{Body: []byte("x"), OnOutcome: out.record}); err != nil {
			t.Fatal(err)
		}
	}
	r := e.do("DELETE", "/devices/purged/commands?api-version=2021-04-12", nil, "")
	var res struct {
		TotalMessagesPurged int    `json:"totalMessagesPurged"`
		DeviceID            string `json:"deviceId"`
	}
	if r.status != 200 || json.Unmarshal(r.body, &res) != nil || res.TotalMessagesPurged != 3 || res.DeviceID != "purged" {
		t.Fatalf("purge: %d %s", r.status, r.body)
	}
	if got := out.get(); !slices.Equal(got, []string{"Purged", "Purged", "Purged"}) {
		t.Fatalf("outcomes %q, want three Purged", got)
	}
	if n := e.srv.Broker().PendingC2D(d.DeviceID); n != 0 {
		t.Fatalf("%d messages pending after the purge", n)
	}
	if dev, _ := e.srv.Registry().Get(d.DeviceID); dev.CloudToDeviceMessageCount != 0 {
		t.Fatalf("cloudToDeviceMessageCount %d after the purge", dev.CloudToDeviceMessageCount)
	}
	if r := e.do("DELETE", "/devices/nobody/commands?api-version=2021-04-12", nil, ""); r.status != 404 {
		t.Fatalf("purge of an unknown device: %d %s", r.status, r.body)
	}
}

// A message written to the device MaxC2DDeliveries times without being completed (the device
// drops the connection before its PUBACK) is dead-lettered with DeliveryCountExceeded.
func TestC2DDeliveryCountExceeded(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("forgetful")
	out := newOutcomes()
	if _, err := e.srv.Broker().SendC2D(d.DeviceID, broker.C2DMessage{Body: []byte("x"), OnOutcome: out.record}); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= broker.MaxC2DDeliveries; i++ {
		mark := e.ev.mark()
		rc := e.connectSAS(d)
		// The session persists (clean session 0), so the message may come before the SUBACK.
		rc.send(subscribePkt(uint16(i), wire.C2DFilter(d.DeviceID)))
		for suback, published := false, false; !suback || !published; {
			p, err := rc.read()
			if err != nil {
				t.Fatalf("delivery %d: %v", i, err)
			}
			switch p.typ {
			case 9:
				suback = true
			case 3:
				published = true
			default:
				t.Fatalf("delivery %d: packet type %d", i, p.typ)
			}
		}
		_ = rc.c.Close() // no PUBACK
		e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool {
			return ev.Kind == broker.EventDisconnected && ev.DeviceID == d.DeviceID
		})
		if i < broker.MaxC2DDeliveries && len(out.get()) != 0 {
			t.Fatalf("after %d deliveries: outcome %q already", i, out.get())
		}
	}
	<-out.ch
	if got := out.get(); !slices.Equal(got, []string{"DeliveryCountExceeded"}) {
		t.Fatalf("outcomes %q, want DeliveryCountExceeded", got)
	}
	if n := e.srv.Broker().PendingC2D(d.DeviceID); n != 0 {
		t.Fatalf("%d messages pending after dead-lettering", n)
	}
}
