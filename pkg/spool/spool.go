// Package spool is a small durable FIFO of byte records on local disk: an append-only log of
// segment files with checksummed records, for telemetry that must survive a crash, a SIGKILL or a
// power cut until the hub acknowledges it.
//
// Records get increasing sequence numbers. Append writes a record to the active segment (and
// fsyncs per the FsyncPolicy); Ack marks one done. Acknowledgements are kept in memory and
// written to the cursor file ("acked": the highest sequence number below which every record is
// done) by the spool's flusher every Options.Interval and at Close, which also deletes segments
// whose records are all done. After a restart Pending returns, in order, the records not known to
// be done: at least once, with the duplicates bounded by what was acknowledged since the last
// flush.
//
// Open checks every record. A segment with a bad checksum, an impossible length or a truncated
// record (what a crash in the middle of a write leaves) is set aside: renamed to NAME.corrupt,
// its good records before the damage rewritten under the original name. The damage is logged and
// counted (Stats.Corrupt); it never fails Open.
//
// No lock is held across an fsync: Append fsyncs (FsyncAlways) after releasing the spool's
// mutex, and the flusher's fsync holds none.
package spool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/clock"
)

// FsyncPolicy says when appended records are forced to stable storage.
type FsyncPolicy int

const (
	// FsyncInterval fsyncs the active segment every Options.Interval when it has new records: a
	// power cut loses at most that interval of records. The default.
	FsyncInterval FsyncPolicy = iota
	// FsyncAlways fsyncs after every Append, before it returns.
	FsyncAlways
	// FsyncNever leaves flushing to the operating system: records survive a crash of the
	// process (SIGKILL), not necessarily a power cut.
	FsyncNever
)

// ParseFsync parses "always", "interval" (or "") and "never".
func ParseFsync(s string) (FsyncPolicy, error) {
	switch s {
	case "", "interval":
		return FsyncInterval, nil
	case "always":
		return FsyncAlways, nil
	case "never":
		return FsyncNever, nil
	}
	return 0, fmt.Errorf("spool: fsync policy %q: want always, interval or never", s)
}

func (p FsyncPolicy) String() string {
	switch p {
	case FsyncAlways:
		return "always"
	case FsyncNever:
		return "never"
	}
	return "interval"
}

// Defaults of Options.
const (
	DefaultInterval     = time.Second
	DefaultSegmentBytes = 4 << 20
	DefaultMaxRecord    = 1 << 20
)

// ErrClosed is returned by Append after Close.
var ErrClosed = errors.New("spool: closed")

// ErrTooLarge is returned by Append for a record longer than Options.MaxRecord.
var ErrTooLarge = errors.New("spool: record too large")

// Options configure a Spool; zero fields take the defaults.
type Options struct {
	Fsync FsyncPolicy
	// Interval is the flusher's period: fsync (FsyncInterval), cursor write and removal of done
	// segments. Default 1s.
	Interval time.Duration
	// SegmentBytes is the size after which Append starts a new segment. Default 4 MiB.
	SegmentBytes int64
	// MaxRecord bounds a record's payload. Default 1 MiB.
	MaxRecord int
	Logger    *zap.Logger
	// Clock drives the flusher. Default: the real clock.
	Clock clock.Clock
}

// Record is a pending record.
type Record struct {
	Seq  uint64
	Data []byte
}

// Stats are a spool's counters.
type Stats struct {
	Appends uint64 // records appended since Open
	Acked   uint64 // records acknowledged since Open
	Fsyncs  uint64 // fsyncs of segments and of the cursor since Open
	Corrupt uint64 // segments set aside at Open
	Records int    // records held (appended or found at Open, not acknowledged)
	Bytes   int64  // encoded bytes of the records held
}

type segment struct {
	first uint64 // sequence number in the name
	path  string
	f     *os.File // open for appending (active) or reading
	size  int64
	live  int // records not acknowledged
}

type entry struct {
	seq   uint64
	seg   *segment
	off   int64
	size  int32
	acked bool
}

