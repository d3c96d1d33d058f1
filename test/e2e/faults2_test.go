//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"testing"

	hubsess "github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/faults"
	"github.com/iothubby/iothubby/pkg/service"
)

// addFault POSTs an admin fault to hubsim.
func addFault(t *testing.T, h *hub, body map[string]any) faults.Rule {
	t.Helper()
	var r faults.Rule
	if err := h.svc.HubsimFaults(ctxT(t), service.FaultsPost, body, &r); err != nil {
		t.Fatalf("POST /hubsim/faults %v: %v", body, err)
	}
	return r
}

func faultStatus(t *testing.T, h *hub) faults.Status {
	t.Helper()
	var st faults.Status
	if err := h.svc.HubsimFaults(ctxT(t), service.FaultsGet, nil, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// The real agent rides through puback-drop (a third of its publishes never acknowledged, not
// recorded) and token-expire (its connection closed as at SAS token expiry) and loses no
// telemetry: hubsim's recorded telemetry holds every message id of the run, duplicates at most
// the in-flight window per reconnect.
func TestFaultsAgentRidesThroughPubackDropAndTokenExpire(t *testing.T) {
	const n = 300
	h := newHub(t)
	d := createDevice(t, h, "e2e-faults2")
	cs := connString(h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	// A short operation timeout, so a missing PUBACK is noticed (and the connection renewed)
	// within a second.
	a := startProc(t, "agent", "run", "--config", writeSecret(t, "agent.yaml", fmt.Sprintf(
		"log:\n  format: json\n  level: debug\ntls:\n  caFile: %q\nstateDir: %q\nshutdownTimeout: 500ms\n"+
			"connection:\n  operationTimeout: 1s\ntelemetry:\n  interval: 20ms\n  count: %d\n",
		h.ep.CAFile, t.TempDir(), n)), "--connection-string-file", writeSecret(t, "cs", cs))
	a.await(0, "connected", msgIs(hubsess.MsgConnected))

	from := a.numLines()
	addFault(t, h, map[string]any{"action": "token-expire", "deviceId": d.DeviceID})
	h.await(0, "the connection closed as at token expiry", and(msgIs("closing device connection"),
		field("device", d.DeviceID), field("reason", broker.ReasonTokenExpiredByFault)))
	a.await(from, "reconnected after the token expiry", msgIs(hubsess.MsgConnected))

	drop := addFault(t, h, map[string]any{"action": "puback-drop", "deviceId": d.DeviceID, "durationSecs": 2, "probability": 0.33, "seed": 15})
	if drop.Probability != 0.33 || drop.Seed != 15 {
		t.Fatalf("rule %+v", drop)
	}
	h.await(0, "a PUBACK dropped", and(msgIs("fault injected"), field("action", "puback-dropped")))
	a.await(0, "every message accepted", and(msgIs("telemetry count reached"), field("count", n)))

	var got []string
	eventually(t, fmt.Sprintf("%d distinct messages at hubsim", n), func() error {
		msgs, err := h.svc.Telemetry(ctxT(t), d.DeviceID)
		if err != nil {
			return err
		}
		got = mids(msgs)
		if k := len(distinct(got)); k < n {
			return fmt.Errorf("%d of %d", k, n)
		}
		return nil
	})
	seqs := map[int]int{}
	for _, mid := range got {
		_, seq := msgSeq(t, mid)
		seqs[seq]++
	}
	dups := 0
	for s := 1; s <= n; s++ {
		if seqs[s] == 0 {
			t.Fatalf("message %d lost (ids %v)", s, got)
		}
		dups += seqs[s] - 1
	}
	st := faultStatus(t, h)
	dropped := st.Counters["admin:puback-drop/puback-dropped"]
	if dropped == 0 || st.Counters["admin:token-expire/token-expired"] != 1 {
		t.Fatalf("faults not injected as asked: %v", st.Counters)
	}
	// A publish whose PUBACK was dropped is not recorded, so its resend is no duplicate; what
	// was acknowledged but re-sent across a reconnect is, at most maxInFlight (8) each.
	reconnects := a.count(msgIs(hubsess.MsgConnected)) - 1
	t.Logf("faults2: %d messages, %d PUBACKs dropped, %d reconnects, %d duplicates", n, dropped, reconnects, dups)
	if dups > 8*reconnects {
		t.Fatalf("%d duplicates over %d reconnects: more than the in-flight window of 8 per reconnect", dups, reconnects)
	}
	if c := a.count(msgIs("telemetry message failed")); c != 0 {
		t.Fatalf("%d messages reported failed", c)
	}
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}

func distinct(ids []string) map[string]bool {
	m := make(map[string]bool, len(ids))
	for _, id := range ids {
		m[id] = true
	}
	return m
}

// hubby bulk twin-update rides through rest-error 503 (half the twin PATCHes refused with
// Retry-After): it retries 429/503, every twin is updated, and hubsim counted the refusals.
func TestFaultsHubbyBulkRetriesRESTError503(t *testing.T) {
	h := newHub(t)
	ids := []string{"bulk-f1", "bulk-f2", "bulk-f3", "bulk-f4", "bulk-f5", "bulk-f6"}
	for _, id := range ids {
		createDevice(t, h, id)
	}
	addFault(t, h, map[string]any{"action": "rest-error", "code": 503, "retryAfterSecs": 1, "pathPrefix": "/twins/",
		"method": "PATCH", "durationSecs": 300, "probability": 0.5, "seed": 3})
	// One at a time, so the seeded draws fall on the same requests in every run.
	out, code := hubbyExit(t, h, append([]string{"-o", "json", "bulk", "twin-update", "--parallel", "1", "--retries", "6",
		"--desired", `mode="eco"`}, ids...)...)
	var res struct {
		Results []struct {
			DeviceID string `json:"deviceId"`
			OK       bool   `json:"ok"`
			Error    string `json:"error"`
		} `json:"results"`
	}
	if code != 0 {
		t.Fatalf("hubby bulk exit %d under rest-error 503:\n%s", code, out)
	}
	if err := json.Unmarshal([]byte(firstJSON(out)), &res); err != nil || len(res.Results) != len(ids) {
		t.Fatalf("hubby bulk output: %v\n%s", err, out)
	}
	for _, r := range res.Results {
		if !r.OK {
			t.Fatalf("%s failed under rest-error 503 with retries: %s", r.DeviceID, r.Error)
		}
	}
	refused := faultStatus(t, h).Counters["admin:rest-error/answered 503"]
	if refused == 0 {
		t.Fatalf("no request was refused: the test shows nothing (output %s)", out)
	}
	for _, id := range ids {
		tw, err := h.svc.GetTwin(ctxT(t), id)
		if err != nil {
			t.Fatal(err)
		}
		if v, _ := tw.Properties.Desired["mode"].(string); v != "eco" {
			t.Fatalf("twin %s desired.mode = %v after bulk with retries", id, tw.Properties.Desired["mode"])
		}
	}
	t.Logf("faults2: hubby bulk twin-update over %d devices, %d PATCHes refused 503 and retried", len(ids), refused)
}
