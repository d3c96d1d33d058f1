package waitfor

import (
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestTrueReturnsOnceTheConditionHolds(t *testing.T) {
	var n atomic.Int32
	True(t, "three looks", func() bool { return n.Add(1) == 3 })
	if n.Load() != 3 {
		t.Fatalf("looked %d times, want 3", n.Load())
	}
}

func TestNoErrorReturnsOnNil(t *testing.T) {
	var n int
	NoError(t, "second try", func() error {
		n++
		if n < 2 {
			return errors.New("not yet")
		}
		return nil
	})
	if n != 2 {
		t.Fatalf("called %d times", n)
	}
}

// recorder is a testing.TB whose Fatalf records instead of stopping the test.
type recorder struct {
	testing.TB
	msg string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.msg = fmt.Sprintf(format, args...)
}

func TestFailureNamesWhatAndTheLastError(t *testing.T) {
	r := &recorder{TB: t}
	poll(r, "the device to appear", func() error { return errors.New("404 DeviceNotFound") }, 20*time.Millisecond)
	if !strings.Contains(r.msg, "the device to appear") || !strings.Contains(r.msg, "404 DeviceNotFound") {
		t.Fatalf("failure message %q names neither what was awaited nor why", r.msg)
	}
}
