// Command hubby is iothubby's fleet CLI: devices (and, as they land, twins, methods, jobs and
// enrollments) against a real IoT Hub or hubsim.
//
// It reaches a hub through a service connection string (--connection-string, or the
// IOTHUB_CONNECTION_STRING environment variable), or through a hubsim state directory
// (--hubsim-state), whose endpoints.json gives the address, CA and connection string.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "hubby:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	return root.ExecuteContext(ctx)
}
