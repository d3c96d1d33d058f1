package atomicfile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	for _, content := range []string{"first", "second, longer"} {
		if err := WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != content {
			t.Fatalf("read %q %v, want %q", got, err, content)
		}
	}
	fi, _ := os.Stat(p)
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", fi.Mode())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temporary files left: %v", entries)
	}
	if err := WriteFile(filepath.Join(dir, "missing", "x"), []byte("x"), 0o600); err == nil {
		t.Fatal("write into a missing folder succeeded")
	}
}

// The file gets the mode asked for: not the temporary file's 0600, not the umask's cut, and not
// the mode of the file it replaces.
func TestWriteFileMode(t *testing.T) {
	p := filepath.Join(t.TempDir(), "ca.pem")
	for _, perm := range []os.FileMode{0o644, 0o600, 0o666} {
		if err := WriteFile(p, []byte("x"), perm); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != perm {
			t.Fatalf("after WriteFile(%v): mode %v", perm, fi.Mode().Perm())
		}
	}
}

// A failed write leaves the old content and no temporary file.
func TestWriteFileFailureKeepsOld(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	if err := WriteFile(p, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A folder where the file should be: the rename fails, after the temporary file was written.
	sub := filepath.Join(dir, "sub")
	if err := os.MkdirAll(filepath.Join(sub, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sub, "x", "keep"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	err := WriteFile(filepath.Join(sub, "x"), []byte("new"), 0o600)
	if err == nil || !strings.Contains(err.Error(), filepath.Join(sub, "x")) {
		t.Fatalf("rename over a non-empty folder: %v, want an error naming the path", err)
	}
	entries, _ := os.ReadDir(sub)
	if len(entries) != 1 {
		t.Fatalf("temporary file left after a failed write: %v", entries)
	}
	if got, _ := os.ReadFile(p); string(got) != "old" {
		t.Fatalf("old file changed: %q", got)
	}
}
