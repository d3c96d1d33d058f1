package firmware

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"time"
)

// CommandApplier installs an image by running a program (argv, no shell) with
// $IOTHUBBY_FIRMWARE_IMAGE, $IOTHUBBY_FIRMWARE_VERSION and $IOTHUBBY_FIRMWARE_SLOT set. The
// program writes the inactive slot and arranges for the next boot to use it; a non-zero exit
// fails the update.
type CommandApplier struct {
	Command []string
}

// Apply runs the command.
func (c CommandApplier) Apply(ctx context.Context, image string, m Manifest, slot string) error {
	if len(c.Command) == 0 {
		return errors.New("no apply command configured")
	}
	cmd := exec.CommandContext(ctx, c.Command[0], c.Command[1:]...)
	cmd.Env = append(os.Environ(), "IOTHUBBY_FIRMWARE_IMAGE="+image, "IOTHUBBY_FIRMWARE_VERSION="+m.Version,
		"IOTHUBBY_FIRMWARE_SLOT="+slot)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		line := strings.TrimSpace(stderr.String())
		if i := strings.LastIndexByte(line, '\n'); i >= 0 {
			line = line[i+1:]
		}
		if len(line) > 200 {
			line = line[:200]
		}
		return fmt.Errorf("%s: %w: %s", c.Command[0], err, line)
	}
	return nil
}

// SimulatedApplier pretends to install: it waits Duration (or until ctx ends) and fails with
// probability FailureRate, for load tests and developers who need a fake device.
type SimulatedApplier struct {
	Duration    time.Duration
	FailureRate float64
	// Random returns a float in [0, 1) (default math/rand/v2).
	Random func() float64
}

// Apply simulates the install.
func (s SimulatedApplier) Apply(ctx context.Context, _ string, _ Manifest, _ string) error {
	if s.Duration > 0 {
		t := time.NewTimer(s.Duration)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	r := s.Random
	if r == nil {
		r = rand.Float64
	}
	if s.FailureRate > 0 && r() < s.FailureRate {
		return errors.New("simulated apply failure")
	}
	return nil
}

// RebootFunc adapts a function to Rebooter.
type RebootFunc func(ctx context.Context) error

// Reboot calls f.
func (f RebootFunc) Reboot(ctx context.Context) error { return f(ctx) }
