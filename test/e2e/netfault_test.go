//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/internal/netfault"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/dps"
	hubsess "github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// The agent (real binary) reaches hubsim through an in-process fault proxy (internal/netfault):
// it dials the proxy's address and keeps hubsim's host name for TLS, so TLS and authentication
// are the real ones end to end.

// netAgent starts the agent dialing addr, with JSON debug logs and the given YAML (telemetry,
// connection, twin sections...).
func netAgent(t *testing.T, h *hub, cs, addr, yaml string) *proc {
	t.Helper()
	cfg := fmt.Sprintf("log:\n  format: json\n  level: debug\ntls:\n  caFile: %q\naddress: %q\n%s", h.ep.CAFile, addr, yaml)
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return startProc(t, "agent", "run", "--config", p, "--connection-string-file", writeSecret(t, "cs", cs))
}

// recordedIDs returns the message ids hubsim recorded for id.
func recordedIDs(t *testing.T, h *hub, id string) []string {
	t.Helper()
	msgs, err := h.svc.Telemetry(ctxT(t), id)
	if err != nil {
		t.Fatalf("recorded telemetry: %v", err)
	}
	return mids(msgs)
}

// awaitRecorded waits until hubsim has recorded at least n messages for id and returns their ids.
func awaitRecorded(t *testing.T, h *hub, id string, n int) []string {
	t.Helper()
	var got []string
	eventually(t, fmt.Sprintf("%d messages at hubsim", n), func() error {
		got = recordedIDs(t, h, id)
		if len(got) < n {
			return fmt.Errorf("%d of %d", len(got), n)
		}
		return nil
	})
	return got
}

// checkSequence checks that the recorded ids are one run's sequence 1..n in order, each once,
// except resends (a message seen before) of which there may be at most maxDups. It returns the
// number of resends.
func checkSequence(t *testing.T, ids []string, n, maxDups int) int {
	t.Helper()
	seen := map[string]bool{}
	dups, next, prefix := 0, 1, ""
	for _, mid := range ids {
		run, seq := msgSeq(t, mid)
		if prefix == "" {
			prefix = run
		} else if run != prefix {
			t.Fatalf("message id %q from another run than %q", mid, prefix)
		}
		if seen[mid] {
			dups++
			continue
		}
		if seq != next {
			t.Fatalf("message %d arrived where %d was due: lost or out of order (ids %v)", seq, next, ids)
		}
		seen[mid] = true
		next++
	}
	if next-1 != n {
		t.Fatalf("%d distinct messages recorded, want %d", next-1, n)
	}
	if dups > maxDups {
		t.Fatalf("%d resent messages, more than %d", dups, maxDups)
	}
	return dups
}

// msgSeq splits an agent's telemetry message id into its run prefix and sequence number.
func msgSeq(t *testing.T, mid string) (run string, seq int) {
	t.Helper()
	i := strings.LastIndex(mid, "-")
	seq, err := strconv.Atoi(mid[i+1:])
	if i < 0 || err != nil {
		t.Fatalf("message id %q has no sequence number", mid)
	}
	return mid[:i], seq
}

// stopClean stops the agent with SIGTERM and returns its stop summary, which must report no
// failed message.
func stopClean(t *testing.T, a *proc) map[string]any {
	t.Helper()
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit after SIGTERM: %v", err)
	}
	i := a.await(0, "the stop summary", msgIs(agent.MsgStopped))
	a.mu.Lock()
	l := a.lines[i]
	a.mu.Unlock()
	if fmt.Sprint(l["failed"]) != "0" || fmt.Sprint(l["queued"]) != "0" {
		t.Fatalf("stop summary %v: messages failed or left queued", l)
	}
	return l
}

const maxInFlight = 8 // the agent's default in-flight window: the most a reconnect can resend

// Half a second of latency each way (±50 ms) and every stream sliced into small TCP segments:
// the TLS handshake, CONNECT and every PUBLISH still work, on one connection, and every message
// arrives once, in order.
func TestNetfaultLatencyAndSlicing(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-nf-latency")
	p := netfault.Start(t, h.ep.MQTTAddress)
	if _, err := p.Latency(500*time.Millisecond, 50*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Slicer(40, 20, 500*time.Microsecond); err != nil {
		t.Fatal(err)
	}
	const n = 30
	a := netAgent(t, h, connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey), p.Addr(),
		fmt.Sprintf("telemetry:\n  interval: 100ms\n  count: %d\n", n))
	a.await(0, "connected through the proxy", and(msgIs(hubsess.MsgConnected), field("reason", "Connection_Ok")))
	a.await(0, "all messages accepted", and(msgIs("telemetry count reached"), field("count", n)))
	checkSequence(t, awaitRecorded(t, h, d.DeviceID, n), n, 0)
	sum := stopClean(t, a)
	if c := a.count(msgIs(hubsess.MsgDisconnectedRetrying)); c != 0 || fmt.Sprint(sum["connects"]) != "1" {
		t.Fatalf("latency and slicing cost a connection: %d disconnects, %v connects", c, sum["connects"])
	}
}

