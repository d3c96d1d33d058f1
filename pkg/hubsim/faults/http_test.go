package faults

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/clock"
)

// FuzzServeAdminPost: any POST body gets 200 with a valid rule or 400, never a panic, and an
// accepted refuse-connect rule is within its documented bounds.
func FuzzServeAdminPost(f *testing.F) {
	f.Add(`{"action":"drop"}`)
	f.Add(`{"action":"refuse-connect","deviceId":"d","code":3,"durationSecs":30,"probability":0.5,"seed":42}`)
	f.Add(`{"action":"refuse-connect","durationSecs":1e308,"probability":-1}`)
	f.Add(`[`)
	f.Add(`{"action":"rest-error","code":429,"retryAfterSecs":7,"pathPrefix":"/devices","method":"put","durationSecs":9}`)
	f.Add(`{"action":"stall","deviceId":"d","durationSecs":5}`)
	f.Add(`{"action":"token-expire","delaySecs":3}`)
	f.Add(`{"action":"c2d-duplicate","count":2}`)
	f.Add(`{"action":"puback-delay","delaySecs":1e9,"durationSecs":1}`)
	f.Fuzz(func(t *testing.T, body string) {
		in := New(clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)), nil)
		defer in.Close()
		in.SetConns(nopConns{})
		w := httptest.NewRecorder()
		in.ServeAdmin(w, httptest.NewRequest(http.MethodPost, "/hubsim/faults", strings.NewReader(body)), []string{"hubsim", "faults"})
		switch w.Code {
		case http.StatusOK, http.StatusBadRequest:
		default:
			t.Fatalf("status %d for %q", w.Code, body)
		}
		for _, r := range in.Status().Rules {
			if err := ruleInBounds(r); err != nil {
				t.Fatalf("rule out of bounds: %+v: %v", r, err)
			}
		}
	})
}

// TestWrapRESTHeldRequestAnsweredOnClose: a request held by rest-delay gets a 503 (not an empty
// answer) when hubsim stops, without waiting for the delay; /hubsim/ paths are never held.
func TestWrapRESTHeldRequestAnsweredOnClose(t *testing.T) {
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	in := New(clk, nil)
	if _, err := in.Apply(RuleRequest{Action: ActionRESTDelay, DelaySecs: 3600, DurationSecs: 3600}); err != nil {
		t.Fatal(err)
	}
	served := 0
	h := in.WrapREST(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { served++; w.WriteHeader(204) }))
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/hubsim/faults", nil))
	if w.Code != 204 {
		t.Fatalf("/hubsim/faults under rest-delay: %d", w.Code)
	}
	done := make(chan *httptest.ResponseRecorder)
	go func() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/devices/d1", nil))
		done <- w
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := clk.WaitArmed(ctx, 1); err != nil {
		t.Fatal(err)
	}
	in.Close()
	w = <-done
	if w.Code != 503 || w.Header().Get("Retry-After") != "1" || !strings.Contains(w.Body.String(), "request held by rest-delay") || served != 1 {
		t.Fatalf("held request on close: %d %q %s (served %d)", w.Code, w.Header().Get("Retry-After"), w.Body, served)
	}
}
