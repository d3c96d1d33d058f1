package spool

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/pkg/clock"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// open opens a spool on a fake clock, so the flusher runs only when the test calls Flush.
func open(t *testing.T, dir string, o Options) *Spool {
	t.Helper()
	if o.Clock == nil {
		o.Clock = clock.NewFake(time.Unix(0, 0))
	}
	s, err := Open(dir, o)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s
}

func appendN(t *testing.T, s *Spool, from, n int) []uint64 {
	t.Helper()
	var seqs []uint64
	for i := from; i < from+n; i++ {
		seq, err := s.Append([]byte(fmt.Sprintf("msg-%04d", i)))
		if err != nil {
			t.Fatalf("Append %d: %v", i, err)
		}
		seqs = append(seqs, seq)
	}
	return seqs
}

func wantPending(t *testing.T, s *Spool, from, to int) {
	t.Helper()
	recs, err := s.Pending()
	if err != nil {
		t.Fatalf("Pending: %v", err)
	}
	var got []string
	for _, r := range recs {
		got = append(got, string(r.Data))
	}
	var want []string
	for i := from; i < to; i++ {
		want = append(want, fmt.Sprintf("msg-%04d", i))
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("pending records:\n got %v\nwant %v", got, want)
	}
	for i := 1; i < len(recs); i++ {
		if recs[i].Seq <= recs[i-1].Seq {
			t.Fatalf("sequence numbers not increasing: %d after %d", recs[i].Seq, recs[i-1].Seq)
		}
	}
}

func segments(t *testing.T, dir string, suffix string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "*"+suffix))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestReopenKeepsOrderAndDropsAcked(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, Options{})
	seqs := appendN(t, s, 0, 10)
	for _, q := range seqs[:4] {
		s.Ack(q)
	}
	s.Ack(seqs[6]) // out of order: not below the cursor, so it is sent again after a restart
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	s = open(t, dir, Options{})
	wantPending(t, s, 4, 10)
	more := appendN(t, s, 10, 3)
	if more[0] <= seqs[len(seqs)-1] {
		t.Fatalf("sequence number %d after reopen does not follow %d", more[0], seqs[len(seqs)-1])
	}
	wantPending(t, s, 4, 13)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir, Options{})
	defer s.Close()
	wantPending(t, s, 4, 13)
}

// A process killed without Close leaves the records written by Append (page cache): they are
// found on reopen. The cursor written by the last Flush says what was done.
func TestCrashWithoutClose(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, Options{Fsync: FsyncNever})
	seqs := appendN(t, s, 0, 5)
	s.Ack(seqs[0])
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	s.Ack(seqs[1]) // acknowledged after the last flush: sent again
	s2 := open(t, dir, Options{})
	wantPending(t, s2, 1, 5)
	_ = s2.Close()
	_ = s.Close()
}

func TestTruncatedTailIsSetAside(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, Options{})
	appendN(t, s, 0, 5)
	_ = s.Close()
	segs := segments(t, dir, ".seg")
	if len(segs) != 1 {
		t.Fatalf("segments: %v", segs)
	}
	fi, _ := os.Stat(segs[0])
	// A crash in the middle of writing the last record.
	if err := os.Truncate(segs[0], fi.Size()-3); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir, Options{})
	defer s.Close()
	wantPending(t, s, 0, 4)
	if st := s.Stats(); st.Corrupt != 1 {
		t.Fatalf("Corrupt = %d, want 1", st.Corrupt)
	}
	if aside := segments(t, dir, ".corrupt"); len(aside) != 1 {
		t.Fatalf("set-aside files: %v", aside)
	}
	appendN(t, s, 4, 1)
	wantPending(t, s, 0, 5)
}

func TestBitFlipIsDetected(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, Options{})
	appendN(t, s, 0, 6)
	_ = s.Close()
	seg := segments(t, dir, ".seg")[0]
	data, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	rec := len(appendRecord(nil, 1, []byte("msg-0000")))
	data[3*rec+headerSize+2] ^= 0x10 // a bit in the payload of the fourth record
	if err := os.WriteFile(seg, data, 0o600); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir, Options{})
	defer s.Close()
	wantPending(t, s, 0, 3)
	if st := s.Stats(); st.Corrupt != 1 {
		t.Fatalf("Corrupt = %d, want 1", st.Corrupt)
	}
	aside := segments(t, dir, ".corrupt")
	if len(aside) != 1 {
		t.Fatalf("set-aside files: %v", aside)
	}
	if got, _ := os.ReadFile(aside[0]); !bytes.Equal(got, data) {
		t.Fatalf("the set-aside file is not the damaged segment as it was")
	}
}

