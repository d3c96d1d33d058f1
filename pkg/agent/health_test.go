package agent

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/metrics"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// /readyz is false until the device is connected and its twin synced; /healthz goes unhealthy
// while the telemetry loop is wedged (a test hook blocks it) and healthy again once released.
func TestHealthEndpoints(t *testing.T) {
	b := hubtest.NewBroker(t)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, b.CAPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	c := Default()
	c.ConnectionString = "HostName=" + hubtest.Host + ";DeviceId=dev1;SharedAccessKey=BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc="
	c.Address = b.Addr
	c.TLS.CAFile = ca
	c.Telemetry.Interval = 20 * time.Millisecond
	m := metrics.New(metrics.Config{})
	c.Shared.Observer = m
	d, err := New(c, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	wedge := make(chan struct{})
	wedged := make(chan struct{}, 1)
	var block = make(chan bool, 1) // true: the next telemetry send blocks on wedge
	d.testBeforeTelemetry = func() {
		select {
		case <-block:
			wedged <- struct{}{}
			<-wedge
		default:
		}
	}
	srv, err := metrics.Listen("127.0.0.1:0", metrics.Handler(m, &metrics.Probes{
		Live:  func() error { return d.Liveness().Check(50 * time.Millisecond) },
		Ready: d.Ready,
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Close(context.Background()) }()
	base := "http://" + srv.Addr()

	// Before Run: not ready, and says why.
	if code, body := get(t, base+"/readyz"); code != 503 || !strings.Contains(body, "not connected") {
		t.Fatalf("/readyz before Run = %d %q, want 503 not connected", code, body)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	defer func() {
		cancel()
		<-done
		d.Close()
	}()
	waitfor.True(t, "/readyz 200", func() bool { code, _ := get(t, base+"/readyz"); return code == 200 })
	// A twin round trip under load can outlast the 50ms bound for a moment: wait for healthy.
	waitfor.True(t, "/healthz 200 while running", func() bool { code, _ := get(t, base+"/healthz"); return code == 200 })

	block <- true
	<-wedged
	waitfor.True(t, "/healthz 503 naming the telemetry loop", func() bool {
		code, body := get(t, base+"/healthz")
		return code == 503 && strings.Contains(body, LoopTelemetry)
	})
	close(wedge)
	waitfor.True(t, "/healthz 200 after the loop moves again", func() bool { code, _ := get(t, base+"/healthz"); return code == 200 })
}
