// Package backoff is the one retry policy used by the hub session's supervisor, the twin sync and
// the DPS client: exponential backoff with full jitter and a floor.
package backoff

import "time"

// Policy is exponential backoff with full jitter and a floor: the wait before retry number
// attempt (0-based) is uniform in [0, min(Max, Min·2^attempt)), raised to Min when below it, so
// attempts are never closer than Min (no hot loop) and never further apart than Max.
type Policy struct {
	Min, Max time.Duration
}

// Delay returns the wait before attempt, given r uniform in [0, 1).
func (b Policy) Delay(attempt int, r float64) time.Duration {
	ceil := b.Ceiling(attempt)
	d := time.Duration(r * float64(ceil))
	if d < b.Min {
		d = b.Min
	}
	if d > b.Max {
		d = b.Max
	}
	return d
}

// Ceiling returns min(Max, Min·2^attempt) without overflowing.
func (b Policy) Ceiling(attempt int) time.Duration {
	if attempt < 0 {
		attempt = 0
	}
	ceil := b.Min
	for i := 0; i < attempt && ceil < b.Max; i++ {
		ceil *= 2
	}
	if ceil > b.Max || ceil <= 0 {
		ceil = b.Max
	}
	return ceil
}