func TestGarbageSegmentDoesNotFailOpen(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, segName(1)), []byte("\xff\xff\xff\xffnot a segment at all"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := open(t, dir, Options{})
	defer s.Close()
	wantPending(t, s, 0, 0)
	if st := s.Stats(); st.Corrupt != 1 {
		t.Fatalf("Corrupt = %d, want 1", st.Corrupt)
	}
	appendN(t, s, 0, 2)
	wantPending(t, s, 0, 2)
}

func TestRotationAndRemoval(t *testing.T) {
	dir := t.TempDir()
	rec := int64(len(appendRecord(nil, 1, []byte("msg-0000"))))
	s := open(t, dir, Options{SegmentBytes: 4 * rec})
	seqs := appendN(t, s, 0, 20)
	if n := len(segments(t, dir, ".seg")); n != 5 {
		t.Fatalf("%d segments for 20 records of 4 per segment, want 5", n)
	}
	for _, q := range seqs[:10] {
		s.Ack(q)
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	// Segments 1 and 2 (records 0-7) are done; segment 3 still holds records 10 and 11.
	if n := len(segments(t, dir, ".seg")); n != 3 {
		t.Fatalf("%d segments after acknowledging 10 records, want 3", n)
	}
	if got, want := s.Bytes(), 10*rec; got != want {
		t.Fatalf("Bytes = %d, want %d", got, want)
	}
	_ = s.Close()
	s = open(t, dir, Options{SegmentBytes: 4 * rec})
	defer s.Close()
	wantPending(t, s, 10, 20)
}

func TestFsyncPolicies(t *testing.T) {
	for _, tc := range []struct {
		p          FsyncPolicy
		min, max   uint64
		afterFlush uint64
	}{
		{FsyncAlways, 10, 10, 11},
		{FsyncInterval, 0, 0, 1},
		{FsyncNever, 0, 0, 0},
	} {
		t.Run(tc.p.String(), func(t *testing.T) {
			s := open(t, t.TempDir(), Options{Fsync: tc.p})
			defer s.Close()
			appendN(t, s, 0, 10)
			if n := s.Stats().Fsyncs; n < tc.min || n > tc.max {
				t.Fatalf("%d fsyncs after 10 appends, want %d..%d", n, tc.min, tc.max)
			}
			if err := s.Flush(); err != nil {
				t.Fatal(err)
			}
			if n := s.Stats().Fsyncs; n != tc.afterFlush {
				t.Fatalf("%d fsyncs after a flush, want %d", n, tc.afterFlush)
			}
		})
	}
}

func TestFlusherRunsOnTheClock(t *testing.T) {
	fc := clock.NewFake(time.Unix(0, 0))
	s := open(t, t.TempDir(), Options{Clock: fc, Interval: time.Second})
	defer s.Close()
	appendN(t, s, 0, 3)
	ctx := t.Context()
	if err := fc.WaitArmed(ctx, 1); err != nil {
		t.Fatal(err)
	}
	fc.Advance(time.Second)
	// The flusher fsyncs once, then re-arms its timer: wait for that, not for time.
	deadline := time.Now().Add(10 * time.Second)
	for s.Stats().Fsyncs == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the flusher did not fsync after its interval")
		}
		if err := fc.WaitArmed(ctx, 1); err != nil {
			t.Fatal(err)
		}
	}
}

func TestLimitsAndClose(t *testing.T) {
	s := open(t, t.TempDir(), Options{MaxRecord: 8})
	if _, err := s.Append(make([]byte, 9)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Append of 9 bytes with MaxRecord 8: %v, want ErrTooLarge", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Append([]byte("x")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Append after Close: %v, want ErrClosed", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestParseFsync(t *testing.T) {
	for in, want := range map[string]FsyncPolicy{"": FsyncInterval, "interval": FsyncInterval, "always": FsyncAlways, "never": FsyncNever} {
		if got, err := ParseFsync(in); err != nil || got != want {
			t.Errorf("ParseFsync(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseFsync("sometimes"); err == nil {
		t.Error("ParseFsync(sometimes) accepted")
	}
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add(appendRecord(nil, 7, []byte("hello")))
	f.Add([]byte{})
	f.Add(make([]byte, headerSize))
	f.Add([]byte("\xff\xff\xff\xff\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		seq, payload, n, err := decodeRecord(b, 1<<16)
		if err != nil {
			if !errors.Is(err, errTruncated) && !errors.Is(err, errChecksum) && !errors.Is(err, errTooLarge) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		if n > len(b) || n != headerSize+len(payload) {
			t.Fatalf("n = %d for %d bytes and a payload of %d", n, len(b), len(payload))
		}
		if re := appendRecord(nil, seq, payload); !bytes.Equal(re, b[:n]) {
			t.Fatalf("re-encoding differs")
		}
	})
}
