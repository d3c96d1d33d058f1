package fleet

import (
	"context"
	"crypto/tls"
	"fmt"
	"testing"
	"time"

	"github.com/iothubby/iothubby/internal/waitfor"
	"github.com/iothubby/iothubby/pkg/clock"
)

// The fleet's devices offer X25519 (not Go's default hybrid post-quantum key exchange), and a
// device connecting after another resumes the TLS session that device made (one cache per
// fleet), as the hub sees it.
func TestDevicesShareSessionsAndOfferX25519(t *testing.T) {
	const n = 3
	// One token and time standing still: the devices connect one at a time, each only once the
	// one before it has connected (and so holds its session ticket), so every later one resumes.
	clk := clock.NewFake(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	b, f := brokerFleet(t, n, "connectRate: 1\nconnectBurst: 1", Options{Clock: clk})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	for i := 1; i <= n; i++ {
		waitfor.True(t, fmt.Sprintf("%d devices connected", i), func() bool { return f.Progress().EverConnected == i })
		if i < n {
			clk.Advance(time.Second) // the next device's token
		}
	}
	resumed := 0
	for i := range n {
		id := fmt.Sprintf("d%d", i)
		cl := b.Client(id)
		if cl == nil {
			t.Fatalf("%s: no client at the broker", id)
		}
		tc, ok := cl.Net.Conn.(*tls.Conn)
		if !ok {
			t.Fatalf("%s: connection is %T, not TLS", id, cl.Net.Conn)
		}
		st := tc.ConnectionState()
		if st.CurveID != tls.X25519 {
			t.Errorf("%s: key exchange %v, want X25519", id, st.CurveID)
		}
		if st.DidResume {
			resumed++
		}
	}
	if resumed != n-1 {
		t.Errorf("%d of %d devices resumed a session; want every device after the first (%d)", resumed, n, n-1)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
}