// Spool is a durable record queue in one directory. Its methods are safe for concurrent use.
type Spool struct {
	dir  string
	opts Options
	log  *zap.Logger

	bytes   atomic.Int64
	appends atomic.Uint64
	acks    atomic.Uint64
	fsyncs  atomic.Uint64
	corrupt uint64

	mu       sync.Mutex
	closed   bool
	segs     []*segment // in order; the last is active
	live     []entry    // records not yet below the cursor, in order
	next     uint64     // next sequence number
	cursor   uint64     // every record with seq <= cursor is done
	saved    uint64     // cursor as last written
	dirty    bool       // active segment has records not fsynced
	cursorF  *os.File
	buf      []byte
	flushing sync.Mutex // one flush at a time

	stopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
}

const cursorName = "acked"

// Open opens (creating it if needed) the spool in dir, checks every segment, sets damaged ones
// aside, and starts the flusher. Close stops it.
func Open(dir string, o Options) (*Spool, error) {
	if o.Interval <= 0 {
		o.Interval = DefaultInterval
	}
	if o.SegmentBytes <= 0 {
		o.SegmentBytes = DefaultSegmentBytes
	}
	if o.MaxRecord <= 0 {
		o.MaxRecord = DefaultMaxRecord
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Clock == nil {
		o.Clock = clock.Real()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	s := &Spool{dir: dir, opts: o, log: o.Logger, stop: make(chan struct{}), done: make(chan struct{})}
	if err := s.load(); err != nil {
		s.closeFiles()
		return nil, err
	}
	if err := s.startSegment(); err != nil {
		s.closeFiles()
		return nil, err
	}
	go s.flusher()
	return s, nil
}

func segName(first uint64) string { return fmt.Sprintf("%020d.seg", first) }

// load reads the cursor and every segment.
func (s *Spool) load() error {
	f, err := os.OpenFile(filepath.Join(s.dir, cursorName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	s.cursorF = f
	var b [16]byte
	if n, _ := f.ReadAt(b[:], 0); n == 16 {
		if crc32.Checksum(b[:8], castagnoli) == binary.LittleEndian.Uint32(b[8:12]) {
			s.cursor = binary.LittleEndian.Uint64(b[:8])
		} else {
			s.corrupt++
			s.log.Error("spool: cursor file damaged; every record on disk will be sent again", zap.String("dir", s.dir))
		}
	}
	s.saved = s.cursor
	names, err := os.ReadDir(s.dir)
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	var firsts []uint64
	for _, de := range names {
		name := de.Name()
		if !strings.HasSuffix(name, ".seg") {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSuffix(name, ".seg"), 10, 64)
		if err != nil {
			continue
		}
		firsts = append(firsts, n)
	}
	sort.Slice(firsts, func(i, j int) bool { return firsts[i] < firsts[j] })
	s.next = s.cursor + 1
	for _, first := range firsts {
		if err := s.loadSegment(first); err != nil {
			return err
		}
	}
	return nil
}

// loadSegment reads one segment, keeping its records after the cursor.
func (s *Spool) loadSegment(first uint64) error {
	path := filepath.Join(s.dir, segName(first))
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	seg := &segment{first: first, path: path}
	type rec struct {
		seq  uint64
		off  int64
		size int
	}
	var recs []rec
	off := 0
	prev := uint64(0)
	var damage error
	for off < len(data) {
		seq, _, n, err := decodeRecord(data[off:], s.opts.MaxRecord)
		if err == nil && (seq <= prev || seq < first) {
			err = fmt.Errorf("sequence number %d out of order", seq)
		}
		if err != nil {
			damage = err
			break
		}
		recs = append(recs, rec{seq, int64(off), n})
		prev = seq
		off += n
	}
	if damage != nil {
		s.corrupt++
		aside := path + ".corrupt"
		s.log.Error("spool: damaged segment set aside; records after the damage are lost",
			zap.String("segment", path), zap.String("set_aside_as", aside), zap.Int("offset", off),
			zap.Int("records_kept", len(recs)), zap.Int("bytes_lost", len(data)-off), zap.Error(damage))
		if err := os.Rename(path, aside); err != nil {
			return fmt.Errorf("spool: set aside %s: %w", path, err)
		}
		data = data[:off]
		if off > 0 {
			if err := writeFileSync(path, data); err != nil {
				return fmt.Errorf("spool: rewrite %s: %w", path, err)
			}
		}
	}
	keep := 0
	for _, r := range recs {
		if r.seq > s.cursor {
			keep++
		}
		if r.seq >= s.next {
			s.next = r.seq + 1
		}
	}
	if keep == 0 {
		if off > 0 || damage == nil {
			_ = os.Remove(path)
		}
		return nil
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	seg.f, seg.size = f, int64(len(data))
	for _, r := range recs {
		if r.seq > s.cursor {
			s.live = append(s.live, entry{seq: r.seq, seg: seg, off: r.off, size: int32(r.size)})
			seg.live++
			s.bytes.Add(int64(r.size))
		}
	}
	s.segs = append(s.segs, seg)
	return nil
}

func writeFileSync(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// startSegment opens a new active segment named by s.next. Called with s.mu held or before the
// spool is shared.
func (s *Spool) startSegment() error {
	path := filepath.Join(s.dir, segName(s.next))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	s.segs = append(s.segs, &segment{first: s.next, path: path, f: f})
	return nil
}

// Pending returns the records not acknowledged, in order. It reads them from disk.
func (s *Spool) Pending() ([]Record, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Record
	for _, e := range s.live {
		if e.acked {
			continue
		}
		b := make([]byte, e.size)
		if _, err := e.seg.f.ReadAt(b, e.off); err != nil {
			return nil, fmt.Errorf("spool: read %s at %d: %w", e.seg.path, e.off, err)
		}
		seq, payload, _, err := decodeRecord(b, s.opts.MaxRecord)
		if err != nil || seq != e.seq {
			return nil, fmt.Errorf("spool: %s at %d changed on disk: %v", e.seg.path, e.off, err)
		}
		out = append(out, Record{Seq: seq, Data: payload})
	}
	return out, nil
}

// Append writes data as a new record and returns its sequence number. With FsyncAlways the
// record is on stable storage when Append returns.
func (s *Spool) Append(data []byte) (uint64, error) {
	if len(data) > s.opts.MaxRecord {
		return 0, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(data), s.opts.MaxRecord)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return 0, ErrClosed
	}
	seg := s.segs[len(s.segs)-1]
	if seg.size >= s.opts.SegmentBytes {
		if s.opts.Fsync != FsyncNever {
			// Rare (once a segment): the old segment is made durable before records go elsewhere.
			if err := seg.f.Sync(); err == nil {
				s.fsyncs.Add(1)
			}
		}
		if err := s.startSegment(); err != nil {
			s.mu.Unlock()
			return 0, err
		}
		seg = s.segs[len(s.segs)-1]
	}
	seq := s.next
	s.buf = appendRecord(s.buf[:0], seq, data)
	if _, err := seg.f.WriteAt(s.buf, seg.size); err != nil {
		s.mu.Unlock()
		return 0, fmt.Errorf("spool: write %s: %w", seg.path, err)
	}
	s.next++
	s.live = append(s.live, entry{seq: seq, seg: seg, off: seg.size, size: int32(len(s.buf))})
	seg.size += int64(len(s.buf))
	seg.live++
	s.bytes.Add(int64(len(s.buf)))
	s.dirty = true
	f := seg.f
	s.mu.Unlock()
	s.appends.Add(1)
	if s.opts.Fsync == FsyncAlways {
		if err := f.Sync(); err != nil && !errors.Is(err, os.ErrClosed) {
			return seq, fmt.Errorf("spool: fsync: %w", err)
		}
		s.fsyncs.Add(1)
	}
	return seq, nil
}

// Ack marks the record seq done; acknowledging twice, or an unknown seq, does nothing. It does
// no I/O: the cursor is written by the flusher.
func (s *Spool) Ack(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := sort.Search(len(s.live), func(i int) bool { return s.live[i].seq >= seq })
	if i == len(s.live) || s.live[i].seq != seq || s.live[i].acked {
		return
	}
	e := &s.live[i]
	e.acked = true
	e.seg.live--
	s.bytes.Add(-int64(e.size))
	s.acks.Add(1)
	n := 0
	for n < len(s.live) && s.live[n].acked {
		s.cursor = s.live[n].seq
		n++
	}
	if n > 0 {
		clear(s.live[:n])
		s.live = s.live[n:]
	}
}

// Bytes returns the encoded size of the records held.
func (s *Spool) Bytes() int64 { return s.bytes.Load() }

// Stats returns the spool's counters.
func (s *Spool) Stats() Stats {
	s.mu.Lock()
	recs := 0
	for _, e := range s.live {
		if !e.acked {
			recs++
		}
	}
	corrupt := s.corrupt
	s.mu.Unlock()
	return Stats{Appends: s.appends.Load(), Acked: s.acks.Load(), Fsyncs: s.fsyncs.Load(),
		Corrupt: corrupt, Records: recs, Bytes: s.bytes.Load()}
}

func (s *Spool) flusher() {
	defer close(s.done)
	t := s.opts.Clock.NewTimer(s.opts.Interval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C():
			if err := s.Flush(); err != nil {
				s.log.Warn("spool: flush failed", zap.Error(err))
			}
			t.Reset(s.opts.Interval)
		}
	}
}

// Flush makes appended records durable (unless FsyncNever), writes the cursor and removes the
// segments whose records are all acknowledged. The flusher calls it every Options.Interval.
func (s *Spool) Flush() error {
	s.flushing.Lock()
	defer s.flushing.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	var active *os.File
	if s.dirty {
		active = s.segs[len(s.segs)-1].f
		s.dirty = false
	}
	cursor, saved := s.cursor, s.saved
	var dead []*segment
	kept := s.segs[:0]
	for i, seg := range s.segs {
		if seg.live == 0 && i < len(s.segs)-1 {
			dead = append(dead, seg)
			continue
		}
		kept = append(kept, seg)
	}
	clear(s.segs[len(kept):])
	s.segs = kept
	s.mu.Unlock()

	var errs []error
	if active != nil && s.opts.Fsync != FsyncNever {
		if err := active.Sync(); err != nil && !errors.Is(err, os.ErrClosed) {
			errs = append(errs, err)
		} else {
			s.fsyncs.Add(1)
		}
	}
	if cursor != saved {
		var b [16]byte
		binary.LittleEndian.PutUint64(b[:8], cursor)
		binary.LittleEndian.PutUint32(b[8:12], crc32.Checksum(b[:8], castagnoli))
		if _, err := s.cursorF.WriteAt(b[:], 0); err != nil {
			errs = append(errs, err)
		} else {
			if s.opts.Fsync != FsyncNever {
				if err := s.cursorF.Sync(); err == nil {
					s.fsyncs.Add(1)
				}
			}
			s.mu.Lock()
			s.saved = cursor
			s.mu.Unlock()
		}
	}
	// Segments go only after the cursor is written, so a crash in between resends, never loses.
	for _, seg := range dead {
		_ = seg.f.Close()
		if err := os.Remove(seg.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Close flushes, stops the flusher and closes the files. Records not acknowledged stay on disk
// for the next Open.
func (s *Spool) Close() error {
	first := false
	s.stopOnce.Do(func() { first = true; close(s.stop) })
	<-s.done
	if !first {
		return nil
	}
	err := s.Flush()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.closeFiles()
	return err
}

func (s *Spool) closeFiles() {
	for _, seg := range s.segs {
		if seg.f != nil {
			_ = seg.f.Close()
		}
	}
	if s.cursorF != nil {
		_ = s.cursorF.Close()
	}
}
