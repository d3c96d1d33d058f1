package hub_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
)

// nextRetry waits for the next DisconnectedRetrying status, whatever its reason.
func (l *statusLog) nextRetry(t *testing.T) hub.Status {
	t.Helper()
	deadline := time.After(15 * time.Second)
	for {
		select {
		case st := <-l.ch:
			if st.State == hub.DisconnectedRetrying {
				return st
			}
		case <-deadline:
			t.Fatalf("no Disconnected_Retrying status; saw %v", l.snapshot())
		}
	}
}

// identityWarnings counts the identity-in-use warnings logged so far.
func identityWarnings(logs *observer.ObservedLogs) int {
	return logs.FilterMessage(hub.MsgIdentityInUse).FilterLevelExact(zapcore.WarnLevel).Len()
}

// startObserved is startFake with a 1s reconnect delay and an observed logger.
func startObserved(t *testing.T, b *hubtest.Broker) (*fixture, *clock.Fake, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	f, clk := startFake(t, b, func(c *hub.Config) {
		c.Logger = zap.New(core)
		c.Rand = func() float64 { return 0 } // every retry after the 1s floor
	})
	return f, clk, logs
}

// Two sessions with one device identity take the connection from each other (the broker, like
// IoT Hub, closes the older connection when the same client id connects again). Each sees its
// connection closed by the peer right after CONNACK; at the third time within the window the
// status says Identity_In_Use, wrapping ErrIdentityInUse, and one warning names the likely cause.
// The warning is rate-limited; the reason stays while the pattern does.
func TestTwoClientsOneIdentityAreToldSo(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	a, aclk, alogs := startObserved(t, b)
	a.status.wait(t, hub.Connected, hub.ConnectionOK)
	c, cclk, clogs := startObserved(t, b)
	c.status.wait(t, hub.Connected, hub.ConnectionOK)

	type side struct {
		name string
		f    *fixture
		clk  *clock.Fake
		logs *observer.ObservedLogs
	}
	loser, winner := side{"a", a, aclk, alogs}, side{"c", c, cclk, clogs}
	losses := map[string]int{}
	for round := range 8 {
		st := loser.f.status.nextRetry(t)
		losses[loser.name]++
		n := losses[loser.name]
		if n < 3 {
			if st.Reason != hub.CommunicationError || errors.Is(st.Err, hub.ErrIdentityInUse) {
				t.Fatalf("round %d: %s's loss %d: %v (%v), want Communication_Error before the pattern", round, loser.name, n, st.Reason, st.Err)
			}
			if w := identityWarnings(loser.logs); w != 0 {
				t.Fatalf("round %d: %s warned after %d losses", round, loser.name, n)
			}
		} else {
			if st.Reason != hub.IdentityInUse || !errors.Is(st.Err, hub.ErrIdentityInUse) {
				t.Fatalf("round %d: %s's loss %d: %v (%v), want Identity_In_Use wrapping ErrIdentityInUse", round, loser.name, n, st.Reason, st.Err)
			}
			if st.Reason.String() != "Identity_In_Use" {
				t.Fatalf("reason name %q", st.Reason)
			}
			if !strings.Contains(st.Err.Error(), "another client is connected with this device identity") {
				t.Fatalf("status error %q does not name the cause", st.Err)
			}
			if w := identityWarnings(loser.logs); w != 1 {
				t.Fatalf("round %d: %s logged %d identity warnings after %d losses, want exactly 1", round, loser.name, w, n)
			}
		}
		// The loser reconnects after its delay and takes the identity back.
		retry(t, loser.clk, st)
		loser.f.status.wait(t, hub.Connected, hub.ConnectionOK)
		loser, winner = winner, loser
	}
	if losses["a"] != 4 || losses["c"] != 4 {
		t.Fatalf("losses %v", losses)
	}
	w := alogs.FilterMessage(hub.MsgIdentityInUse).All()[0]
	if got := w.ContextMap()["closed_after_connect"]; got != int64(3) {
		t.Errorf("warning fields %v", w.ContextMap())
	}
}

// A connection dropped by the hub once it has been up a while is not the pattern, and a stable
// connection ends a pattern begun before it.
func TestLateDropsAreNotIdentityInUse(t *testing.T) {
	t.Parallel()
	b := hubtest.NewBroker(t)
	f, clk, logs := startObserved(t, b)
	f.status.wait(t, hub.Connected, hub.ConnectionOK)
	drop := func(upFor time.Duration) hub.Status {
		t.Helper()
		clk.Advance(upFor)
		b.Drop("dev1")
		st := f.status.nextRetry(t)
		retry(t, clk, st)
		f.status.wait(t, hub.Connected, hub.ConnectionOK)
		return st
	}
	// Up 15 s each time: not "right after CONNACK".
	for i := range 4 {
		if st := drop(15 * time.Second); st.Reason != hub.CommunicationError {
			t.Fatalf("drop %d after 15s: %v", i, st.Reason)
		}
	}
	// Two quick drops, a stable connection, two quick drops: never three in a row.
	for i, up := range []time.Duration{0, 0, hub.StableAfter, 0, 0} {
		if st := drop(up); st.Reason != hub.CommunicationError {
			t.Fatalf("drop %d (up %v): %v", i, up, st.Reason)
		}
	}
	// The third quick one in a row is the pattern.
	if st := drop(0); st.Reason != hub.IdentityInUse {
		t.Fatalf("third quick drop: %v, want Identity_In_Use", st.Reason)
	}
	if w := identityWarnings(logs); w != 1 {
		t.Fatalf("%d warnings", w)
	}
}
