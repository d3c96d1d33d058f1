package metrics_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/metrics"
	"github.com/iothubby/iothubby/pkg/metrics/metricstest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func serve(t *testing.T, h http.Handler) string {
	t.Helper()
	s, err := metrics.Listen("127.0.0.1:0", h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Error(err)
		}
	})
	return "http://" + s.Addr()
}

func TestEventsMoveMetrics(t *testing.T) {
	m := metrics.New(metrics.Config{Methods: []string{"ping"}})
	base := serve(t, metrics.Handler(m, nil))
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

	m.Provisioned("d1", "registered", nil)
	m.Provisioned("d2", "cached", nil)
	m.ConnectAttempt("d1", t0)
	m.ConnectionStatus("d1", hub.Status{State: hub.Connected, Reason: hub.ConnectionOK, At: t0.Add(250 * time.Millisecond)})
	m.ConnectionStatus("d2", hub.Status{State: hub.Connected, Reason: hub.ConnectionOK, At: t0})
	m.ConnectionStatus("d2", hub.Status{State: hub.DisconnectedRetrying, Reason: hub.NoNetwork, At: t0})
	m.ConnectionStatus("d2", hub.Status{State: hub.DisconnectedRetrying, Reason: hub.IdentityInUse, At: t0})
	for range 3 {
		m.TelemetrySent("d1")
	}
	m.TelemetryDone("d1", 10*time.Millisecond, nil)
	m.TelemetryDone("d1", 0, fmt.Errorf("wrapped: %w", hub.ErrQueueFull))
	m.C2DReceived("d1")
	m.DesiredReceived("d1", 7)
	m.TwinRequest("d1", "patch", 5*time.Millisecond, nil)
	m.TwinRequest("d1", "patch", 0, errors.New("status 400"))
	m.TwinRequest("d1", "get", 5*time.Millisecond, nil)
	m.MethodAnswered("d1", "ping", 200, time.Millisecond)
	m.MethodAnswered("d1", "evil-"+strings.Repeat("x", 10), 501, time.Millisecond)
	m.MethodAnswered("d1", "another-unknown", 501, time.Millisecond)

	f, err := metricstest.Scrape(t.Context(), base+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"iothubby_provisioning_total", []string{"result", "registered"}, 1},
		{"iothubby_provisioning_total", []string{"result", "cached"}, 1},
		{"iothubby_devices", []string{"status", "Connected"}, 1},
		{"iothubby_devices", []string{"status", "Disconnected_Retrying"}, 1},
		{"iothubby_devices", []string{"status", "Disconnected"}, 0},
		{"iothubby_connects_total", nil, 2},
		{"iothubby_disconnects_total", []string{"reason", "No_Network"}, 1},
		{"iothubby_disconnects_total", []string{"reason", "Identity_In_Use"}, 1},
		{"iothubby_connect_seconds", nil, 1}, // only d1 announced its attempt
		{"iothubby_telemetry_sent_total", nil, 3},
		{"iothubby_telemetry_acknowledged_total", nil, 1},
		{"iothubby_telemetry_failed_total", []string{"reason", "queue_full"}, 1},
		{"iothubby_telemetry_queued", nil, 1},
		{"iothubby_telemetry_puback_seconds", nil, 1},
		{"iothubby_c2d_received_total", nil, 1},
		{"iothubby_desired_versions_total", nil, 1},
		{"iothubby_reported_patches_total", []string{"result", "ok"}, 1},
		{"iothubby_reported_patches_total", []string{"result", "error"}, 1},
		{"iothubby_twin_roundtrip_seconds", []string{"op", "get"}, 1},
		{"iothubby_twin_roundtrip_seconds", []string{"op", "patch"}, 1},
		{"iothubby_method_calls_total", []string{"method", "ping", "status", "200"}, 1},
		{"iothubby_method_calls_total", []string{"method", "other", "status", "501"}, 2},
		{"iothubby_method_seconds", []string{"method", "ping"}, 1},
	} {
		got, ok := f.Value(c.name, c.labels...)
		if !ok || got != c.want {
			t.Errorf("%s%v = %v (present %v), want %v", c.name, c.labels, got, ok, c.want)
		}
	}
	// Cardinality stays bounded: unknown method names fold into "other".
	if got := f.LabelValues("iothubby_method_calls_total", "method"); !slices.Equal(got, []string{"other", "ping"}) {
		t.Errorf("method labels = %v, want [other ping]", got)
	}
	// connect time is the attempt's 250 ms.
	if h := f["iothubby_connect_seconds"].GetMetric()[0].GetHistogram(); h.GetSampleSum() != 0.25 {
		t.Errorf("connect_seconds sum = %v, want 0.25", h.GetSampleSum())
	}

	// A device closed by the application leaves the gauge.
	m.ConnectionStatus("d1", hub.Status{State: hub.Disabled, Reason: hub.ClientClose})
	f, err = metricstest.Scrape(t.Context(), base+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if got := f.Get("iothubby_devices", "status", "Connected"); got != 0 {
		t.Errorf("Connected after Disabled = %v, want 0", got)
	}
}

func TestFailureReason(t *testing.T) {
	for err, want := range map[error]string{
		fmt.Errorf("x: %w", hub.ErrMessageExpired): "expired",
		hub.ErrClosed:                "closed",
		&hub.ConnackError{Code: 5}:   "not_authorized",
		errors.New("something else"): "other",
		hub.ErrMessageTooLarge:       "too_large",
	} {
		if got := metrics.FailureReason(err); got != want {
			t.Errorf("FailureReason(%v) = %q, want %q", err, got, want)
		}
	}
}

func TestProbes(t *testing.T) {
	m := metrics.New(metrics.Config{})
	ready := errors.New("not connected")
	base := serve(t, metrics.Handler(m, &metrics.Probes{Ready: func() error { return ready }}))
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d, want 200", code)
	}
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "not connected") {
		t.Errorf("/readyz = %d %q, want 503 naming the reason", code, body)
	}
	ready = nil
	if code, _ := get("/readyz"); code != 200 {
		t.Errorf("/readyz = %d, want 200 once ready", code)
	}
	if code, _ := get("/nothing"); code != 404 {
		t.Errorf("/nothing = %d, want 404", code)
	}
}
