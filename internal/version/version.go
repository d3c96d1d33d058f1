// Package version is the version iothubby's programs report (--version, `version`, the agent's
// reported agentVersion): the one the build stamps with
//
//	-ldflags "-X github.com/iothubby/iothubby/internal/version.stamped=1.2.3"
//
// (make package does, from `git describe`), else the main module's version from the build
// information (a `go install ...@v1.2.3` build), else "devel".
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// stamped is set by the linker (-X); it is never written at run time.
var stamped string

// String returns the version.
func String() string {
	if stamped != "" {
		return stamped
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

// Line is what --version and `version` print: name, version, Go version and platform.
func Line(name string) string {
	return fmt.Sprintf("%s %s (%s, %s/%s)", name, String(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// Attach gives a program's root command a --version flag and a `version` subcommand.
func Attach(root *cobra.Command) {
	root.Version = String()
	root.SetVersionTemplate(Line(root.Name()) + "\n")
	root.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprintln(cmd.OutOrStdout(), Line(root.Name()))
			return err
		},
	})
}
