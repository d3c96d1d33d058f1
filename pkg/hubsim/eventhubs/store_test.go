package eventhubs

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/pkg/clock"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var t0 = time.Date(2026, 12, 2, 1, 0, 0, 0, time.UTC)

// Bob Jenkins' own test vectors for hashlittle2 (lookup3.c, driver5).
func TestHashlittle2Vectors(t *testing.T) {
	for _, c := range []struct {
		key    string
		pc, pb uint32
		c, b   uint32
	}{
		{"", 0, 0, 0xdeadbeef, 0xdeadbeef},
		{"", 0, 0xdeadbeef, 0xbd5b7dde, 0xdeadbeef},
		{"", 0xdeadbeef, 0xdeadbeef, 0x9c093ccd, 0xbd5b7dde},
		{"Four score and seven years ago", 0, 0, 0x17770551, 0xce7226e6},
		{"Four score and seven years ago", 0, 1, 0xe3607cae, 0xbd371de4},
		{"Four score and seven years ago", 1, 0, 0xcd628161, 0x6cbea4b3},
	} {
		gc, gb := hashlittle2([]byte(c.key), c.pc, c.pb)
		if gc != c.c || gb != c.b {
			t.Errorf("hashlittle2(%q, %#x, %#x) = %#x %#x, want %#x %#x", c.key, c.pc, c.pb, gc, gb, c.c, c.b)
		}
	}
}

func TestPartitionFor(t *testing.T) {
	seen := map[int]int{}
	for i := range 2000 {
		id := fmt.Sprintf("device-%d", i)
		p := PartitionFor(id, 4)
		if p < 0 || p >= 4 {
			t.Fatalf("%s: partition %d", id, p)
		}
		if PartitionFor(strings.ToUpper(id), 4) != p {
			t.Fatalf("%s: upper-case id in another partition (IoT Hub's resolver upper-cases)", id)
		}
		seen[p]++
	}
	for p := range 4 {
		if seen[p] < 300 {
			t.Errorf("partition %d got %d of 2000 devices: %v", p, seen[p], seen)
		}
	}
	for _, n := range []int{0, 1} {
		if PartitionFor("x", n) != 0 {
			t.Errorf("%d partitions: not 0", n)
		}
	}
	// The last logical partitions map to the last partition (no index out of range).
	for _, n := range []int{2, 3, 7, 32} {
		for i := range 500 {
			if p := PartitionFor(fmt.Sprint("k", i), n); p < 0 || p >= n {
				t.Fatalf("%d partitions: %d", n, p)
			}
		}
	}
}

