//go:build e2e

package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	hubsess "github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/endpoints"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/twinsync"
	"github.com/iothubby/iothubby/pkg/wire"
)

// twinAgent starts the agent with a state directory and the given twin YAML.
func twinAgent(t *testing.T, h *hub, cs, stateDir, twinYAML string) *proc {
	t.Helper()
	return startAgent(t, h, cs, fmt.Sprintf("stateDir: %q\n%s", stateDir, twinYAML))
}

// hubReported is the hub's reported section without $version and $metadata, as plain JSON values.
func hubReported(t *testing.T, h *hub, id string) (map[string]any, float64) {
	t.Helper()
	tw, err := h.svc.GetTwin(ctxT(t), id)
	if err != nil {
		t.Fatalf("GetTwin: %v", err)
	}
	r := plain(t, tw.Properties.Reported)
	v, _ := r["$version"].(float64)
	delete(r, "$version")
	delete(r, "$metadata")
	return r, v
}

func plain(t *testing.T, v any) map[string]any {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// intended reads the agent's persisted intended reported state.
func intended(t *testing.T, stateDir, id string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(stateDir, "twin-"+id+".json"))
	if err != nil {
		t.Fatalf("agent state: %v", err)
	}
	var st struct {
		DesiredVersion int64          `json:"desiredVersion"`
		Reported       map[string]any `json:"reported"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("agent state %s: %v", b, err)
	}
	return st.Reported
}

func ack(r map[string]any, k string) (ac, av float64, value any) {
	m, _ := r[k].(map[string]any)
	ac, _ = m["ac"].(float64)
	av, _ = m["av"].(float64)
	return ac, av, m["value"]
}

func desiredPatch(t *testing.T, h *hub, id string, desired map[string]any) float64 {
	t.Helper()
	tw, err := h.svc.UpdateTwin(ctxT(t), id, map[string]any{"properties": map[string]any{"desired": desired}}, "*")
	if err != nil {
		t.Fatalf("UpdateTwin: %v", err)
	}
	v, _ := plain(t, tw.Properties.Desired)["$version"].(float64)
	return v
}

// A desired change made while the agent is down is applied after it comes back; the agent
// killed without a clean stop loses nothing it had reported and applies nothing twice.
func TestTwinOfflineChangeAndAgentRestart(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-twin-offline")
	cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	state := t.TempDir()
	cfg := "twin:\n  firmwareVersion: \"1.2.3\"\n  reported:\n    site: lab\n  properties:\n    interval:\n      action: accept\n"
	a := twinAgent(t, h, cs, state, cfg)
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))
	v := desiredPatch(t, h, d.DeviceID, map[string]any{"interval": 5})
	a.await(0, "desired version applied", and(msgIs(twinsync.MsgDesiredVersionApplied), field("version", v)))
	eventually(t, "ack and facts on the hub", func() error {
		r, _ := hubReported(t, h, d.DeviceID)
		if ac, av, val := ack(r, "interval"); ac != 200 || av != v || val != 5.0 {
			return fmt.Errorf("interval ack %v", r["interval"])
		}
		if r["firmwareVersion"] != "1.2.3" || r["site"] != "lab" || r["agentVersion"] == nil || r["bootTime"] == nil {
			return fmt.Errorf("facts %v", r)
		}
		return nil
	})
	before, _ := hubReported(t, h, d.DeviceID)
	a.kill()

	v2 := desiredPatch(t, h, d.DeviceID, map[string]any{"interval": 9, "mode": "eco"})
	a2 := twinAgent(t, h, cs, state, cfg)
	a2.await(0, "the offline change applied", and(msgIs(twinsync.MsgDesiredVersionApplied), field("version", v2)))
	if n := a2.count(and(msgIs(twinsync.MsgDesiredPropertyApplied), field("version", v))); n != 0 {
		t.Fatalf("version %v applied again after the restart (%d times)", v, n)
	}
	eventually(t, "acks for the offline change", func() error {
		r, _ := hubReported(t, h, d.DeviceID)
		if ac, av, val := ack(r, "interval"); ac != 200 || av != v2 || val != 9.0 {
			return fmt.Errorf("interval ack %v", r["interval"])
		}
		if ac, av, val := ack(r, "mode"); ac != 200 || av != v2 || val != "eco" {
			return fmt.Errorf("mode ack %v", r["mode"])
		}
		for k, want := range before {
			if k == "interval" {
				continue
			}
			if !reflect.DeepEqual(r[k], want) {
				return fmt.Errorf("reported %s lost or changed: %v, was %v", k, r[k], want)
			}
		}
		return nil
	})
	if err := a2.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}

// 100 desired patches in a burst: the agent ends with the last value, acknowledged with the
// latest desired version.
func TestTwinDesiredBurst(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-twin-burst")
	a := twinAgent(t, h, connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey), t.TempDir(),
		"")
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))
	var last float64
	for i := 1; i <= 100; i++ {
		last = desiredPatch(t, h, d.DeviceID, map[string]any{"setting": i})
	}
	a.await(0, "the last desired version applied", and(msgIs(twinsync.MsgDesiredVersionApplied), field("version", last)))
	eventually(t, "the last ack on the hub", func() error {
		r, _ := hubReported(t, h, d.DeviceID)
		if ac, av, val := ack(r, "setting"); ac != 200 || av != last || val != 100.0 {
			return fmt.Errorf("setting ack %v, want value 100 av %v", r["setting"], last)
		}
		return nil
	})
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}

// hubsim killed in the middle of reported updates: after its restart the hub's reported
// section converges on the agent's intended state.
func TestTwinHubsimKilledDuringReportedUpdates(t *testing.T) {
	hubState := t.TempDir()
	mqttAddr, httpsAddr := freeAddr(t), freeAddr(t)
	h := startHub(t, hubState, mqttAddr, httpsAddr)
	d := createDevice(t, h, "e2e-twin-kill")
	state := t.TempDir()
	a := twinAgent(t, h, connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey), state, "")
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))
	for i := 1; i <= 20; i++ {
		desiredPatch(t, h, d.DeviceID, map[string]any{fmt.Sprintf("p%d", i%5): i})
	}
	from := a.numLines()
	a.await(from, "a reported update confirmed", msgIs(twinsync.MsgReportedConfirmed))
	h.kill()
	lost := a.await(from, "the agent noticing", msgIs(hubsess.MsgDisconnectedRetrying))
	h2 := startHub(t, hubState, mqttAddr, httpsAddr)
	a.await(lost, "reconnect", msgIs(hubsess.MsgConnected))
	eventually(t, "hub reported == agent intended", func() error {
		r, _ := hubReported(t, h2, d.DeviceID)
		want := plain(t, intended(t, state, d.DeviceID))
		if !reflect.DeepEqual(r, want) {
			return fmt.Errorf("hub %v\nagent %v", r, want)
		}
		return nil
	})
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}

// A service patch that breaks a twin limit is refused with 400 and Azure's error body; the
// agent keeps running and applies the next valid change.
func TestTwinLimitRejected(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-twin-limit")
	a := twinAgent(t, h, connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey), t.TempDir(), "")
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))
	for name, desired := range map[string]map[string]any{
		"bad key":     {"a.b": 1},
		"long string": {"s": strings.Repeat("x", 4097)},
		"too deep":    {"a": map[string]any{"b": map[string]any{"c": map[string]any{"d": map[string]any{"e": map[string]any{"f": map[string]any{"g": map[string]any{"h": map[string]any{"i": map[string]any{"j": map[string]any{"k": 1}}}}}}}}}}},
	} {
		_, err := h.svc.UpdateTwin(ctxT(t), d.DeviceID, map[string]any{"properties": map[string]any{"desired": desired}}, "*")
		var se wire.ServiceError
		if !errors.As(err, &se) || se.Status != 400 || se.Code != "ArgumentInvalid" {
			t.Fatalf("%s: %v", name, err)
		}
	}
	_, err := h.svc.UpdateTwin(ctxT(t), d.DeviceID, map[string]any{"properties": map[string]any{"desired": map[string]any{"x": 1}}}, `"AAAAAAAAAAA="`)
	var se wire.ServiceError
	if !errors.As(err, &se) || se.Status != 412 {
		t.Fatalf("stale etag: %v", err)
	}
	v := desiredPatch(t, h, d.DeviceID, map[string]any{"ok": true})
	a.await(0, "the valid change", and(msgIs(twinsync.MsgDesiredVersionApplied), field("version", v)))
	if !a.alive() {
		t.Fatal("agent stopped")
	}
	tw, err := h.svc.GetTwin(ctxT(t), d.DeviceID)
	if err != nil {
		t.Fatal(err)
	}
	if tw.Properties.Desired["$metadata"] == nil || tw.Properties.Reported["$metadata"] == nil {
		t.Fatalf("service view without $metadata: %+v", tw.Properties)
	}
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}

// startHubWith is startHub with extra hubsim flags.
func startHubWith(t *testing.T, extra ...string) *hub {
	t.Helper()
	state := t.TempDir()
	args := append([]string{"serve", "--state", state, "--mqtt-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0",
		"--amqp-addr", "127.0.0.1:0", "--log-format", "json", "--log-level", "debug"}, extra...)
	p := startProc(t, "hubsim", args...)
	p.await(0, "hubsim ready", msgIs(hubsim.MsgReady))
	ep, err := endpoints.Read(state)
	if err != nil || ep.PID != p.cmd.Process.Pid {
		t.Fatalf("endpoints.json after ready: %+v %v", ep, err)
	}
	c, err := service.New(service.Config{ConnectionString: ep.ServiceConnectionString, Address: ep.HTTPSAddress, CAFile: ep.CAFile})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return &hub{proc: p, state: state, ep: ep, svc: c}
}

// Over hubsim's twin rate limit the agent's requests get 429; it backs off, retries, and the
// hub still ends with the agent's intended state.
func TestTwinThrottledAgentConverges(t *testing.T) {
	// one request per second: the agent's facts PATCH right after its GET is already over it
	h := startHubWith(t, "--twin-rate-limit", "1")
	d := createDevice(t, h, "e2e-twin-429")
	state := t.TempDir()
	a := twinAgent(t, h, connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey), state, "")
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))
	var last float64
	for i := 1; i <= 30; i++ {
		last = desiredPatch(t, h, d.DeviceID, map[string]any{fmt.Sprintf("k%d", i%3): i})
	}
	a.await(0, "a 429 retried", and(msgIs(twinsync.MsgReportedRetrying)))
	a.await(0, "the last version applied", and(msgIs(twinsync.MsgDesiredVersionApplied), field("version", last)))
	eventually(t, "hub reported == agent intended", func() error {
		r, _ := hubReported(t, h, d.DeviceID)
		want := plain(t, intended(t, state, d.DeviceID))
		if !reflect.DeepEqual(r, want) {
			return fmt.Errorf("hub %v\nagent %v", r, want)
		}
		if _, av, _ := ack(r, "k0"); av != last {
			return fmt.Errorf("k0 ack av %v, want %v", av, last)
		}
		return nil
	})
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}

// The configurable behaviours: accept after a delay (202 then 200), reject with a status, and a
// command whose exit status decides the ack.
func TestTwinBehaviours(t *testing.T) {
	h := newHub(t)
	d := createDevice(t, h, "e2e-twin-behaviours")
	out := filepath.Join(t.TempDir(), "led")
	cfg := fmt.Sprintf(`twin:
  default:
    action: ignore
  properties:
    slow:
      action: delay
      delay: 300ms
    locked:
      action: reject
      status: 409
      description: read-only
    led:
      action: command
      command: ["/bin/sh", "-c", "printf '%%s' \"$IOTHUBBY_VALUE\" > %s"]
    broken:
      action: command
      command: ["/bin/sh", "-c", "echo no such device >&2; exit 3"]
`, out)
	a := twinAgent(t, h, connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey), t.TempDir(), cfg)
	a.await(0, "twin synced", msgIs(twinsync.MsgTwinSynced))
	v := desiredPatch(t, h, d.DeviceID, map[string]any{"slow": "on", "locked": 1, "led": "green", "broken": true, "free": 1})
	a.await(0, "202 for slow", and(msgIs(twinsync.MsgDesiredPropertyApplied), field("path", "slow"), field("ac", 202)))
	a.await(0, "200 for slow", and(msgIs(twinsync.MsgDesiredPropertyApplied), field("path", "slow"), field("ac", 200)))
	eventually(t, "acks", func() error {
		r, _ := hubReported(t, h, d.DeviceID)
		if ac, av, val := ack(r, "slow"); ac != 200 || av != v || val != "on" {
			return fmt.Errorf("slow %v", r["slow"])
		}
		if ac, _, _ := ack(r, "locked"); ac != 409 || r["locked"].(map[string]any)["ad"] != "read-only" {
			return fmt.Errorf("locked %v", r["locked"])
		}
		if ac, _, val := ack(r, "led"); ac != 200 || val != "green" {
			return fmt.Errorf("led %v", r["led"])
		}
		if ac, _, _ := ack(r, "broken"); ac != 500 || r["broken"].(map[string]any)["ad"] != "no such device" {
			return fmt.Errorf("broken %v", r["broken"])
		}
		if _, ok := r["free"]; ok {
			return fmt.Errorf("ignored property acked: %v", r["free"])
		}
		return nil
	})
	if b, err := os.ReadFile(out); err != nil || string(b) != `"green"` {
		t.Fatalf("command output %q %v", b, err)
	}
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}
