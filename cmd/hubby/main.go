// Command hubby is iothubby's fleet CLI: device identities, twins, direct methods, queries,
// jobs, DPS enrollments, bulk operations and canary rollouts, against a real IoT Hub or hubsim.
//
// It reaches a hub through a service connection string (--connection-string, the
// IOTHUB_CONNECTION_STRING environment variable, or connectionString in the config file
// ~/.config/hubby/config.yaml or --config), or through a hubsim state directory
// (--hubsim-state), whose endpoints.json gives the address, CA and connection string.
//
// Exit status: 0 when everything (every device of a bulk command) succeeded; 1 when the command
// failed (bad input, no rights, a service error); 2 on a usage error (unknown command or flag,
// wrong arguments); 3 when the command ran but some devices failed (bulk operations, jobs, a
// rollout that stopped); 130 when interrupted.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

// Exit statuses (documented in the package comment and README).
const (
	exitOK      = 0
	exitError   = 1
	exitUsage   = 2
	exitPartial = 3
	exitSignal  = 130
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	interrupted := ctx.Err() != nil
	stop()
	code := exitCode(err, interrupted)
	if err != nil {
		fmt.Fprintln(os.Stderr, "hubby:", oneLine(err))
	}
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	var ue usageError
	if err != nil && !errors.As(err, &ue) {
		// cobra's own complaints about how it was called
		for _, p := range []string{"unknown command", "unknown flag", "unknown shorthand flag", "required flag", "invalid argument", "flag needs an argument"} {
			if strings.HasPrefix(err.Error(), p) {
				return usageError{err}
			}
		}
	}
	return err
}

// usageError marks a mistake in how hubby was called (exit 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// partialError reports that the command ran but not every device succeeded (exit 3).
type partialError struct {
	failed, total int
	what          string
}

func (e partialError) Error() string {
	if e.what != "" {
		return e.what
	}
	return fmt.Sprintf("%d of %d devices failed", e.failed, e.total)
}

func exitCode(err error, interrupted bool) int {
	var ue usageError
	var pe partialError
	switch {
	case err == nil:
		return exitOK
	case interrupted || errors.Is(err, context.Canceled):
		return exitSignal
	case errors.As(err, &ue):
		return exitUsage
	case errors.As(err, &pe):
		return exitPartial
	}
	return exitError
}

// oneLine is err's text on one line, with a hint for an authorization failure.
func oneLine(err error) string {
	s := strings.Join(strings.Fields(explain(err).Error()), " ")
	return s
}
