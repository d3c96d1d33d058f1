//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/agent"
	hubsess "github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/service"
)

// notifySocket is a fake systemd: the unixgram socket $NOTIFY_SOCKET names, recording every
// datagram the agent sends.
type notifySocket struct {
	t    *testing.T
	path string
	msgs chan sdMsg
}

type sdMsg struct {
	at     time.Time
	fields map[string]string
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	dir, err := os.MkdirTemp("", "sd") // short: a socket path is at most 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	s := &notifySocket{t: t, path: path, msgs: make(chan sdMsg, 1024)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			m := sdMsg{at: time.Now(), fields: map[string]string{}}
			for _, line := range strings.Split(string(buf[:n]), "\n") {
				k, v, _ := strings.Cut(line, "=")
				m.fields[k] = v
			}
			select {
			case s.msgs <- m:
			default:
				t.Errorf("notify socket: too many messages unread")
			}
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return s
}

// await returns the first message (from now on) that has key (with value want, if want is not
// empty), failing at the deadline.
func (s *notifySocket) await(what, key, want string) sdMsg {
	s.t.Helper()
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	for {
		select {
		case m := <-s.msgs:
			if v, ok := m.fields[key]; ok && (want == "" || v == want) {
				return m
			}
		case <-deadline.C:
			s.t.Fatalf("no %s (%s=%s) on the notify socket within %v", what, key, want, waitTimeout)
		}
	}
}

// startNotifyAgent runs the agent as systemd would: $NOTIFY_SOCKET and $WATCHDOG_USEC set.
func startNotifyAgent(t *testing.T, h *hub, ns *notifySocket, cs, cfgPath string, watchdog time.Duration, extra ...string) *proc {
	t.Helper()
	t.Setenv("NOTIFY_SOCKET", ns.path)
	wd := ""
	if watchdog > 0 {
		wd = fmt.Sprint(watchdog.Microseconds())
	}
	t.Setenv("WATCHDOG_USEC", wd)
	args := append([]string{"run", "--config", cfgPath, "--connection-string-file", writeSecret(t, "cs", cs)}, extra...)
	return startProc(t, "agent", args...)
}

