package faults

import (
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
	f.Fuzz(func(t *testing.T, body string) {
		in := New(clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)), nil)
		defer in.Close()
		in.SetDropper(func(string) int { return 0 })
		w := httptest.NewRecorder()
		in.ServeAdmin(w, httptest.NewRequest(http.MethodPost, "/hubsim/faults", strings.NewReader(body)), []string{"hubsim", "faults"})
		switch w.Code {
		case http.StatusOK, http.StatusBadRequest:
		default:
			t.Fatalf("status %d for %q", w.Code, body)
		}
		for _, r := range in.Status().Rules {
			if r.Code < 1 || r.Code > 5 || r.Probability <= 0 || r.Probability > 1 {
				t.Fatalf("rule out of bounds: %+v", r)
			}
		}
	})
}
