package fleet

import (
	"context"
	"sync"
	"time"

	"github.com/iothubby/iothubby/pkg/clock"
)

// Limiter is a token bucket shared by every device of a fleet: each hub connection attempt
// and each DPS registration takes one token (agent.Shared.BeforeConnect), on top of the
// device's own backoff with jitter,
// so the fleet opens at most Rate connections per second after its first Burst, at start and
// after a mass disconnect alike.
type Limiter struct {
	clk   clock.Clock
	rate  float64 // tokens per second
	burst float64

	mu     sync.Mutex
	tokens float64
	last   time.Time
}

// NewLimiter returns a full bucket of burst tokens refilled at rate per second.
func NewLimiter(clk clock.Clock, rate float64, burst int) *Limiter {
	if clk == nil {
		clk = clock.Real()
	}
	return &Limiter{clk: clk, rate: rate, burst: float64(burst), tokens: float64(burst), last: clk.Now()}
}

// reserve takes a token now (possibly going into debt) and returns how long the caller must
// wait before the token is its own. Reservations are served in call order.
func (l *Limiter) reserve() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.clk.Now()
	if el := now.Sub(l.last); el > 0 {
		l.tokens = min(l.burst, l.tokens+el.Seconds()*l.rate)
		l.last = now
	}
	l.tokens--
	if l.tokens >= 0 {
		return 0
	}
	return time.Duration(-l.tokens / l.rate * float64(time.Second))
}

// cancel gives back a token reserved by a caller that stopped waiting.
func (l *Limiter) cancel() {
	l.mu.Lock()
	l.tokens = min(l.burst, l.tokens+1)
	l.mu.Unlock()
}

// Wait blocks until the caller may connect, or ctx ends (its error is returned and the token
// given back).
func (l *Limiter) Wait(ctx context.Context) error {
	d := l.reserve()
	if d <= 0 {
		return nil
	}
	t := l.clk.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C():
		return nil
	case <-ctx.Done():
		l.cancel()
		return ctx.Err()
	}
}
