package logging

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
)

func TestJSONAndLevel(t *testing.T) {
	var buf bytes.Buffer
	log, err := New(&buf, "warn", "json")
	if err != nil {
		t.Fatal(err)
	}
	log.Info("hidden")
	log.Warn("shown", zap.String("k", "v"))
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 1 {
		t.Fatalf("lines: %q", lines)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &m); err != nil || m["msg"] != "shown" || m["k"] != "v" || m["level"] != "warn" {
		t.Fatalf("%v %v", m, err)
	}
}

func TestConsoleDefaultAndErrors(t *testing.T) {
	var buf bytes.Buffer
	log, err := New(&buf, "", "")
	if err != nil {
		t.Fatal(err)
	}
	log.Info("hello")
	if !strings.Contains(buf.String(), "INFO\thello") {
		t.Fatalf("console output %q", buf.String())
	}
	if _, err := New(&buf, "loud", "json"); err == nil {
		t.Fatal("bad level accepted")
	}
	if _, err := New(&buf, "info", "xml"); err == nil {
		t.Fatal("bad format accepted")
	}
}

func TestJournalPriorityPrefix(t *testing.T) {
	for _, format := range []string{"console", "json"} {
		var buf bytes.Buffer
		log, lvl, err := Build(&buf, Options{Level: "debug", Format: format, Journal: true})
		if err != nil {
			t.Fatal(err)
		}
		log.Debug("d")
		log.Info("i")
		log.Warn("w")
		log.Error("e")
		lvl.SetLevel(zap.ErrorLevel)
		log.Warn("hidden after SetLevel")
		lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
		want := []string{"<7>", "<6>", "<4>", "<3>"}
		if len(lines) != len(want) {
			t.Fatalf("%s: lines %q, want %d", format, lines, len(want))
		}
		for i, l := range lines {
			if !strings.HasPrefix(l, want[i]) {
				t.Errorf("%s: line %q does not start with %s", format, l, want[i])
			}
			if strings.Contains(l, time.Now().Format("2006-01-02")) {
				t.Errorf("%s: line %q looks timestamped", format, l)
			}
		}
		if format == "json" {
			var m map[string]any
			if err := json.Unmarshal([]byte(strings.TrimPrefix(lines[2], "<4>")), &m); err != nil || m["msg"] != "w" {
				t.Fatalf("json line %q: %v %v", lines[2], m, err)
			}
			if _, ok := m["ts"]; ok {
				t.Errorf("json line under journal has a timestamp: %q", lines[2])
			}
		}
	}
}

func TestUnderJournal(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "stream")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", st.Dev, st.Ino))
	if !UnderJournal(f) {
		t.Error("matching JOURNAL_STREAM not recognised")
	}
	g, err := os.CreateTemp(t.TempDir(), "other")
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if UnderJournal(g) {
		t.Error("a stream other than the journal's taken for the journal (inherited JOURNAL_STREAM)")
	}
	for _, bad := range []string{"", "garbage", "1:x", fmt.Sprintf("%d", st.Dev)} {
		t.Setenv("JOURNAL_STREAM", bad)
		if UnderJournal(f) {
			t.Errorf("JOURNAL_STREAM=%q taken for the journal", bad)
		}
	}
}
