package fleet

import (
	"context"
	"sync"
)

// DefaultConnectSlots is how many hub connection attempts a fleet has in flight at once unless
// Options.ConnectSlots says otherwise. Every device of a fleet starts at once and the token
// bucket (connectRate) admits them as fast as it is set to, so without a bound thousands of TCP
// and TLS handshakes ran side by side: each took seconds instead of tens of milliseconds, and
// meanwhile held its buffers, handshake state and a deep goroutine stack, which the garbage
// collector marked on every cycle and which left the heap fragmented. 128 attempts keep both
// cores of a test machine busy against a local hub (measured at 2,000 devices: 32 and 128
// alike, 8 too few), and at a real hub's ~300 ms per connect still allow ~400 connects/s.
const DefaultConnectSlots = 128

// connectSlots bounds the hub connection attempts in flight: a device takes a slot after its
// connect-rate token (Shared.BeforeConnect) and gives it back at its next connection status
// (connected, or the attempt failed), at a DPS result, or when the attempt's context ends,
// whichever comes first; giving back twice is harmless. Every slot taken is one value in sem
// and a device holds at most one, so sem never holds fewer values than devices hold slots and
// giving one back never blocks.
type connectSlots struct {
	sem  chan struct{}
	held []slotHold // by device slot (counters.index)
}

type slotHold struct {
	mu   sync.Mutex
	held bool
	stop func() bool // unregisters the context.AfterFunc that gives the slot back
}

func newConnectSlots(n, devices int) *connectSlots {
	return &connectSlots{sem: make(chan struct{}, n), held: make([]slotHold, devices)}
}

// acquire waits for a slot for device i until ctx ends (then its error).
func (s *connectSlots) acquire(ctx context.Context, i int) error {
	// A slot the device's last attempt has not given back yet (its status may still be on the
	// way) is given back first: waiting while holding one could leave every slot held by a
	// waiting device.
	s.release(i)
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	h := &s.held[i]
	h.mu.Lock()
	if h.held {
		// Another acquire of the same device's raced this one (a device makes one attempt at
		// a time, so this is not expected): keep one slot (the channel holds at least the one
		// just taken, so this does not block).
		h.stop()
		<-s.sem
	}
	h.held = true
	h.stop = context.AfterFunc(ctx, func() { s.release(i) })
	h.mu.Unlock()
	return nil
}

// release gives device i's slot back, if it holds one.
func (s *connectSlots) release(i int) {
	h := &s.held[i]
	h.mu.Lock()
	if !h.held {
		h.mu.Unlock()
		return
	}
	h.held = false
	stop := h.stop
	h.stop = nil
	h.mu.Unlock()
	stop()
	<-s.sem
}

// inUse is the number of slots taken.
func (s *connectSlots) inUse() int { return len(s.sem) }
