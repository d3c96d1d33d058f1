package backoff_test

import (
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/backoff"
)

func TestBackoffFullJitterBounds(t *testing.T) {
	t.Parallel()
	b := backoff.Policy{Min: time.Second, Max: 60 * time.Second}
	wantCeil := []time.Duration{1, 2, 4, 8, 16, 32, 60, 60, 60}
	for n, w := range wantCeil {
		if got := b.Ceiling(n); got != w*time.Second {
			t.Errorf("ceiling(%d) = %v, want %v", n, got, w*time.Second)
		}
	}
	for n := range 70 { // far past overflow of Min·2^n
		for _, r := range []float64{0, 0.01, 0.5, 0.999999} {
			d := b.Delay(n, r)
			if d < b.Min {
				t.Errorf("delay(%d, %v) = %v, below the minimum", n, r, d)
			}
			if d > b.Max || d > b.Ceiling(n) && d != b.Min {
				t.Errorf("delay(%d, %v) = %v, above the ceiling %v", n, r, d, b.Ceiling(n))
			}
		}
	}
	// Full jitter: the whole [0, ceiling) range is used, floored at Min.
	if got := b.Delay(5, 0.5); got != 16*time.Second {
		t.Errorf("delay(5, .5) = %v, want 16s", got)
	}
	if got := b.Delay(5, 0); got != time.Second {
		t.Errorf("delay(5, 0) = %v, want the 1s floor", got)
	}
	if got := b.Delay(-1, 0.9); got != time.Second {
		t.Errorf("delay(-1) = %v", got)
	}
}
