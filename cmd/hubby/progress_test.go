package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/wire"
)

// The limiter spaces calls 1/rate apart, from the first call on, and gives up when the context ends.
func TestLimiterSpacesCalls(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newLimiter(clock.Real(), 10)
		start := time.Now()
		for range 5 {
			if err := l.wait(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		if got := time.Since(start); got != 400*time.Millisecond {
			t.Fatalf("5 calls at 10/s took %v, want 400ms", got)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := l.wait(ctx); err == nil {
			t.Fatal("wait with a cancelled context succeeded")
		}
		if err := newLimiter(clock.Real(), 0).wait(context.Background()); err != nil || time.Since(start) != 400*time.Millisecond {
			t.Fatalf("unlimited: %v after %v", err, time.Since(start))
		}
	})
}

// Without a terminal, progress is a line at every tenth of the way and at the end.
func TestProgressLines(t *testing.T) {
	var buf bytes.Buffer
	g := &globals{stderr: &buf}
	p := g.newProgress("work", 25)
	for i := range 25 {
		p.add(i%10 != 0)
	}
	p.finish()
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 13 || lines[0] != "work: 2/25 done, 1 failed" || lines[12] != "work: 25/25 done, 3 failed" {
		t.Fatalf("progress lines:\n%s", buf.String())
	}
}

func TestReadIDs(t *testing.T) {
	ids, err := readIDs(strings.NewReader("# c\na\n\n {\"deviceId\":\"b\"}\n{\"id\":\"c\"}\n"))
	if err != nil || strings.Join(ids, ",") != "a,b,c" {
		t.Fatalf("%v %v", ids, err)
	}
	for _, bad := range []string{"a b\n", "{\"x\":1}\n", "{nope\n", strings.Repeat("x", 129)} {
		if _, err := readIDs(strings.NewReader(bad)); err == nil {
			t.Errorf("readIDs(%q) accepted", bad)
		}
	}
}

// --progress bar draws schollz/progressbar's bar (what a terminal gets); none prints nothing.
func TestProgressBarAndNone(t *testing.T) {
	var buf bytes.Buffer
	g := &globals{stderr: &buf, progress: "bar"}
	p := g.newProgress("work", 3)
	p.add(true)
	p.add(false)
	p.add(true)
	p.finish()
	// the bar throttles redraws and clears itself at the end: its first frame is what is certain
	if out := buf.String(); !strings.Contains(out, "work  33% |█") || !strings.Contains(out, "(1/3)") {
		t.Fatalf("bar output %q", out)
	}
	buf.Reset()
	g.progress = "none"
	p = g.newProgress("work", 3)
	p.add(true)
	p.finish()
	if buf.Len() != 0 {
		t.Fatalf("--progress none printed %q", buf.String())
	}
}

// A throttled request (429) is retried after a backoff, up to --retries times; other errors are not.
func TestAttemptRetriesThrottling(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := &globals{}
		tf := &targetFlags{retries: 3}
		lim := newLimiter(clock.Real(), 0)
		calls := 0
		o := g.attempt(context.Background(), tf, lim, "d1", func(context.Context, string) outcome {
			calls++
			if calls < 3 {
				return failure(wire.ErrThrottled.WithText("slow down"))
			}
			return outcome{OK: true}
		})
		if !o.OK || calls != 3 || o.DeviceID != "d1" {
			t.Fatalf("after two 429s: %+v in %d calls", o, calls)
		}
		calls = 0
		o = g.attempt(context.Background(), tf, lim, "d2", func(context.Context, string) outcome {
			calls++
			return failure(wire.ErrThrottled.WithText("slow down"))
		})
		if o.OK || calls != 4 || !strings.Contains(o.Error, "429 ThrottlingException") {
			t.Fatalf("always throttled: %+v in %d calls, want 4", o, calls)
		}
		calls = 0
		o = g.attempt(context.Background(), tf, lim, "d3", func(context.Context, string) outcome {
			calls++
			return failure(wire.ErrDeviceNotFound.WithText("nope"))
		})
		if o.OK || calls != 1 {
			t.Fatalf("404 retried: %+v in %d calls", o, calls)
		}
	})
}
