package version

import (
	"bytes"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

func TestAttach(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"version"}} {
		root := &cobra.Command{Use: "prog", RunE: func(*cobra.Command, []string) error { return nil }}
		Attach(root)
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetArgs(args)
		if err := root.Execute(); err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		if got := out.String(); !strings.HasPrefix(got, "prog "+String()+" (go") {
			t.Errorf("%v printed %q", args, got)
		}
	}
	if String() == "" {
		t.Error("empty version")
	}
}