func writeAgentConfig(t *testing.T, path, caFile, interval string) {
	t.Helper()
	cfg := fmt.Sprintf("log:\n  format: json\n  level: debug\ntls:\n  caFile: %q\ntelemetry:\n  interval: %s\n", caFile, interval)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

// READY=1 comes while the hub is down (the service is up; the device is offline); STATUS=
// follows the connection when hubsim comes up; the watchdog is pinged about every
// WATCHDOG_USEC/2; SIGHUP gives RELOADING=1 then READY=1; SIGTERM gives STOPPING=1.
func TestSystemdNotify(t *testing.T) {
	state := t.TempDir()
	mqttAddr, httpsAddr := freeAddr(t), freeAddr(t)
	h := startHub(t, state, mqttAddr, httpsAddr)
	d := createDevice(t, h, "e2e-systemd")
	cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	if err := h.stop(); err != nil {
		t.Fatalf("hubsim exit: %v", err)
	}
	ns := newNotifySocket(t)
	cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
	writeAgentConfig(t, cfgPath, h.ep.CAFile, "1h")
	const watchdog = 2 * time.Second
	a := startNotifyAgent(t, h, ns, cs, cfgPath, watchdog)

	ready := ns.await("READY=1 with the hub down", "READY", "1")
	if !strings.HasPrefix(ready.fields["STATUS"], "connecting") {
		t.Errorf("STATUS with READY=1: %q, want connecting...", ready.fields["STATUS"])
	}
	if n := a.count(msgIs(hubsess.MsgConnected)); n != 0 {
		t.Fatalf("connected before hubsim started (%d)", n)
	}
	down := ns.await("STATUS while the hub is down", "STATUS", "")
	if !strings.HasPrefix(down.fields["STATUS"], "disconnected") {
		t.Errorf("STATUS while the hub is down: %q, want disconnected...", down.fields["STATUS"])
	}

	startHub(t, state, mqttAddr, httpsAddr)
	ns.await("STATUS once hubsim is up", "STATUS", "connected to the hub")

	// Watchdog: count pings over a window. systemd needs one every WATCHDOG_USEC; the agent
	// sends them at half that.
	first := ns.await("a watchdog ping", "WATCHDOG", "1")
	last, n := first, 0
	for n < 4 {
		m := ns.await("a watchdog ping", "WATCHDOG", "1")
		if gap := m.at.Sub(last.at); gap > watchdog {
			t.Errorf("watchdog ping %s after the previous one: past WATCHDOG_USEC=%s", gap, watchdog)
		}
		last, n = m, n+1
	}
	if mean := last.at.Sub(first.at) / time.Duration(n); mean < watchdog/4 {
		t.Errorf("watchdog pings every %s on average: far more often than WATCHDOG_USEC/2 = %s", mean, watchdog/2)
	}

	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	ns.await("RELOADING=1 on SIGHUP", "RELOADING", "1")
	r := ns.await("READY=1 after the reload", "READY", "1")
	if r.fields["STATUS"] != agent.MsgConfigReloaded {
		t.Errorf("STATUS with READY=1 after the reload: %q", r.fields["STATUS"])
	}

	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
	ns.await("STOPPING=1 at SIGTERM", "STOPPING", "1")
}

// A reload with a new telemetry interval keeps the connection (one connect in all) and hubsim
// sees the new interval; an invalid file is refused with a log line and the agent keeps
// running with the configuration it had.
func TestReloadTelemetryInterval(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-reload")
	cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	ns := newNotifySocket(t)
	cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
	writeAgentConfig(t, cfgPath, h.ep.CAFile, "1h") // no telemetry within the test
	a := startNotifyAgent(t, h, ns, cs, cfgPath, 0)
	a.await(0, "connected", msgIs(hubsess.MsgConnected))

	writeAgentConfig(t, cfgPath, h.ep.CAFile, "100ms")
	from := a.numLines()
	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	a.await(from, "the reload", and(msgIs(agent.MsgConfigReloaded), field("telemetry_interval", "0.1")))
	eventually(t, "10 messages at the new interval", func() error {
		msgs, err := h.svc.Telemetry(ctxT(t), d.DeviceID)
		if err == nil && len(msgs) < 10 {
			err = fmt.Errorf("%d messages so far", len(msgs))
		}
		return err
	})

	// Invalid: refused, logged, the device keeps running and sending.
	if reason := reloadRefused(t, a, cfgPath, "telemetry:\n  interval: [not a duration\n"); !strings.Contains(reason, "invalid configuration") {
		t.Errorf("refusal reason %q does not name the configuration error", reason)
	}
	before, err := h.svc.Telemetry(ctxT(t), d.DeviceID)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "telemetry continuing after the refused reload", func() error {
		msgs, err := h.svc.Telemetry(ctxT(t), d.DeviceID)
		if err == nil && len(msgs) < len(before)+5 {
			err = errors.New("no new messages")
		}
		return err
	})
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
	if n := a.count(msgIs(hubsess.MsgConnected)); n != 1 {
		t.Errorf("%d connects across the reloads, want 1", n)
	}
	stopped := a.await(0, "the stop summary", msgIs(agent.MsgStopped))
	a.mu.Lock()
	connects := fmt.Sprint(a.lines[stopped]["connects"])
	a.mu.Unlock()
	if connects != "1" {
		t.Errorf("session connects %s, want 1 (the reload reconnected)", connects)
	}
}

