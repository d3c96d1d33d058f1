//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/metrics/metricstest"
)

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// agent run --health-addr against a real hubsim: /readyz false while the hub is down and true
// once connected and synced; /metrics (scraped over HTTP and parsed) counts telemetry as it is
// sent and acknowledged, and a disconnect with its reason when hubsim stops.
func TestAgentMetricsAndHealth(t *testing.T) {
	state := t.TempDir()
	mqttAddr, httpsAddr := freeAddr(t), freeAddr(t)
	h := startHub(t, state, mqttAddr, httpsAddr)
	d := createDevice(t, h, "metrics-dev")
	cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	ca := h.ep.CAFile
	if err := h.stop(); err != nil {
		t.Fatalf("hubsim exit: %v", err)
	}
	cfg := fmt.Sprintf("log: {format: json, level: debug}\ntls: {caFile: %q}\ntelemetry: {interval: 200ms}\nconnection: {backoffMin: 1s, backoffMax: 2s}\n", ca)
	cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	a := startProc(t, "agent", "run", "--config", cfgPath, "--connection-string-file", writeSecret(t, "cs", cs),
		"--health-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0")
	i := a.await(0, "the observability server", msgIs("serving observability endpoints"))
	a.mu.Lock()
	addr, _ := a.lines[i]["address"].(string)
	a.mu.Unlock()
	base := "http://" + addr

	a.await(0, "a failed attempt while hubsim is down", msgIs("disconnected, retrying"))
	if code, body := httpGet(t, base+"/readyz"); code != 503 {
		t.Fatalf("/readyz with hubsim down = %d %q, want 503", code, body)
	}
	if code, _ := httpGet(t, base+"/healthz"); code != 200 {
		t.Fatalf("/healthz = %d, want 200 (the loops progress while disconnected)", code)
	}

	h = startHub(t, state, mqttAddr, httpsAddr)
	a.await(0, "connected", msgIs("connected"))
	eventually(t, "/readyz 200 once connected and synced", func() error {
		if code, body := httpGet(t, base+"/readyz"); code != 200 {
			return fmt.Errorf("%d %s", code, body)
		}
		return nil
	})
	scrape := func() metricstest.Families {
		t.Helper()
		f, err := metricstest.Scrape(context.Background(), base+"/metrics")
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	var f metricstest.Families
	eventually(t, "five telemetry messages acknowledged", func() error {
		f = scrape()
		if n := f.Get("iothubby_telemetry_acknowledged_total"); n < 5 {
			return fmt.Errorf("%v acknowledged", n)
		}
		return nil
	})
	sent, acked, queued := f.Get("iothubby_telemetry_sent_total"), f.Get("iothubby_telemetry_acknowledged_total"), f.Get("iothubby_telemetry_queued")
	failed := 0.0
	for _, r := range f.LabelValues("iothubby_telemetry_failed_total", "reason") {
		failed += f.Get("iothubby_telemetry_failed_total", "reason", r)
	}
	if sent != acked+failed+queued {
		t.Errorf("sent %v != acknowledged %v + failed %v + queued %v", sent, acked, failed, queued)
	}
	if got := f.Get("iothubby_devices", "status", "Connected"); got != 1 {
		t.Errorf("devices{Connected} = %v, want 1", got)
	}
	if f.Get("iothubby_connects_total") != 1 || f.Get("iothubby_connect_seconds") != 1 {
		t.Errorf("connects %v, connect_seconds count %v; want 1 and 1", f.Get("iothubby_connects_total"), f.Get("iothubby_connect_seconds"))
	}
	if f.Get("iothubby_twin_roundtrip_seconds", "op", "get") < 1 || f.Get("iothubby_reported_patches_total", "result", "ok") < 1 {
		t.Errorf("twin get %v, reported patches ok %v; want the connect's sync", f.Get("iothubby_twin_roundtrip_seconds", "op", "get"),
			f.Get("iothubby_reported_patches_total", "result", "ok"))
	}
	if f.Get("iothubby_telemetry_puback_seconds") < 5 {
		t.Errorf("puback histogram count %v, want >= 5", f.Get("iothubby_telemetry_puback_seconds"))
	}
	before := f.Get("iothubby_disconnects_total", "reason", "Communication_Error") + f.Get("iothubby_disconnects_total", "reason", "No_Network")

	// hubsim stops: the disconnect is counted with its reason, and the device is not ready.
	mark := a.numLines()
	if err := h.stop(); err != nil {
		t.Fatalf("hubsim exit: %v", err)
	}
	a.await(mark, "the disconnect", msgIs("disconnected, retrying"))
	eventually(t, "the disconnect counted with its reason", func() error {
		f = scrape()
		after := f.Get("iothubby_disconnects_total", "reason", "Communication_Error") + f.Get("iothubby_disconnects_total", "reason", "No_Network")
		if after <= before {
			return fmt.Errorf("disconnects by reason: %v", f.LabelValues("iothubby_disconnects_total", "reason"))
		}
		if f.Get("iothubby_devices", "status", "Connected") != 0 || f.Get("iothubby_devices", "status", "Disconnected_Retrying") != 1 {
			return fmt.Errorf("devices gauge Connected %v Retrying %v", f.Get("iothubby_devices", "status", "Connected"),
				f.Get("iothubby_devices", "status", "Disconnected_Retrying"))
		}
		return nil
	})
	if code, _ := httpGet(t, base+"/readyz"); code != 503 {
		t.Errorf("/readyz after hubsim stopped = %d, want 503", code)
	}
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}