func newStore(t *testing.T, cfg Config) *Store {
	t.Helper()
	s, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// devicesIn returns n device ids that land in partition p of count.
func devicesIn(p, count, n int) []string {
	var out []string
	for i := 0; len(out) < n; i++ {
		id := fmt.Sprint("dev-", i)
		if PartitionFor(id, count) == p {
			out = append(out, id)
		}
	}
	return out
}

func TestAppendReadAndPositions(t *testing.T) {
	clk := clock.NewFake(t0)
	s := newStore(t, Config{Clock: clk})
	dev := devicesIn(2, 4, 1)[0]
	_, _, wake, err := s.Read(2, 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	info, _ := s.Info(2)
	if !info.Empty || info.LastSequenceNumber != -1 || info.LastOffset != -1 || info.BeginSequenceNumber != 0 {
		t.Fatalf("empty partition info %+v", info)
	}
	var got []Event
	for i := range 5 {
		got = append(got, s.Append(dev, Event{Body: []byte(fmt.Sprint("m", i)), Annotations: map[string]string{"iothub-connection-device-id": dev}}))
		clk.Advance(time.Second)
	}
	select {
	case <-wake:
	default:
		t.Fatal("reader not woken by an append")
	}
	for i, e := range got {
		if e.Partition != 2 || e.SequenceNumber != int64(i) || !e.EnqueuedTime.Equal(t0.Add(time.Duration(i)*time.Second)) {
			t.Fatalf("event %d: %+v", i, e)
		}
		if i > 0 && e.Offset <= got[i-1].Offset {
			t.Fatalf("offsets not increasing: %d then %d", got[i-1].Offset, e.Offset)
		}
	}
	evs, next, _, _ := s.Read(2, 0, 3)
	if len(evs) != 3 || next != 3 || string(evs[2].Body) != "m2" {
		t.Fatalf("read 3: %d events, next %d", len(evs), next)
	}
	evs, next, _, _ = s.Read(2, next, 10)
	if len(evs) != 2 || next != 5 {
		t.Fatalf("read rest: %d events, next %d", len(evs), next)
	}
	if evs, _, _, _ := s.Read(2, 5, 10); len(evs) != 0 {
		t.Fatalf("read past the end: %d", len(evs))
	}
	if _, _, _, err := s.Read(9, 0, 1); !errors.Is(err, ErrPartition) {
		t.Fatalf("partition 9: %v", err)
	}
	info, _ = s.Info(2)
	if info.Empty || info.BeginSequenceNumber != 0 || info.LastSequenceNumber != 4 || info.LastOffset != got[4].Offset ||
		!info.LastEnqueuedTime.Equal(got[4].EnqueuedTime) {
		t.Fatalf("info %+v", info)
	}

	for _, c := range []struct {
		filter string
		want   int64
	}{
		{"amqp.annotation.x-opt-offset > '-1'", 0},
		{"amqp.annotation.x-opt-offset > '@latest'", 5},
		{fmt.Sprintf("amqp.annotation.x-opt-offset > '%d'", got[1].Offset), 2},
		{fmt.Sprintf("amqp.annotation.x-opt-offset >= '%d'", got[1].Offset), 1},
		{fmt.Sprintf("amqp.annotation.x-opt-offset > '%d'", got[1].Offset+1), 2}, // between events
		{"amqp.annotation.x-opt-sequence-number > '2'", 3},
		{"amqp.annotation.x-opt-sequence-number >= '2'", 2},
		{"amqp.annotation.x-opt-sequence-number > '99'", 100},
		{fmt.Sprintf("amqp.annotation.x-opt-enqueued-time > '%d'", t0.Add(2*time.Second).UnixMilli()), 3},
		{fmt.Sprintf("amqp.annotation.x-opt-enqueued-time > '%d'", t0.Add(2500*time.Millisecond).UnixMilli()), 3},
		{fmt.Sprintf("amqp.annotation.x-opt-enqueuedtimeutc > %d", t0.Add(-time.Hour).UnixMilli()), 0},
		{fmt.Sprintf("amqp.annotation.x-opt-enqueued-time > '%d'", t0.Add(time.Hour).UnixMilli()), 5},
	} {
		pos, err := ParseFilter(c.filter)
		if err != nil {
			t.Fatalf("%s: %v", c.filter, err)
		}
		if got, err := s.Start(2, pos); err != nil || got != c.want {
			t.Errorf("%s: start %d (%v), want %d", c.filter, got, err, c.want)
		}
	}
}

func TestRetention(t *testing.T) {
	clk := clock.NewFake(t0)
	s := newStore(t, Config{Clock: clk, Partitions: 1, MaxEvents: 3, MaxBytes: 1 << 20, Retention: time.Hour})
	for i := range 5 {
		s.Append("d", Event{Body: []byte{byte(i)}})
	}
	evs, _, _, _ := s.Read(0, 0, 10)
	if len(evs) != 3 || evs[0].SequenceNumber != 2 {
		t.Fatalf("MaxEvents 3: %d events from %d", len(evs), evs[0].SequenceNumber)
	}
	if st, _ := s.Start(0, Earliest); st != 2 {
		t.Fatalf("earliest after trimming: %d", st)
	}
	if st, _ := s.Start(0, Position{Kind: Sequence, Value: 0}); st != 2 {
		t.Fatalf("a sequence number already gone starts at the first retained: %d", st)
	}
	clk.Advance(time.Hour + time.Millisecond)
	info, _ := s.Info(0)
	if !info.Empty || info.BeginSequenceNumber != 5 || info.LastSequenceNumber != 4 {
		t.Fatalf("after the retention time: %+v", info)
	}

	b := newStore(t, Config{Clock: clk, Partitions: 1, MaxBytes: 2500})
	for range 5 {
		b.Append("d", Event{Body: make([]byte, 1000)})
	}
	if evs, _, _, _ := b.Read(0, 0, 10); len(evs) != 2 || evs[0].SequenceNumber != 3 {
		t.Fatalf("MaxBytes 2500 with 1000-byte bodies: %d events", len(evs))
	}
}

func TestPersistence(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events.db")
	clk := clock.NewFake(t0)
	s, err := Open(Config{Path: path, Clock: clk, Partitions: 2})
	if err != nil {
		t.Fatal(err)
	}
	dev := devicesIn(1, 2, 1)[0]
	var want []Event
	for i := range 4 {
		want = append(want, s.Append(dev, Event{Body: []byte(fmt.Sprint("b", i)),
			Properties:  []Property{{Key: "k", Value: "v"}, {Key: "bare", Null: true}},
			System:      map[string]string{"message-id": fmt.Sprint("mid-", i)},
			Annotations: map[string]string{"iothub-connection-device-id": dev}}))
		clk.Advance(time.Millisecond)
	}
	if err := s.CreateConsumerGroup("readers-1"); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateConsumerGroup("READERS-1"); !errors.Is(err, ErrConsumerGroup) {
		t.Fatalf("duplicate (case-insensitive) group: %v", err)
	}
	if err := s.CreateConsumerGroup("bad name"); !errors.Is(err, ErrConsumerGroup) {
		t.Fatalf("bad group name: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	if _, err := Open(Config{Path: path, Clock: clk, Partitions: 4}); err == nil || !strings.Contains(err.Error(), "2 partitions") {
		t.Fatalf("reopen with another partition count: %v", err)
	}
	s = newStore(t, Config{Path: path, Clock: clk, Partitions: 2})
	evs, _, _, _ := s.Read(1, 0, 10)
	if len(evs) != 4 {
		t.Fatalf("after restart: %d events", len(evs))
	}
	for i, e := range evs {
		w := want[i]
		if e.SequenceNumber != w.SequenceNumber || e.Offset != w.Offset || !e.EnqueuedTime.Equal(w.EnqueuedTime) ||
			string(e.Body) != string(w.Body) || len(e.Properties) != 2 || !e.Properties[1].Null ||
			e.System["message-id"] != w.System["message-id"] || e.Annotations["iothub-connection-device-id"] != dev {
			t.Fatalf("event %d after restart: %+v, want %+v", i, e, w)
		}
	}
	next := s.Append(dev, Event{Body: []byte("after")})
	if next.SequenceNumber != 4 || next.Offset <= want[3].Offset {
		t.Fatalf("numbering after restart: seq %d offset %d", next.SequenceNumber, next.Offset)
	}
	if !s.HasConsumerGroup("readers-1") || !s.HasConsumerGroup("$default") {
		t.Fatalf("consumer groups after restart: %v", s.ConsumerGroups())
	}
	if err := s.DeleteConsumerGroup("$Default"); !errors.Is(err, ErrConsumerGroup) {
		t.Fatalf("delete $Default: %v", err)
	}
	if err := s.DeleteConsumerGroup("Readers-1"); err != nil || s.HasConsumerGroup("readers-1") {
		t.Fatalf("delete: %v %v", err, s.ConsumerGroups())
	}
}

// Retention applies at load: events past the retention time are gone after a restart, and the
// numbering goes on from the last event ever stored.
func TestPersistenceRetentionAtLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events.db")
	clk := clock.NewFake(t0)
	s, err := Open(Config{Path: path, Clock: clk, Partitions: 1, Retention: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		s.Append("d", Event{Body: []byte("x")})
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	clk.Advance(2 * time.Minute)
	s = newStore(t, Config{Path: path, Clock: clk, Partitions: 1, Retention: time.Minute})
	info, _ := s.Info(0)
	if !info.Empty || info.BeginSequenceNumber != 3 || info.LastSequenceNumber != 2 {
		t.Fatalf("after restart past retention: %+v", info)
	}
	if e := s.Append("d", Event{}); e.SequenceNumber != 3 {
		t.Fatalf("next sequence number %d", e.SequenceNumber)
	}
}

func TestParseFilterErrors(t *testing.T) {
	for _, f := range []string{
		"",
		"x-opt-offset > '1'",
		"amqp.annotation.x-opt-offset < '1'",
		"amqp.annotation.x-opt-offset = '1'",
		"amqp.annotation.x-opt-offset > 1",
		"amqp.annotation.x-opt-offset > 'abc'",
		"amqp.annotation.x-opt-offset > '-2'",
		"amqp.annotation.x-opt-offset >= '@latest'",
		"amqp.annotation.x-opt-sequence-number > ''",
		"amqp.annotation.x-opt-enqueued-time > '-5'",
		"amqp.annotation.x-opt-partition-key > 'a'",
		"amqp.annotation.x-opt-offset > '1' OR 1=1",
		strings.Repeat("a", 600),
	} {
		if _, err := ParseFilter(f); !errors.Is(err, ErrFilter) {
			t.Errorf("%q: %v, want ErrFilter", f, err)
		}
	}
	for _, f := range []string{
		"amqp.annotation.x-opt-offset>'5'",
		"AMQP.ANNOTATION.X-OPT-OFFSET > '5'",
		"  amqp.annotation.x-opt-offset   >=   '5'  ",
	} {
		p, err := ParseFilter(f)
		if err != nil || p.Kind != Offset || p.Value != 5 {
			t.Errorf("%q: %+v %v", f, p, err)
		}
	}
}

func FuzzParseFilter(f *testing.F) {
	for _, s := range []string{
		"amqp.annotation.x-opt-offset > '-1'", "amqp.annotation.x-opt-offset > '@latest'",
		"amqp.annotation.x-opt-sequence-number >= '7'", "amqp.annotation.x-opt-enqueued-time > '1700000000000'",
		"amqp.annotation.x-opt-enqueuedtimeutc > 1700000000000",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseFilter(s)
		if err != nil {
			if !errors.Is(err, ErrFilter) {
				t.Fatalf("error not ErrFilter: %v", err)
			}
			return
		}
		// What parses renders to a filter that parses to the same position.
		q, err := ParseFilter(p.String())
		if err != nil || q.Kind != p.Kind || q.Value != p.Value || !q.Time.Equal(p.Time) || (p.Kind != Latest && q.Inclusive != p.Inclusive) {
			t.Fatalf("%q → %+v → %q → %+v %v", s, p, p.String(), q, err)
		}
	})
}
