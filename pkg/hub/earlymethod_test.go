package hub_test

import (
	"context"
	"testing"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
)

// The hub may send a method request as soon as the subscription is live, before the client has
// read the SUBACK. An answer given at once must still reach the hub: it was dropped as stale
// (the session had no current connection yet), and the caller got a 504. Seen as a flaky
// TestJobSurvivesAHubsimRestart.
func TestMethodRequestBeforeSubackIsAnswered(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	b.With(func(h *hubtest.Hook) { h.MethodBeforeSuback = "early" })
	var s *hub.Session
	ready := make(chan struct{}) // closed once s is set: the session starts connecting in start
	answered := make(chan error, 1)
	f := start(t, b, func(c *hub.Config) {
		c.OnMethod = func(_ context.Context, r *hub.MethodRequest) {
			<-ready
			answered <- s.RespondMethodAsync(r.RequestID, 200, []byte(`{"early":true}`))
		}
	})
	s = f.s
	close(ready)
	if err := <-answered; err != nil {
		t.Fatalf("answer to a request that arrived before the SUBACK: %v", err)
	}
	b.WaitEvent(t, "method-response")
	b.With(func(h *hubtest.Hook) {
		if len(h.MethodResponses) != 1 || h.MethodResponses[0].RequestID != "early" || h.MethodResponses[0].Status != 200 {
			t.Errorf("method responses %+v", h.MethodResponses)
		}
	})
}
