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
)

// With the connection gone, a burst of calls to an unknown method does not delay the desired
// patch delivered right after it: the session's delivery goroutine (played here by one
// goroutine calling the callbacks in order, as hub.Session does) never waits for an answer.
func TestRefusalsDoNotDelayDesiredDelivery(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	c := Default()
	c.ConnectionString = "HostName=hub.example;DeviceId=dev1;SharedAccessKey=" + base64.StdEncoding.EncodeToString(make([]byte, 32))
	d, err := New(c, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	// The connection is gone: an answer waits for a reconnect until its deadline, as
	// RespondMethod does (30 s by default).
	var waiting atomic.Int32
	gone := func(ctx context.Context, _ string, _ int, _ []byte) error {
		waiting.Add(1)
		<-ctx.Done()
		return ctx.Err()
	}
	disp := d.newDispatcher(gone, func() {}, func() {})
	defer disp.Close()
	ts, err := d.newSync(lazySession{new(atomic.Pointer[hub.Session])})
	if err != nil {
		t.Fatal(err)
	}
	var hc hub.Config
	d.deliverTo(&hc, ts, disp)

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
		t.Fatalf("the desired patch after 100 unknown-method calls was not delivered (%d answers waiting on the lost connection)", waiting.Load())
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
	if !strings.Contains(fmt.Sprint(logs.FilterMessageSnippet("refusal dropped").All()), "too many refusals") {
		t.Fatal("no refusal dropped beyond the queue's limit")
	}
}
