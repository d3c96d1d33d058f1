package main

import (
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// update rewrites the golden files instead of comparing against them:
//
//	go test ./cmd/hubby -run TestGolden -update
var update = flag.Bool("update", false, "rewrite cmd/hubby/testdata/golden/*.golden from the current output")

// volatile matches what differs from run to run in hubby's output against a fresh hubsim: times,
// etags, generated keys, ports and temporary paths. Tests add their own with scrub.
var volatile = []struct {
	re   *regexp.Regexp
	with string
}{
	{regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)`), "<time>"},
	{regexp.MustCompile(`"(etag|ETag)":\s*"[^"]*"`), `"$1": "<etag>"`},
	{regexp.MustCompile(`[A-Za-z0-9+/]{43}=`), "<key>"},
	{regexp.MustCompile(`127\.0\.0\.1:\d+`), "127.0.0.1:<port>"},
}

// golden compares got, scrubbed of volatile parts and of each extra (old, new) pair, with
// testdata/golden/<name>.golden, or rewrites that file with -update. A mismatch shows both.
func golden(t *testing.T, name, got string, extra ...string) {
	t.Helper()
	got = scrub(got, extra...)
	path := filepath.Join("testdata", "golden", name+".golden")
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("golden %s: %v (run with -update to create it)", name, err)
	}
	if string(want) != got {
		t.Errorf("output of %s differs from %s (run with -update if the change is intended)\n--- want\n%s\n--- got\n%s", name, path, want, got)
	}
}

// scrub replaces the volatile parts of s, then each extra old string with the new one after it.
func scrub(s string, extra ...string) string {
	if len(extra)%2 != 0 {
		panic("scrub: extra must be (old, new) pairs")
	}
	for i := 0; i < len(extra); i += 2 {
		if extra[i] != "" {
			s = strings.ReplaceAll(s, extra[i], extra[i+1])
		}
	}
	for _, v := range volatile {
		s = v.re.ReplaceAllString(s, v.with)
	}
	return s
}

func TestScrub(t *testing.T) {
	in := `{"etag": "AAAAAAAAAAE=", "lastActivityTime": "2026-12-02T01:02:03.456Z", "key": "` + strings.Repeat("k", 43) + `=", "addr": "127.0.0.1:49152", "dir": "/tmp/x"}`
	want := `{"etag": "<etag>", "lastActivityTime": "<time>", "key": "<key>", "addr": "127.0.0.1:<port>", "dir": "<state>"}`
	if got := scrub(in, "/tmp/x", "<state>"); got != want {
		t.Fatalf("scrub:\n got %s\nwant %s", got, want)
	}
}
