// Package golden compares the exact JSON bytes a value marshals to with a file under testdata,
// for tests that pin a wire shape byte for byte (pkg/hubapi's documents as hubsim, the service
// client and hubby see them).
package golden

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// JSON compares the bytes encoding/json writes for v, and a newline, with testdata/golden/<name>.json,
// or rewrites that file when update is set.
func JSON(t testing.TB, name string, v any, update bool) {
	t.Helper()
	got, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("%s: marshal: %v", name, err)
	}
	got = append(got, '\n')
	path := filepath.Join("testdata", "golden", name+".json")
	if update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("golden %s: %v (run with -update to create it)", name, err)
	}
	if string(want) != string(got) {
		t.Errorf("%s: the wire shape changed\n--- want %s\n%s--- got\n%s", name, path, want, got)
	}
}
