package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/iothubby/iothubby/pkg/clock"
)

// progress reports how far a command over many devices has got: a progress bar when stderr is
// a terminal, otherwise a plain line at every tenth of the way (and at the end).
type progress struct {
	mu       sync.Mutex
	bar      *progressbar.ProgressBar
	w        io.Writer
	label    string
	total    int
	done     int
	failed   int
	nextLine int
}

func (g *globals) newProgress(label string, total int) *progress {
	p := &progress{w: g.stderr, label: label, total: total}
	mode := g.progress
	if mode == "" || mode == "auto" {
		mode = "plain"
		if f, ok := g.stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
			mode = "bar"
		}
	}
	switch mode {
	case "none":
		p.w = io.Discard
	case "bar":
		p.bar = progressbar.NewOptions(total,
			progressbar.OptionSetWriter(g.stderr),
			progressbar.OptionSetDescription(label),
			progressbar.OptionShowCount(),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionClearOnFinish(),
			progressbar.OptionThrottle(100*time.Millisecond),
		)
		return p
	}
	p.nextLine = p.step()
	return p
}

func (p *progress) step() int {
	s := p.total / 10
	if s < 1 {
		s = 1
	}
	return s
}

// add records one device's outcome.
func (p *progress) add(ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done++
	if !ok {
		p.failed++
	}
	if p.bar != nil {
		if !ok {
			p.bar.Describe(fmt.Sprintf("%s (%d failed)", p.label, p.failed))
		}
		_ = p.bar.Add(1)
		return
	}
	if p.done >= p.nextLine || p.done == p.total {
		fmt.Fprintf(p.w, "%s: %d/%d done, %d failed\n", p.label, p.done, p.total, p.failed)
		for p.nextLine <= p.done {
			p.nextLine += p.step()
		}
	}
}

// set shows absolute counts (for a job whose statistics come from the hub).
//
//lint:ignore U1000 hubby's jobs commands (landing next) call it; remove this directive then
func (p *progress) set(done, failed int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if done == p.done && failed == p.failed {
		return
	}
	p.done, p.failed = done, failed
	if p.bar != nil {
		p.bar.Describe(fmt.Sprintf("%s (%d failed)", p.label, failed))
		_ = p.bar.Set(done)
		return
	}
	fmt.Fprintf(p.w, "%s: %d/%d done, %d failed\n", p.label, done, p.total, failed)
}

func (p *progress) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar != nil {
		_ = p.bar.Finish()
	}
}

// limiter spaces calls at most rate per second (0: unlimited). It is safe for concurrent use.
type limiter struct {
	clk      clock.Clock
	interval time.Duration

	mu   sync.Mutex
	next time.Time
}

func newLimiter(clk clock.Clock, rate float64) *limiter {
	l := &limiter{clk: clk}
	if rate > 0 {
		l.interval = time.Duration(float64(time.Second) / rate)
	}
	return l
}

// wait blocks until the caller's turn, or ctx ends.
func (l *limiter) wait(ctx context.Context) error {
	if l.interval == 0 {
		return ctx.Err()
	}
	l.mu.Lock()
	now := l.clk.Now()
	at := l.next
	if at.Before(now) {
		at = now
	}
	l.next = at.Add(l.interval)
	l.mu.Unlock()
	d := at.Sub(now)
	if d <= 0 {
		return ctx.Err()
	}
	t := l.clk.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C():
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
