package main

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/service"
)

func TestStepSizes(t *testing.T) {
	for _, c := range []struct {
		s     string
		total int
		want  int
	}{{"1", 10, 1}, {"15", 10, 10}, {"10%", 10, 1}, {"10%", 11, 2}, {"100%", 7, 7}, {"0%", 7, 0}, {"33.3%", 3, 1}} {
		z, err := parseSize(c.s)
		if err != nil || z.of(c.total) != c.want {
			t.Errorf("%s of %d = %d (%v), want %d", c.s, c.total, z.of(c.total), err, c.want)
		}
	}
	for _, bad := range []string{"", "-1", "101%", "x%", "1.5", "NaN%"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) accepted", bad)
		}
	}
}

// judge reads Plug and Play acks: ac 200 with av at or after the patch's version succeeds, ac
// >= 400 fails, anything older or in progress is pending, a desired value changed by someone
// else fails.
func TestJudgeAcks(t *testing.T) {
	r := &rollout{desired: map[string]any{"fw": "2.0", "net.mode": "eco"}}
	twin := func(desired, reported string) map[string]any {
		var m map[string]any
		if err := json.Unmarshal([]byte(`{"properties":{"desired":`+desired+`,"reported":`+reported+`}}`), &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	des := `{"fw":"2.0","net":{"mode":"eco"},"$version":7}`
	mk := &deviceMark{V: 7}
	for _, c := range []struct {
		name, desired, reported string
		mark                    *deviceMark
		want                    verdict
	}{
		{"both acked", des, `{"fw":{"value":"2.0","ac":200,"av":7},"net":{"mode":{"value":"eco","ac":200,"av":7}}}`, mk, succeeded},
		{"later av", des, `{"fw":{"value":"2.0","ac":200,"av":9},"net":{"mode":{"value":"eco","ac":200,"av":8}}}`, mk, succeeded},
		{"one missing", des, `{"fw":{"value":"2.0","ac":200,"av":7}}`, mk, pending},
		{"old ack", des, `{"fw":{"value":"1.0","ac":200,"av":3},"net":{"mode":{"value":"eco","ac":200,"av":7}}}`, mk, pending},
		{"in progress", des, `{"fw":{"value":"2.0","ac":202,"av":7},"net":{"mode":{"value":"eco","ac":200,"av":7}}}`, mk, pending},
		{"rejected", des, `{"fw":{"value":"1.0","ac":400,"av":7,"ad":"no"},"net":{"mode":{"value":"eco","ac":200,"av":7}}}`, mk, failed},
		{"old rejection", des, `{"fw":{"value":"1.0","ac":400,"av":5}}`, mk, pending},
		{"overwritten", `{"fw":"9.9","net":{"mode":"eco"},"$version":8}`, `{}`, mk, failed},
		{"no v recorded: current version", des, `{"fw":{"value":"2.0","ac":200,"av":7},"net":{"mode":{"value":"eco","ac":200,"av":7}}}`, &deviceMark{}, succeeded},
		{"no v recorded, older ack", des, `{"fw":{"value":"2.0","ac":200,"av":6},"net":{"mode":{"value":"eco","ac":200,"av":7}}}`, &deviceMark{}, pending},
	} {
		if got, why := r.judge(twin(c.desired, c.reported), c.mark); got != c.want {
			t.Errorf("%s: verdict %d (%s), want %d", c.name, got, why, c.want)
		}
	}
	re := &rollout{desired: map[string]any{"fw": "2.0"}, expect: map[string]any{"firmware.current": "2.0"}}
	if got, _ := re.judge(twin(des, `{"firmware":{"current":"2.0"}}`), mk); got != succeeded {
		t.Errorf("expect met: %d", got)
	}
	if got, _ := re.judge(twin(des, `{"firmware":{"current":"1.0"}}`), mk); got != pending {
		t.Errorf("expect not met: %d", got)
	}
}

func TestOverThreshold(t *testing.T) {
	for _, c := range []struct {
		max        string
		bad, total int
		want       bool
	}{{"0", 0, 5, false}, {"0", 1, 5, true}, {"2", 2, 5, false}, {"2", 3, 5, true},
		{"20%", 1, 5, false}, {"20%", 2, 5, true}, {"10%", 1, 1, true}, {"100%", 5, 5, false}, {"0%", 0, 0, false}} {
		z, _ := parseSize(c.max)
		r := &rollout{maxFail: z}
		if got := r.over(c.bad, c.total); got != c.want {
			t.Errorf("%d of %d over %s = %v, want %v", c.bad, c.total, c.max, got, c.want)
		}
	}
}

// Against a real hub a query can trail writes: patching is idempotent by the twin's own mark,
// and a device this run patched but the query does not return yet is read by its twin.
func TestRolloutToleratesQueryLag(t *testing.T) {
	s := newShell(t)
	s.exec("devices", "create", "lag1")
	c, _, err := service.ForHubsim(s.srv.StateDir())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r := &rollout{g: &globals{timeout: 10 * time.Second}, c: c, rec: rolloutRecord{Name: "lag"}, desired: map[string]any{"fw": "2.0"}}
	if err := r.patchOne(ctx, "lag1", 0); err != nil {
		t.Fatal(err)
	}
	tw, err := c.GetTwin(ctx, "lag1")
	if err != nil {
		t.Fatal(err)
	}
	if err := r.patchOne(ctx, "lag1", 1); err != nil {
		t.Fatal(err)
	}
	again, err := c.GetTwin(ctx, "lag1")
	if err != nil || again.Version != tw.Version {
		t.Fatalf("second patch of a marked device changed its twin: version %d -> %d (%v)", tw.Version, again.Version, err)
	}
	ms, err := r.withKnown(ctx, nil, []string{"lag1", "ghost"}, 0)
	if err != nil || len(ms) != 1 || ms[0].id != "lag1" || ms[0].mark == nil || ms[0].mark.V == 0 {
		t.Fatalf("withKnown: %+v %v", ms, err)
	}
	if vd, why := r.judge(ms[0].twin, ms[0].mark); vd != pending {
		t.Fatalf("unacknowledged device judged %d (%s)", vd, why)
	}
	if ms, err := r.withKnown(ctx, nil, []string{"lag1"}, 1); err != nil || len(ms) != 0 {
		t.Fatalf("withKnown for another step: %+v %v", ms, err)
	}
}
