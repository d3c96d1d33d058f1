package soak

import (
	"fmt"
	"math"
	"sort"
	"time"
)

// DesiredEvent is one line of an agent's twin log, in order: a desired version applied, the
// hub's twin found older than the applied version (hubsim lost state), or a new agent process.
type DesiredEvent struct {
	Kind    DesiredKind
	Version int64
}

// DesiredKind tells DesiredEvents apart.
type DesiredKind int

// The kinds of DesiredEvent.
const (
	Applied  DesiredKind = iota // "desired version applied"
	WentBack                    // "desired version went back; applying the hub's twin"
	Restart                     // a new agent process (its twin state was persisted)
)

// CheckDesiredOrder checks that desired versions were applied in increasing order: within one
// process each applied version is above the one before, except right after the hub's twin
// went back (hubsim lost its last changes to a SIGKILL); after a restart the last version may be
// applied once more (the agent died between applying and persisting it). It returns the number
// of versions applied and the first violation.
func CheckDesiredOrder(evs []DesiredEvent) (int, error) {
	var last int64 = -1
	n := 0
	reapplyOK, backOK := false, false
	for i, e := range evs {
		switch e.Kind {
		case Restart:
			reapplyOK = true
		case WentBack:
			backOK = true
		case Applied:
			n++
			switch {
			case e.Version > last:
			case backOK:
			case reapplyOK && e.Version == last:
			default:
				return n, fmt.Errorf("event %d: desired version %d applied after %d", i, e.Version, last)
			}
			last = e.Version
			reapplyOK, backOK = false, false
		}
	}
	return n, nil
}

// Slope is the least-squares slope of v over t (units of v per second); 0 with fewer than 3
// points.
func Slope(t []time.Duration, v []float64) float64 {
	n := len(t)
	if n < 3 || len(v) != n {
		return 0
	}
	var st, sv float64
	for i := range t {
		st += t[i].Seconds()
		sv += v[i]
	}
	mt, mv := st/float64(n), sv/float64(n)
	var num, den float64
	for i := range t {
		dt := t[i].Seconds() - mt
		num += dt * (v[i] - mv)
		den += dt * dt
	}
	if den == 0 {
		return 0
	}
	return num / den
}

// Percentile returns the p-th percentile (0..100, nearest rank) of ds; 0 for none.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	r := int(math.Ceil(p / 100 * float64(len(s))))
	r = min(max(r, 1), len(s))
	return s[r-1]
}

// Growth is a resource series' fitted growth over a span, against its bound.
type Growth struct {
	Process, Series string
	Samples         int
	Span            time.Duration
	Growth          float64 // slope × span
	Bound           float64
}

// OK reports whether the growth is within the bound.
func (g Growth) OK() bool { return g.Growth <= g.Bound }

// FitGrowth fits the slope of the samples and projects it over their span.
func FitGrowth(process, series string, t []time.Duration, v []float64, bound float64) Growth {
	g := Growth{Process: process, Series: series, Samples: len(t), Bound: bound}
	if len(t) > 0 {
		g.Span = t[len(t)-1] - t[0]
	}
	g.Growth = Slope(t, v) * g.Span.Seconds()
	return g
}
