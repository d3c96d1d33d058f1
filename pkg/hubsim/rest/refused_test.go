package rest

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

type fixedClock struct{ t time.Time }

func (c fixedClock) Now() time.Time                       { return c.t }
func (c fixedClock) NewTicker(time.Duration) *time.Ticker { return time.NewTicker(time.Hour) }

// A flood of refused requests is logged sampled: the first refusedFirst of a second, then one in
// refusedThereafter. Every entry here falls in one second of the logger's clock.
func TestRefusedRequestsLogSampled(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	log := zap.New(core, zap.WithClock(fixedClock{time.Unix(1_800_000_000, 0)}))
	h := NewHandler(Config{HostName: "hub.example"}, log)
	const n = 500
	for range n {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/devices?api-version=2021-04-12", nil))
		if rec.Code != http.StatusUnauthorized {
			t.Fatalf("status %d, want 401", rec.Code)
		}
	}
	got := logs.FilterMessage(LogRequestRefused).Len()
	if got != refusedFirst {
		t.Fatalf("%d refusals logged out of %d, want the first %d of the second", got, n, refusedFirst)
	}
	if e := logs.FilterMessage(LogRequestRefused).All()[0]; e.ContextMap()["error"] == nil {
		t.Errorf("refusal logged without its reason: %v", e.ContextMap())
	}
}
