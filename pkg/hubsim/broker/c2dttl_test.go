package broker

import (
	"testing"
	"time"
)

// A message sent without an expiry time waits DefaultC2DTTL (IoT Hub's one hour) for its
// device, then expires like any other; one with an expiry keeps it.
func TestC2DDefaultTimeToLive(t *testing.T) {
	now := time.Date(2026, 12, 2, 3, 0, 0, 0, time.UTC)
	plain := &C2DMessage{MessageID: "plain"}
	own := &C2DMessage{MessageID: "own", ExpiryTime: now.Add(2 * time.Hour)}
	if got := expiryOf(plain, now); !got.Equal(now.Add(time.Hour)) {
		t.Fatalf("no expiry given: expires %v, want an hour later", got)
	}
	ds := &deviceState{queue: []*c2dEntry{
		{msg: *plain, enqueued: now, expires: expiryOf(plain, now)},
		{msg: *own, enqueued: now, expires: expiryOf(own, now)},
	}}
	if gone := ds.dropExpired(now.Add(59 * time.Minute)); len(gone) != 0 {
		t.Fatalf("%d expired before the hour", len(gone))
	}
	gone := ds.dropExpired(now.Add(61 * time.Minute))
	if len(gone) != 1 || gone[0].msg.MessageID != "plain" || len(ds.queue) != 1 {
		t.Fatalf("after the hour: expired %d, queue %d; want the plain message gone, the other kept", len(gone), len(ds.queue))
	}
}
