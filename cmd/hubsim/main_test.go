package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/pkg/hubsim"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// watchWriter collects output and closes ready when it first contains marker.
type watchWriter struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	marker string
	ready  chan struct{}
	once   sync.Once
}

func (w *watchWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if strings.Contains(w.buf.String(), w.marker) {
		w.once.Do(func() { close(w.ready) })
	}
	return len(p), nil
}

func (w *watchWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

func TestServeWritesAndRemovesEndpoints(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	logs := &watchWriter{marker: hubsim.MsgReady, ready: make(chan struct{})}
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"serve", "--state", dir, "--mqtt-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0", "--amqp-addr", "127.0.0.1:0", "--log-format", "json"}, io.Discard, logs)
	}()
	select {
	case <-logs.ready:
	case err := <-done:
		t.Fatalf("serve exited early: %v\n%s", err, logs)
	case <-time.After(30 * time.Second):
		t.Fatalf("no ready line:\n%s", logs)
	}
	b, err := os.ReadFile(filepath.Join(dir, hubsim.EndpointsFile))
	if err != nil {
		t.Fatal(err)
	}
	var ep hubsim.Endpoints
	if err := json.Unmarshal(b, &ep); err != nil || ep.HubHostName != "localhost" || ep.PID != os.Getpid() ||
		ep.CAFile != filepath.Join(dir, "ca.pem") || !strings.HasPrefix(ep.ServiceConnectionString, "HostName=localhost;SharedAccessKeyName=iothubowner;") {
		t.Fatalf("endpoints %s: %v", b, err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop")
	}
	if _, err := os.Stat(filepath.Join(dir, hubsim.EndpointsFile)); !os.IsNotExist(err) {
		t.Fatalf("endpoints.json remains: %v", err)
	}
	if strings.Contains(logs.String(), strings.TrimPrefix(ep.ServiceConnectionString, "HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=")) {
		t.Fatal("a key reached the log")
	}
}

func TestBadCommandLines(t *testing.T) {
	for _, args := range [][]string{
		{"serve"},
		{"serve", "--state", t.TempDir(), "--log-level", "loud"},
		{"serve", "--state", t.TempDir(), "--log-format", "xml"},
		{"serve", "--state", t.TempDir(), "extra"},
		{"serve", "--state", t.TempDir(), "--max-concurrent-jobs", "0"},
		{"serve", "--state", t.TempDir(), "--job-parallelism", "-1"},
		{"nonsense"},
	} {
		if err := run(context.Background(), args, io.Discard, io.Discard); err == nil {
			t.Errorf("%v: no error", args)
		}
	}
	for _, args := range [][]string{
		{"--tier", "S4"}, {"--tier", "F1", "--units", "2"}, {"--tier", "S1", "--units", "-1"}, {"--units", "2"},
	} {
		dir := t.TempDir()
		err := run(context.Background(), append([]string{"serve", "--state", dir}, args...), io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), "--tier") {
			t.Errorf("%v: error %v, want one naming --tier", args, err)
		}
		if ents, _ := os.ReadDir(dir); len(ents) != 0 {
			t.Errorf("%v: the state directory was used before the tier was refused", args)
		}
	}
}