// 1 KB/s towards the hub with 1 KB messages: the queue backs up while the limit holds, and drains
// once it is lifted, with nothing lost and nothing resent (the connection survives).
func TestNetfaultBandwidthThenLifted(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-nf-bandwidth")
	p := netfault.Start(t, h.ep.MQTTAddress)
	const n = 40
	pad := strings.Repeat("x", 1000)
	a := netAgent(t, h, connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey), p.Addr(),
		fmt.Sprintf("telemetry:\n  interval: 50ms\n  count: %d\n  template: '{\"seq\":{{.Seq}},\"pad\":\"%s\"}'\n", n, pad))
	a.await(0, "connected", msgIs(hubsess.MsgConnected))
	f, err := p.Bandwidth(1, netfault.Upstream)
	if err != nil {
		t.Fatal(err)
	}
	a.await(0, "all messages accepted", and(msgIs("telemetry count reached"), field("count", n)))
	// 40 KB cannot pass at 1 KB/s in the time it took to accept them: the queue holds the rest.
	if got := len(recordedIDs(t, h, d.DeviceID)); got >= n {
		t.Fatalf("all %d messages delivered through a 1 KB/s limit before the last was accepted", got)
	} else {
		t.Logf("bandwidth: %d of %d delivered while limited to 1 KB/s", got, n)
	}
	if err := f.Remove(); err != nil {
		t.Fatal(err)
	}
	checkSequence(t, awaitRecorded(t, h, d.DeviceID, n), n, 0)
	stopClean(t, a)
	if c := a.count(msgIs(hubsess.MsgDisconnectedRetrying)); c != 0 {
		t.Fatalf("the bandwidth limit cost the connection (%d disconnects)", c)
	}
}

// Connections reset while the fault lasts (the live one at its next byte, new ones at their
// first): the agent keeps retrying, reconnects once it is lifted, applies the desired change made
// meanwhile and reports it; telemetry resent at most one in-flight window per reconnect.
func TestNetfaultResetThenReconnect(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-nf-reset")
	p := netfault.Start(t, h.ep.MQTTAddress)
	cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	a := netAgent(t, h, cs, p.Addr(), fmt.Sprintf("stateDir: %q\ntelemetry:\n  interval: 200ms\n"+
		"twin:\n  properties:\n    interval:\n      action: accept\n", t.TempDir()))
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))
	awaitRecorded(t, h, d.DeviceID, 3)

	mark := a.numLines()
	f, err := p.Reset()
	if err != nil {
		t.Fatal(err)
	}
	lost := a.await(mark, "the connection lost", msgIs(hubsess.MsgDisconnectedRetrying))
	v := desiredPatch(t, h, d.DeviceID, map[string]any{"interval": 7})
	// A reconnect attempt is reset too.
	a.await(lost+1, "a reconnect attempt reset", and(msgIs(hubsess.MsgDisconnectedRetrying), func(l map[string]any) bool {
		return strings.Contains(fmt.Sprint(l["error"]), "reset by peer")
	}))
	if err := f.Remove(); err != nil {
		t.Fatal(err)
	}
	a.await(lost, "reconnected", and(msgIs(hubsess.MsgConnected), field("reason", "Connection_Ok")))
	a.await(lost, "the change made during the outage applied", and(msgIs(twinsync.MsgDesiredVersionApplied), field("version", v)))
	eventually(t, "reported state converged", func() error {
		r, _ := hubReported(t, h, d.DeviceID)
		if ac, av, val := ack(r, "interval"); ac != 200 || av != v || val != 7.0 {
			return fmt.Errorf("interval ack %v", r["interval"])
		}
		return nil
	})
	sum := stopClean(t, a)
	delivered, _ := strconv.Atoi(fmt.Sprint(sum["delivered"]))
	connects, _ := strconv.Atoi(fmt.Sprint(sum["connects"]))
	dups := checkSequence(t, recordedIDs(t, h, d.DeviceID), delivered, maxInFlight*(connects-1))
	t.Logf("reset: %d delivered over %d connections, %d resent", delivered, connects, dups)
}

