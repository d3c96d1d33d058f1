package hubsim_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/wire"
)

// A device that subscribes to desired patches and methods and then stops reading must not stall
// anything else: PATCH and GET of its twin keep answering, a method call to it is answered at its
// timeout, other devices' twins are served, and the device is disconnected as not reading.
// Before the outbound queue, the desired notification was written under the twin store's lock
// and PATCHes to its twin hung once the socket buffers were full.
func TestDeviceThatStopsReadingStallsNothing(t *testing.T) {
	e := newEnv(t, func(c *hubsim.Config) {
		c.DeviceOutboundBytes = 256 << 10
		c.DeviceWriteTimeout = 2 * time.Second
	})
	stalled, other := e.createSAS("stalled"), e.createSAS("other")
	rc := e.connectSAS(stalled)
	rc.subscribe(1, wire.TwinDesiredFilter, wire.MethodsFilter)
	// From here on rc is never read.

	mark := e.ev.mark()
	blob := strings.Repeat("x", 4000) // a twin string value may hold 4 KB
	var call <-chan response
	disconnected := func() (broker.Event, bool) {
		e.ev.mu.Lock()
		defer e.ev.mu.Unlock()
		for _, ev := range e.ev.list[mark:] {
			if ev.Kind == broker.EventDisconnected && ev.DeviceID == stalled.DeviceID {
				return ev, true
			}
		}
		return broker.Event{}, false
	}
	var ev broker.Event
	for i := 0; ; i++ {
		if i == 1000 {
			t.Fatal("1000 desired patches (20 MB) written to a device that does not read, and it is still connected")
		}
		// About 20 KB per patch: five strings, each changed so each patch is a real change.
		body := fmt.Sprintf(`{"properties":{"desired":{"b0":"%[1]d%[2]s","b1":"%[1]d%[2]s","b2":"%[1]d%[2]s","b3":"%[1]d%[2]s","b4":"%[1]d%[2]s"}}}`, i, blob)
		if r := e.do("PATCH", "/twins/stalled?api-version=2021-04-12", []byte(body), ""); r.status != 200 {
			t.Fatalf("PATCH %d of the stalled device's twin: %d %s", i, r.status, r.body)
		}
		if i == 3 {
			call = e.invokeAsync("stalled", `{"methodName":"m","payload":null,"responseTimeoutInSeconds":5}`)
		}
		var ok bool
		if ev, ok = disconnected(); ok {
			break
		}
	}
	if !strings.HasPrefix(ev.Reason, broker.ReasonNotReading) {
		t.Fatalf("stalled device disconnected for %q, want %q...", ev.Reason, broker.ReasonNotReading)
	}
	r := await(t, call)
	if r.status != 504 && r.status != 404 {
		t.Fatalf("method call to the stalled device: %d %s, want 504 (timeout) or 404 (gone)", r.status, r.body)
	}
	if r := e.do("GET", "/twins/stalled?api-version=2021-04-12", nil, ""); r.status != 200 {
		t.Fatalf("GET of the stalled device's twin: %d", r.status)
	}
	if r := e.do("PATCH", "/twins/other?api-version=2021-04-12", []byte(`{"properties":{"desired":{"a":1}}}`), ""); r.status != 200 {
		t.Fatalf("PATCH of another twin: %d", r.status)
	}
	_ = other
}
