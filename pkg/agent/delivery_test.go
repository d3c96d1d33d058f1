package agent

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/methods"
)

// burst delivers, as the session's delivery goroutine does (one goroutine calling the callbacks
// in order), 100 calls to an unknown method and then a desired patch, and checks the patch
// reached the twin sync without waiting for the refusals.
func burst(t *testing.T, hc *hub.Config, logs *observer.ObservedLogs, waiting func() int32) {
	t.Helper()
	ctx := context.Background()
	delivered := make(chan struct{})
	go func() {
		defer close(delivered)
		for i := range 100 {
			hc.OnMethod(ctx, &hub.MethodRequest{Name: "nope", RequestID: fmt.Sprint(i), Payload: []byte(`{}`)})
		}
		hc.OnDesired(ctx, &hub.DesiredPatch{Version: 2, Body: []byte(`{"interval":5,"$version":2}`)})
	}()
	select {
	case <-delivered:
	case <-time.After(10 * time.Second):
		t.Fatalf("the desired patch after 100 unknown-method calls was not delivered (%d answers waiting on the lost connection)", waiting())
	}
	found := false
	for _, e := range logs.FilterMessage("desired properties patch").All() {
		if fmt.Sprint(e.ContextMap()["version"]) == "2" {
			found = true
		}
	}
	if !found {
		t.Fatal("the desired patch did not reach the twin sync")
	}
	if n := logs.FilterMessage("direct method not implemented").Len(); n != 100 {
		t.Fatalf("%d calls refused as not implemented, want 100", n)
	}
}

func testDevice(t *testing.T) (*Device, *observer.ObservedLogs) {
	core, logs := observer.New(zap.DebugLevel)
	c := Default()
	c.ConnectionString = "HostName=hub.example;DeviceId=dev1;SharedAccessKey=" + base64.StdEncoding.EncodeToString(make([]byte, 32))
	c.Address = "127.0.0.1:1" // nothing listens: the session never connects
	d, err := New(c, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	return d, logs
}

// With the connection gone, a burst of calls to an unknown method does not delay the desired
// patch delivered right after it, even when answering waits for the lost connection until its
// deadline (the dispatcher's fallback: its sender goroutine, and a bounded queue).
func TestRefusalsDoNotDelayDesiredDelivery(t *testing.T) {
	d, logs := testDevice(t)
	var waiting atomic.Int32
	gone := func(ctx context.Context, _ string, _ int, _ []byte) error {
		waiting.Add(1)
		<-ctx.Done()
		return ctx.Err()
	}
	disp := d.newDispatcher(gone, nil, func() {}, func() {})
	defer disp.Close()
	ts, err := d.newSync(lazySession{new(atomic.Pointer[hub.Session])})
	if err != nil {
		t.Fatal(err)
	}
	var hc hub.Config
	d.deliverTo(&hc, ts, disp, newMethodObserver("d", NopObserver{}))
	burst(t, &hc, logs, waiting.Load)
	if !strings.Contains(fmt.Sprint(logs.FilterMessageSnippet("refusal dropped").All()), "too many refusals") {
		t.Fatal("no refusal dropped beyond the queue's limit")
	}
}

// The same through the device's own wiring and a real session that is not connected: refusals
// go out through hub.Session.RespondMethodAsync, which fails at once.
func TestRefusalsDoNotDelayDesiredDeliveryThroughSession(t *testing.T) {
	d, logs := testDevice(t)
	var ref atomic.Pointer[hub.Session]
	disp := d.newDispatcher(sessionResponder(&ref), sessionRefuser(&ref), func() {}, func() {})
	defer disp.Close()
	ts, err := d.newSync(lazySession{&ref})
	if err != nil {
		t.Fatal(err)
	}
	hc := *d.hubConfig()
	hc.Logger = d.log
	d.deliverTo(&hc, ts, disp, newMethodObserver("d", NopObserver{}))
	sess, err := hub.New(hc)
	if err != nil {
		t.Fatal(err)
	}
	ref.Store(sess)
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = sess.Close(ctx)
	}()
	burst(t, &hc, logs, func() int32 { return 0 })
	notSent := logs.FilterMessage(methods.MsgAnswerNotSent).All()
	if len(notSent) != 100 {
		t.Fatalf("%d refusals reported not sent, want 100", len(notSent))
	}
	if err := fmt.Sprint(notSent[0].ContextMap()["error"]); !strings.Contains(err, "not connected") {
		t.Fatalf("refusal failed with %q, want the session's not-connected error", err)
	}
}