// A blackhole (nothing passes either way, not even the hub closing its side) longer than the
// keep-alive: the agent finds the connection dead by its own keep-alive (no PINGRESP), not by a
// close it cannot see, reconnects once the path is back, and loses nothing it accepted.
func TestNetfaultBlackholeDetectedByKeepAlive(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-nf-blackhole")
	p := netfault.Start(t, h.ep.MQTTAddress)
	cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	// keepAlive 2s: PINGREQ 2s after the last packet received, PINGRESP awaited min(operation
	// timeout, 30s) = 30s. The operation timeout (40s) is longer, so a PUBACK timeout cannot
	// be what ends the connection first.
	a := netAgent(t, h, cs, p.Addr(), "connection:\n  keepAlive: 2s\n  operationTimeout: 40s\n  backoffMax: 2s\n"+
		"telemetry:\n  interval: 200ms\n")
	a.await(0, "connected", msgIs(hubsess.MsgConnected))
	awaitRecorded(t, h, d.DeviceID, 3)

	mark := a.numLines()
	f, err := p.Blackhole()
	if err != nil {
		t.Fatal(err)
	}
	lost := a.await(mark, "the dead connection detected", msgIs(hubsess.MsgDisconnectedRetrying))
	a.mu.Lock()
	why := fmt.Sprint(a.lines[lost]["error"])
	a.mu.Unlock()
	if !strings.Contains(why, "pingresp not received") {
		t.Fatalf("connection ended by %q, want the keep-alive (pingresp not received)", why)
	}
	if err := f.Remove(); err != nil {
		t.Fatal(err)
	}
	a.await(lost, "reconnected", and(msgIs(hubsess.MsgConnected), field("reason", "Connection_Ok")))
	before := len(recordedIDs(t, h, d.DeviceID))
	awaitRecorded(t, h, d.DeviceID, before+3) // telemetry flows again
	sum := stopClean(t, a)
	delivered, _ := strconv.Atoi(fmt.Sprint(sum["delivered"]))
	connects, _ := strconv.Atoi(fmt.Sprint(sum["connects"]))
	dups := checkSequence(t, recordedIDs(t, h, d.DeviceID), delivered, maxInFlight*(connects-1))
	t.Logf("blackhole: %d delivered over %d connections, %d resent; ended by %q", delivered, connects, dups, why)
}

// Two agents with one device identity: hubsim, like IoT Hub, keeps one connection per device and
// closes the older one (MQTT 3.1.1 has no DISCONNECT from the server: the device sees its TCP
// connection closed, nothing more). They take the connection from each other, and at least one
// of them says why in its log.
func TestTwoAgentsOneIdentityWarn(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-twins")
	cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	cfg := "telemetry:\n  interval: 500ms\n"
	a := netAgent(t, h, cs, h.ep.MQTTAddress, cfg)
	b := netAgent(t, h, cs, h.ep.MQTTAddress, cfg)
	warned := and(msgIs(hubsess.MsgIdentityInUse), field("level", "warn"))
	who := awaitAny(t, "the identity-in-use warning", warned, a, b)
	st := who.await(0, "the status reason", and(msgIs(hubsess.MsgDisconnectedRetrying), field("reason", "Identity_In_Use")))
	who.mu.Lock()
	why := fmt.Sprint(who.lines[st]["error"])
	who.mu.Unlock()
	if !strings.Contains(why, "another client is connected with this device identity") {
		t.Fatalf("status error %q does not name the cause", why)
	}
	h.await(0, "hubsim closing the older connection", and(msgIs("closing device connection"),
		field("reason", "taken over by a new connection with the same device ID")))
	if n := who.count(warned); n != 1 {
		t.Fatalf("%d identity warnings, want one (rate-limited)", n)
	}
}

// awaitAny waits until a or b logs a line matching match, and returns that process.
func awaitAny(t *testing.T, what string, match func(map[string]any) bool, a, b *proc) *proc {
	t.Helper()
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	for {
		var wakes [2]chan struct{}
		for i, p := range []*proc{a, b} {
			p.mu.Lock()
			for _, l := range p.lines {
				if match(l) {
					p.mu.Unlock()
					return p
				}
			}
			wakes[i] = p.wake
			p.mu.Unlock()
		}
		select {
		case <-wakes[0]:
		case <-wakes[1]:
		case <-deadline.C:
			t.Fatalf("no process logged %s within %v", what, waitTimeout)
		}
	}
}

// DPS over HTTPS and the hub's MQTT both through fault proxies with latency (300 ms ±30 each way)
// and sliced segments: the agent provisions, connects and applies the initial twin.
func TestNetfaultDPSOverHTTPSWithLatency(t *testing.T) {
	h := newHub(t)
	c := dpsClient(t, h)
	groupEnrollment(t, c, "e2e-nf-group", nil)
	web := netfault.Start(t, h.ep.HTTPSAddress)
	mqtt := netfault.Start(t, h.ep.MQTTAddress)
	for _, p := range []*netfault.Proxy{web, mqtt} {
		if _, err := p.Latency(300*time.Millisecond, 30*time.Millisecond); err != nil {
			t.Fatal(err)
		}
		if _, err := p.Slicer(100, 50, 200*time.Microsecond); err != nil {
			t.Fatal(err)
		}
	}
	via := *h // the agent's view of hubsim: both addresses through the proxies
	via.ep.HTTPSAddress, via.ep.MQTTAddress = web.Addr(), mqtt.Addr()
	regID := "nf-dps-https"
	a := startDPSAgent(t, &via, t.TempDir(), "https", fmt.Sprintf("  registrationId: %s\n  groupKeyFile: %q\n",
		regID, writeSecret(t, "group.key", e2eGroupKey)))
	a.await(0, "provisioned through the proxy", and(msgIs(dps.MsgProvisioned), field("device", regID)))
	a.await(0, "connected through the proxy", and(msgIs(hubsess.MsgConnected), field("device", regID)))
	awaitInitialTwin(t, h, a, regID)
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}
