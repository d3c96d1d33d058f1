package hub_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"runtime"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/sas"
)

func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// settledGoroutines returns the goroutine count once it stops changing.
func settledGoroutines() int {
	last := runtime.NumGoroutine()
	for range 50 {
		time.Sleep(20 * time.Millisecond)
		n := runtime.NumGoroutine()
		if n == last {
			return n
		}
		last = n
	}
	return last
}

// TestGoroutineBudget checks that a connected session costs at most one goroutine more than a
// bare paho client connected to the same broker with the same options.
func TestGoroutineBudget(t *testing.T) {
	if testing.Short() {
		t.Skip("measures goroutines")
	}
	b := hubtest.NewBroker(t)
	const n = 10
	base := settledGoroutines()
	heap0 := heapInUse()

	var bare []paho.Client
	for i := range n {
		id := fmt.Sprintf("bare%d", i)
		tok, err := sas.Build(context.Background(), b.Key, sas.Params{Resource: sas.DeviceResource(hubtest.Host, id), Expiry: time.Now().Add(time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		o := paho.NewClientOptions().AddBroker("ssl://" + b.Addr).SetClientID(id).
			SetUsername(hubtest.Host + "/" + id + "/?api-version=2021-04-12").SetPassword(tok).
			SetCleanSession(false).SetAutoReconnect(false).SetProtocolVersion(4).SetKeepAlive(120 * time.Second).
			SetTLSConfig(&tls.Config{RootCAs: b.CAPool, ServerName: hubtest.Host, MinVersion: tls.VersionTLS12})
		c := paho.NewClient(o)
		if tk := c.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			t.Fatalf("bare connect: %v", tk.Error())
		}
		bare = append(bare, c)
	}
	bareN := settledGoroutines() - base
	bareHeap := int64(heapInUse()) - int64(heap0)
	for _, c := range bare {
		c.Disconnect(250)
	}
	base = settledGoroutines()
	heap0 = heapInUse()

	var sessions []*hub.Session
	for i := range n {
		cfg := baseConfig(b)
		cfg.DeviceID = fmt.Sprintf("dev%d", i)
		s, err := hub.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		sessions = append(sessions, s)
		if err := s.WaitConnected(ctxT(t)); err != nil {
			t.Fatal(err)
		}
	}
	// Goroutines that only pass through (a SUBACK being waited for, the broker's side of a
	// connect still finishing) settle under load at their own pace: wait, with a deadline, for
	// the count to come within the budget rather than judging one sample. A session that costs
	// more for good never does, and the test fails with the last count.
	var sessN int
	waitfor.NoError(t, "the sessions' goroutines within budget", func() error {
		sessN = runtime.NumGoroutine() - base
		if extra := float64(sessN-bareN) / n; extra > 1 {
			return fmt.Errorf("a session adds %.1f goroutines over a bare paho client, budget 1", extra)
		}
		return nil
	})
	sessHeap := int64(heapInUse()) - int64(heap0)
	for _, s := range sessions {
		if err := s.Close(context.Background()); err != nil {
			t.Error(err)
		}
	}
	t.Logf("per device, broker side included: goroutines bare paho %.1f, session %.1f; heap bare %d KiB, session %d KiB",
		float64(bareN)/n, float64(sessN)/n, bareHeap/n/1024, sessHeap/n/1024)
}