// A wedged loop stops the watchdog pings: for each loop, the agent pings at WATCHDOG_USEC/2
// while its loops progress; the test hook (--test-wedge, on SIGUSR1) then makes that loop's next
// piece of work never finish, and no WATCHDOG=1 comes for more than WATCHDOG_USEC (systemd would
// restart the agent) while STATUS= still does, naming the loop, and /healthz fails naming it.
func TestSystemdWatchdogStopsWhenLoopWedged(t *testing.T) {
	h := newHub(t)
	const watchdog = 2 * time.Second
	for _, tc := range []struct {
		loop    string
		trigger func(t *testing.T, deviceID string) // makes the loop start a piece of work
	}{
		{agent.LoopTelemetry, func(*testing.T, string) {}}, // the next telemetry tick
		{agent.LoopTwin, func(t *testing.T, id string) { // a desired-property handler
			if _, err := h.svc.UpdateTwin(ctxT(t), id, map[string]any{"properties": map[string]any{"desired": map[string]any{"mode": "eco"}}}, "*"); err != nil {
				t.Fatal(err)
			}
		}},
		{agent.LoopSupervisor, func(t *testing.T, id string) { // the delivery of a C2D message
			if _, err := h.svc.SendC2D(ctxT(t), id, service.C2DMessage{Body: `{}`, MessageID: "wedge-1"}); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.loop, func(t *testing.T) {
			d := createDevice(t, h, "e2e-wedge-"+tc.loop)
			cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
			ns := newNotifySocket(t)
			cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
			writeAgentConfig(t, cfgPath, h.ep.CAFile, "200ms")
			health := freeAddr(t)
			t.Setenv("IOTHUBBY_TEST_HOOKS", "1")
			a := startNotifyAgent(t, h, ns, cs, cfgPath, watchdog, "--test-wedge", tc.loop,
				"--health-addr", health, "--health-wedge-after", "500ms")
			ns.await("STATUS connected", "STATUS", "connected to the hub")
			prev := ns.await("a watchdog ping before the wedge", "WATCHDOG", "1")
			next := ns.await("a watchdog ping before the wedge", "WATCHDOG", "1")
			if gap := next.at.Sub(prev.at); gap > watchdog {
				t.Errorf("watchdog pings %s apart before the wedge: past WATCHDOG_USEC=%s", gap, watchdog)
			}
			if code, body := httpGet(t, "http://"+health+"/healthz"); code != 200 {
				t.Fatalf("/healthz before the wedge = %d %q", code, body)
			}

			from := a.numLines()
			if err := a.cmd.Process.Signal(syscall.SIGUSR1); err != nil {
				t.Fatal(err)
			}
			a.await(from, "the hook armed", and(msgIs(agent.MsgTestWedgeArmed), field("loop", tc.loop)))
			tc.trigger(t, d.DeviceID)
			a.await(from, "the wedge", and(msgIs(agent.MsgTestWedged), field("loop", tc.loop)))
			wedgedAt := time.Now() // the wedge began before its log line was read

			// Read the socket for twice WATCHDOG_USEC. One ping may still come from a check
			// made while the wedged work was younger than the ping period; after it, none.
			lastPing, pings, unhealthy := next.at, 0, ""
			deadline := time.NewTimer(2 * watchdog)
		read:
			for {
				select {
				case m := <-ns.msgs:
					if m.fields["WATCHDOG"] == "1" {
						lastPing, pings = m.at, pings+1
					}
					if s := m.fields["STATUS"]; strings.HasPrefix(s, "unhealthy") {
						unhealthy = s
					}
				case <-deadline.C:
					break read
				}
			}
			end := wedgedAt.Add(2 * watchdog)
			if pings > 1 {
				t.Errorf("%d watchdog pings after the %s loop wedged, want at most 1", pings, tc.loop)
			}
			if quiet := end.Sub(lastPing); quiet <= watchdog {
				t.Errorf("last watchdog ping %s before the end of the window: systemd (WATCHDOG_USEC=%s) would not have restarted the agent", quiet, watchdog)
			}
			if !strings.Contains(unhealthy, tc.loop) {
				t.Errorf("STATUS while wedged = %q, want unhealthy naming %s", unhealthy, tc.loop)
			}
			a.await(from, "the log line withholding the pings", and(msgIs("not pinging the systemd watchdog: a loop makes no progress"),
				func(m map[string]any) bool { return strings.Contains(fmt.Sprint(m["error"]), tc.loop) }))
			if code, body := httpGet(t, "http://"+health+"/healthz"); code != 503 || !strings.Contains(body, tc.loop) {
				t.Errorf("/healthz while wedged = %d %q, want 503 naming %s", code, body, tc.loop)
			}

			// SIGTERM releases the wedged work with the device: a clean exit.
			if err := a.stop(); err != nil {
				t.Fatalf("agent exit: %v", err)
			}
		})
	}
}

// writeBehaviourConfig writes an agent configuration with scripted method ping answering
// pingPayload (plus the extra methods YAML), twin property mode handled by modeAction and the
// static reported properties reported (YAML flow mapping).
func writeBehaviourConfig(t *testing.T, path, caFile, pingPayload, extraMethods, modeAction, reported string) {
	t.Helper()
	cfg := fmt.Sprintf("log:\n  format: json\n  level: debug\ntls:\n  caFile: %q\ntelemetry:\n  interval: 1h\n"+
		"methods:\n  ping:\n    payload: %q\n%stwin:\n  reported: %s\n  properties:\n    mode: %s\n", caFile, pingPayload, extraMethods, reported, modeAction)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

// SIGHUP with new scripted methods, twin behaviours and static reported properties applies them
// on the same connection: the method answers with the new payload, a new method answers, a
// desired change gets the new behaviour's ack, the reported properties change (a removed one is
// deleted), and hubsim saw one connect of the device; an invalid file is refused and the
// reloaded behaviours stay.
func TestReloadMethodsAndTwinInPlace(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-reload-behaviours")
	cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	ns := newNotifySocket(t)
	cfgPath := filepath.Join(t.TempDir(), "agent.yaml")
	writeBehaviourConfig(t, cfgPath, h.ep.CAFile, "v1", "", "{action: accept}", "{rack: 3}")
	a := startNotifyAgent(t, h, ns, cs, cfgPath, 0)
	ns.await("STATUS connected", "STATUS", "connected to the hub")
	eventually(t, "the static reported property rack", func() error {
		tw, err := h.svc.GetTwin(ctxT(t), d.DeviceID)
		if err == nil && fmt.Sprint(tw.Properties.Reported["rack"]) != "3" {
			err = fmt.Errorf("reported %v", tw.Properties.Reported)
		}
		return err
	})
	call := func(name string) service.MethodResult {
		t.Helper()
		res, err := h.svc.InvokeMethod(ctxT(t), d.DeviceID, service.MethodCall{MethodName: name, ResponseTimeout: 10 * time.Second})
		if err != nil {
			t.Fatalf("invoke %s: %v", name, err)
		}
		return res
	}
	if res := call("ping"); string(res.Payload) != `"v1"` {
		t.Fatalf("ping before the reload: %d %s", res.Status, res.Payload)
	}

	writeBehaviourConfig(t, cfgPath, h.ep.CAFile, "v2", "  fresh:\n    status: 201\n    payload: {new: true}\n",
		"{action: reject, status: 409, description: frozen}", "{site: lab}")
	from := a.numLines()
	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	a.await(from, "the reload", and(msgIs(agent.MsgConfigReloaded), field("methods_changed", true), field("twin_changed", true)))
	ns.await("READY=1 after the reload", "READY", "1")
	if res := call("ping"); res.Status != 200 || string(res.Payload) != `"v2"` {
		t.Errorf("ping after the reload: %d %s, want 200 \"v2\"", res.Status, res.Payload)
	}
	if res := call("fresh"); res.Status != 201 || string(res.Payload) != `{"new":true}` {
		t.Errorf("new method after the reload: %d %s, want 201 {\"new\":true}", res.Status, res.Payload)
	}
	if _, err := h.svc.UpdateTwin(ctxT(t), d.DeviceID, map[string]any{"properties": map[string]any{"desired": map[string]any{"mode": "eco"}}}, "*"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the reloaded twin behaviour's ack", func() error {
		tw, err := h.svc.GetTwin(ctxT(t), d.DeviceID)
		if err != nil {
			return err
		}
		ack, _ := tw.Properties.Reported["mode"].(map[string]any)
		if fmt.Sprint(ack["ac"]) != "409" || ack["ad"] != "frozen" {
			return fmt.Errorf("reported mode %v, want ac 409 ad frozen", ack)
		}
		// The reloaded static reported properties: site added, rack (removed) deleted.
		if _, rack := tw.Properties.Reported["rack"]; rack || tw.Properties.Reported["site"] != "lab" {
			return fmt.Errorf("reported %v, want site lab and no rack", tw.Properties.Reported)
		}
		return nil
	})

	// Invalid (two payload kinds for one method): refused, the reloaded behaviours stay.
	if reason := reloadRefused(t, a, cfgPath, "methods:\n  ping:\n    payload: v3\n    echo: true\n"); !strings.Contains(reason, "methods.ping") {
		t.Errorf("refusal reason %q does not name methods.ping", reason)
	}
	if res := call("ping"); string(res.Payload) != `"v2"` {
		t.Errorf("ping after the refused reload: %d %s, want the reloaded \"v2\"", res.Status, res.Payload)
	}

	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
	if n := h.count(and(msgIs("device connected"), field("device", d.DeviceID))); n != 1 {
		t.Errorf("hubsim saw %d connects of the device, want 1 (a reload reconnected)", n)
	}
	stopped := a.await(0, "the stop summary", msgIs(agent.MsgStopped))
	a.mu.Lock()
	connects := fmt.Sprint(a.lines[stopped]["connects"])
	a.mu.Unlock()
	if connects != "1" {
		t.Errorf("session connects %s, want 1", connects)
	}
}

// reloadRefused writes an invalid configuration to cfgPath, sends the agent SIGHUP, waits for
// the refusal line and returns the reason it gives.
func reloadRefused(t *testing.T, a *proc, cfgPath, cfg string) string {
	t.Helper()
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	from := a.numLines()
	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	refused := a.await(from, "the refusal", msgIs("reload refused: keeping the running configuration"))
	a.mu.Lock()
	defer a.mu.Unlock()
	return fmt.Sprint(a.lines[refused]["error"])
}
