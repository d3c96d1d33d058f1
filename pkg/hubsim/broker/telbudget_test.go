package broker

import (
	"fmt"
	"strings"
	"testing"
)

func msg(i int, body int) Message {
	return Message{Body: []byte(strings.Repeat("x", body)), SystemProperties: map[string]string{"message-id": fmt.Sprintf("%02d", i)}}
}

func ids(ms []Message) string {
	var b strings.Builder
	for i, m := range ms {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(m.SystemProperties["message-id"])
	}
	return b.String()
}

func TestRingOrderAcrossGrowthAndDrops(t *testing.T) {
	r := ring{limit: 20}
	for i := 1; i <= 10; i++ {
		r.add(msg(i, 1))
	}
	// Drop the three oldest, then add past the first growth boundary: order must hold.
	for range 3 {
		if r.dropOldestUpTo(r.seq) == 0 {
			t.Fatal("dropOldestUpTo dropped nothing")
		}
	}
	for i := 11; i <= 30; i++ {
		r.add(msg(i, 1))
	}
	if got, want := ids(r.all()), "11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30"; got != want {
		t.Fatalf("ring holds %s, want %s", got, want)
	}
	if r.dropOldestUpTo(10) != 0 {
		t.Fatal("dropOldestUpTo dropped a record newer than the sequence asked for")
	}
	if size, n := r.clear(); n != 20 || size <= 0 || len(r.all()) != 0 {
		t.Fatalf("clear: %d records, %d bytes, %d left", n, size, len(r.all()))
	}
}

// The budget holds the recorded telemetry of all devices within TelemetryBytes by dropping the
// oldest messages first, whichever device sent them.
func TestTelemetryBudgetDropsOldestAcrossDevices(t *testing.T) {
	one := messageMemory(&Message{Body: make([]byte, 1000), SystemProperties: map[string]string{"message-id": "01"}})
	b := &Broker{cfg: Config{TelemetryBytes: int64(10 * one)}}
	devs := []*deviceState{{id: "a"}, {id: "b"}, {id: "c"}}
	for _, d := range devs {
		d.telemetry.limit = 1000
	}
	// a gets 1..4, b 5..8, c 9..14: 14 messages of one size, room for 10.
	for i := 1; i <= 14; i++ {
		d := devs[0]
		if i > 4 {
			d = devs[1]
		}
		if i > 8 {
			d = devs[2]
		}
		b.record(d, msg(i, 1000))
		if bytes, _ := b.TelemetryMemory(); bytes > b.cfg.TelemetryBytes {
			t.Fatalf("after message %d: %d bytes recorded, budget %d", i, bytes, b.cfg.TelemetryBytes)
		}
	}
	got := []string{ids(devs[0].telemetry.all()), ids(devs[1].telemetry.all()), ids(devs[2].telemetry.all())}
	if want := []string{"", "05,06,07,08", "09,10,11,12,13,14"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("recorded %q, want %q (the four oldest dropped, all of device a's)", got, want)
	}
	if _, n := b.TelemetryMemory(); n != 10 {
		t.Fatalf("%d records accounted, want 10", n)
	}
}

// Records dropped by a device's own count limit leave stale references behind; they are
// compacted away, so the queue stays proportional to what is recorded.
func TestTelemetryBudgetReferencesStayBounded(t *testing.T) {
	b := &Broker{cfg: Config{TelemetryBytes: 1 << 40}}
	d := &deviceState{id: "d"}
	d.telemetry.limit = 10
	for i := range 100_000 {
		b.record(d, msg(i, 10))
	}
	if live := len(b.tel.refs) - b.tel.head; live > 1024 {
		t.Fatalf("%d references queued for %d records", live, b.tel.held)
	}
	if _, n := b.TelemetryMemory(); n != 10 {
		t.Fatalf("%d records accounted, want 10", n)
	}
	// Deleting the device releases its bytes.
	size, n := d.telemetry.clear()
	b.tel.release(size, n)
	if bytes, held := b.TelemetryMemory(); bytes != 0 || held != 0 {
		t.Fatalf("after delete: %d bytes, %d records accounted", bytes, held)
	}
}
