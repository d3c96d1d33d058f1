package fleet

import (
	"context"
	"crypto/tls"
	"fmt"
	"testing"

	"github.com/iothubby/iothubby/internal/waitfor"
)

// The fleet's devices offer X25519 (not Go's default hybrid post-quantum key exchange), and a
// device connecting after another resumes the TLS session that device made (one cache per
// fleet), as the hub sees it.
func TestDevicesShareSessionsAndOfferX25519(t *testing.T) {
	const n = 3
	// One connection every half second (no burst), so a device finds the ticket of the one
	// before it unless that handshake took longer: at least one of the later two resumes.
	b, f := brokerFleet(t, n, "connectRate: 2\nconnectBurst: 1", Options{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	waitfor.True(t, "every device connected", func() bool { return f.Progress().EverConnected == n })
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
	if resumed == 0 {
		t.Errorf("none of %d devices resumed a session; want the devices after the first to", n)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
}
