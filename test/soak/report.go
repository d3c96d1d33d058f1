package soak

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// Invariant is one end-of-run check and its outcome.
type Invariant struct {
	Name   string
	OK     bool
	Detail string
}

// Report is what the soak prints at the end.
type Report struct {
	Seed       int64
	Duration   time.Duration
	Agents     int
	Faults     map[string]int // kind -> injected
	Skipped    map[string]int // kind -> not injected (unsupported by this hubsim), with why in SkipWhy
	SkipWhy    map[string]string
	Recoveries []time.Duration // fault end -> agent connected and twin synced again
	// RecoveryByKind is Recoveries by the kind of fault.
	RecoveryByKind map[string][]time.Duration
	Converged      time.Duration // last fault end -> every twin converged
	Telemetry      []DeviceTally
	Methods        map[string]int // outcome -> calls
	Growth         []Growth
	Invariants     []Invariant
}

// Failed returns the invariants that did not hold.
func (r *Report) Failed() []Invariant {
	var out []Invariant
	for _, inv := range r.Invariants {
		if !inv.OK {
			out = append(out, inv)
		}
	}
	return out
}

// Write prints the report as tables.
func (r *Report) Write(w io.Writer) {
	fmt.Fprintf(w, "soak: seed %d, %v, %d agents\n\n", r.Seed, r.Duration.Round(time.Second), r.Agents)
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "fault\tinjected\t")
	for _, k := range sortedKeys(r.Faults) {
		fmt.Fprintf(tw, "%s\t%d\t\n", k, r.Faults[k])
	}
	for _, k := range sortedKeys(r.Skipped) {
		fmt.Fprintf(tw, "%s\t0 (%d skipped: %s)\t\n", k, r.Skipped[k], r.SkipWhy[k])
	}
	tw.Flush()
	fmt.Fprintf(w, "\nrecovery (fault end -> connected and twin synced): n=%d p50=%v p99=%v max=%v\n",
		len(r.Recoveries), Percentile(r.Recoveries, 50).Round(time.Millisecond),
		Percentile(r.Recoveries, 99).Round(time.Millisecond), Percentile(r.Recoveries, 100).Round(time.Millisecond))
	if len(r.RecoveryByKind) > 0 {
		kinds := make([]string, 0, len(r.RecoveryByKind))
		for k := range r.RecoveryByKind {
			kinds = append(kinds, k)
		}
		sort.Strings(kinds)
		tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  by fault\tn\tp50\tp99\t")
		for _, k := range kinds {
			ds := r.RecoveryByKind[k]
			fmt.Fprintf(tw, "  %s\t%d\t%v\t%v\t\n", k, len(ds), Percentile(ds, 50).Round(time.Millisecond), Percentile(ds, 99).Round(time.Millisecond))
		}
		tw.Flush()
	}
	fmt.Fprintf(w, "reported state converged %v after the last fault\n\n", r.Converged.Round(time.Millisecond))

	tw = tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "device\truns\taccepted\treceived\tfailed\tacked-unrecorded\tmissing\tduplicates (bound)\trefused\t")
	for _, t := range r.Telemetry {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d (%d)\t%d\t\n", t.Device, t.Runs, t.Accepted, t.Received, t.Failed,
			t.AckedUnrecorded, t.MissingCount, t.Duplicates, t.DuplicateAllowed, t.Refused)
	}
	tw.Flush()
	var ms []string
	for _, k := range sortedKeys(r.Methods) {
		ms = append(ms, fmt.Sprintf("%s %d", k, r.Methods[k]))
	}
	fmt.Fprintf(w, "\nmethod calls: %s\n\n", strings.Join(ms, ", "))

	tw = tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "process\tseries\tsamples\tspan\tfitted growth\tbound\t")
	for _, g := range r.Growth {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%v\t%.1f\t%.0f\t\n", g.Process, g.Series, g.Samples, g.Span.Round(time.Second), g.Growth, g.Bound)
	}
	tw.Flush()
	fmt.Fprintln(w)

	tw = tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "invariant\tresult\tdetail\t")
	for _, inv := range r.Invariants {
		res := "ok"
		if !inv.OK {
			res = "FAIL"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t\n", inv.Name, res, inv.Detail)
	}
	tw.Flush()
}

func sortedKeys(m map[string]int) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
