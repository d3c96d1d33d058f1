//go:build e2e

package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	hubsess "github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/service"
)

// fleetKeys bulk-creates devices with keys made here (so no read-back is needed) through the
// bulk registry operation, 100 a call.
func fleetKeys(t *testing.T, h *hub, ids []string) map[string]string {
	t.Helper()
	keys := map[string]string{}
	for start := 0; start < len(ids); start += service.MaxBulkDevices {
		var rows []service.BulkDevice
		for _, id := range ids[start:min(start+service.MaxBulkDevices, len(ids))] {
			b := make([]byte, 32)
			_, _ = rand.Read(b)
			keys[id] = base64.StdEncoding.EncodeToString(b)
			rows = append(rows, service.BulkDevice{ID: id, ImportMode: service.ImportCreate,
				Authentication: &service.Authentication{Type: "sas", SymmetricKey: service.SymmetricKey{PrimaryKey: keys[id], SecondaryKey: keys[id]}}})
		}
		res, err := h.svc.BulkDevices(ctxT(t), rows)
		if err != nil || !res.IsSuccessful {
			t.Fatalf("bulk create: %+v %v", res, err)
		}
	}
	return keys
}

// jobDevice is a device session that records what the hub sends it.
type jobDevice struct {
	id       string
	s        *hubsess.Session
	mu       sync.Mutex
	desired  []map[string]any
	calls    int
	received chan string // method names, as they arrive
}

// connectJobDevices connects a hub.Session per device. answer, when set, decides each method
// call's answer (run on the session's own goroutine: it must not block); nil answers 200 with
// the device id.
func connectJobDevices(t *testing.T, h *hub, keys map[string]string, ids []string, answer func(d *jobDevice, r *hubsess.MethodRequest) bool) []*jobDevice {
	t.Helper()
	tlsCfg := clientTLS(t, h)
	devs := make([]*jobDevice, len(ids))
	for i, id := range ids {
		k, err := sas.ParseKey(keys[id])
		if err != nil {
			t.Fatal(err)
		}
		d := &jobDevice{id: id, received: make(chan string, 64)}
		cfg := hubsess.Config{Host: h.ep.HubHostName, Address: h.ep.MQTTAddress, DeviceID: id, Signer: k, TLSConfig: tlsCfg}
		cfg.OnDesired = func(_ context.Context, p *hubsess.DesiredPatch) {
			var m map[string]any
			_ = json.Unmarshal(p.Body, &m)
			d.mu.Lock()
			d.desired = append(d.desired, m)
			d.mu.Unlock()
		}
		cfg.OnMethod = func(_ context.Context, r *hubsess.MethodRequest) {
			d.mu.Lock()
			d.calls++
			d.mu.Unlock()
			select {
			case d.received <- r.Name:
			default:
			}
			if answer == nil || answer(d, r) {
				_ = d.s.RespondMethodAsync(r.RequestID, 200, []byte(fmt.Sprintf(`{"id":%q}`, id)))
			}
		}
		s, err := hubsess.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		d.s = s
		devs[i] = d
		t.Cleanup(func() {
			cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = s.Close(cctx)
		})
	}
	for _, d := range devs {
		if err := d.s.WaitConnected(ctxT(t)); err != nil {
			t.Fatalf("%s: %v", d.id, err)
		}
	}
	return devs
}

// waitSubscribed waits until hubsim lists every device with the topic subscribed.
func waitSubscribed(t *testing.T, h *hub, devs []*jobDevice, topic string) {
	t.Helper()
	eventually(t, "subscriptions to "+topic, func() error {
		conns, err := h.svc.Connections(ctxT(t))
		if err != nil {
			return err
		}
		have := map[string]bool{}
		for _, c := range conns {
			for _, s := range c.Subscriptions {
				if s == topic {
					have[c.DeviceID] = true
				}
			}
		}
		for _, d := range devs {
			if !have[d.id] {
				return fmt.Errorf("%s has not subscribed", d.id)
			}
		}
		return nil
	})
}

// awaitJob waits for hubsim's "job stopped" log line for id (from log line from on) and returns
// the job as the REST API reports it.
func awaitJob(t *testing.T, h *hub, from int, id string) *service.Job {
	t.Helper()
	h.await(from, "job "+id+" stopped", and(msgIs("job stopped"), field("job", id)))
	j, err := h.svc.GetJob(ctxT(t), id)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

func TestJobTwinUpdateReachesTheQueriedDevicesOnly(t *testing.T) {
	h := startHub(t, t.TempDir(), "127.0.0.1:0", "127.0.0.1:0")
	var ids []string
	for i := range 30 {
		ids = append(ids, fmt.Sprintf("tw-%02d", i))
	}
	keys := fleetKeys(t, h, ids)
	canary := map[string]bool{}
	for i, id := range ids {
		ring := "main"
		if i%4 == 0 {
			ring, canary[id] = "canary", true
		}
		if _, err := h.svc.UpdateTwin(ctxT(t), id, map[string]any{"tags": map[string]any{"ring": ring}}, ""); err != nil {
			t.Fatal(err)
		}
	}
	// two canaries and two others are online and see desired patches as they arrive
	online := connectJobDevices(t, h, keys, []string{"tw-00", "tw-04", "tw-01", "tw-02"}, nil)
	waitSubscribed(t, h, online, "$iothub/twin/PATCH/properties/desired/#")

	from := h.numLines()
	if _, err := h.svc.ScheduleJob(ctxT(t), service.JobRequest{JobID: "fw-canary", Type: service.JobTypeUpdateTwin,
		QueryCondition: "tags.ring = 'canary'", UpdateTwin: json.RawMessage(`{"etag":"*","properties":{"desired":{"fw":"2.0"}}}`)}); err != nil {
		t.Fatal(err)
	}
	j := awaitJob(t, h, from, "fw-canary")
	want := service.DeviceJobStatistics{DeviceCount: len(canary), SucceededCount: len(canary)}
	if j.Status != service.JobCompleted || *j.DeviceJobStatistics != want {
		t.Fatalf("job %s %+v, want statistics %+v", j.Status, j.DeviceJobStatistics, want)
	}
	for _, id := range ids {
		tw, err := h.svc.GetTwin(ctxT(t), id)
		if err != nil {
			t.Fatal(err)
		}
		if got := tw.Properties.Desired["fw"] == "2.0"; got != canary[id] {
			t.Errorf("%s: desired %v, canary %v", id, tw.Properties.Desired, canary[id])
		}
	}
	rows, err := h.svc.DeviceJobs(ctxT(t), "fw-canary")
	if err != nil || len(rows) != len(canary) {
		t.Fatalf("device rows %d %v", len(rows), err)
	}
	for _, r := range rows {
		if !canary[r.DeviceID] || r.Status != service.DeviceJobCompleted {
			t.Errorf("row %+v", r)
		}
	}
	// the online canaries received the patch; the online others did not
	for _, d := range online {
		eventuallyPatched := func() bool {
			d.mu.Lock()
			defer d.mu.Unlock()
			for _, p := range d.desired {
				if p["fw"] == "2.0" {
					return true
				}
			}
			return false
		}
		if canary[d.id] {
			eventually(t, d.id+" receives the desired patch", func() error {
				if !eventuallyPatched() {
					return fmt.Errorf("no patch with fw 2.0 yet")
				}
				return nil
			})
		} else if eventuallyPatched() {
			t.Errorf("%s is not a canary but received the patch", d.id)
		}
	}
}

func TestMethodJobOverAHundredDevicesWithOfflineOnes(t *testing.T) {
	h := startHub(t, t.TempDir(), "127.0.0.1:0", "127.0.0.1:0")
	var ids []string
	offline := map[string]bool{}
	for i := range 100 {
		id := fmt.Sprintf("m-%03d", i)
		ids = append(ids, id)
		if i%10 == 7 {
			offline[id] = true
		}
	}
	keys := fleetKeys(t, h, ids)
	var onlineIDs []string
	for _, id := range ids {
		if !offline[id] {
			onlineIDs = append(onlineIDs, id)
		}
	}
	devs := connectJobDevices(t, h, keys, onlineIDs, nil)
	waitSubscribed(t, h, devs, "$iothub/methods/POST/#")

	from := h.numLines()
	if _, err := h.svc.ScheduleJob(ctxT(t), service.JobRequest{JobID: "ping-all", Type: service.JobTypeDeviceMethod, QueryCondition: "*",
		CloudToDeviceMethod: &service.CloudToDeviceMethod{MethodName: "ping", Payload: json.RawMessage(`{"n":1}`), ResponseTimeoutInSeconds: 10}}); err != nil {
		t.Fatal(err)
	}
	j := awaitJob(t, h, from, "ping-all")
	want := service.DeviceJobStatistics{DeviceCount: 100, SucceededCount: 90, FailedCount: 10}
	if j.Status != service.JobCompleted || *j.DeviceJobStatistics != want {
		t.Fatalf("job %s %+v, want %+v", j.Status, j.DeviceJobStatistics, want)
	}
	rows, err := h.svc.DeviceJobs(ctxT(t), "ping-all")
	if err != nil || len(rows) != 100 {
		t.Fatalf("device rows %d %v", len(rows), err)
	}
	for _, r := range rows {
		if offline[r.DeviceID] {
			if r.Status != service.DeviceJobFailed || r.Error == nil || r.Error.Code != "DeviceNotOnline" || r.Outcome != nil {
				t.Errorf("offline %s: %+v %+v", r.DeviceID, r.Error, r.Outcome)
			}
			continue
		}
		if r.Status != service.DeviceJobCompleted || r.Outcome == nil || r.Outcome.DeviceMethodResponse.Status != 200 ||
			string(r.Outcome.DeviceMethodResponse.Payload) != fmt.Sprintf(`{"id":%q}`, r.DeviceID) {
			t.Errorf("online %s: %s %+v", r.DeviceID, r.Status, r.Outcome)
		}
	}
	for _, d := range devs {
		d.mu.Lock()
		if d.calls != 1 {
			t.Errorf("%s was called %d times", d.id, d.calls)
		}
		d.mu.Unlock()
	}
}

func TestJobSurvivesAHubsimRestart(t *testing.T) {
	state := t.TempDir()
	mqtt, https := freeAddr(t), freeAddr(t)
	h := startHub(t, state, mqtt, https, "--job-parallelism", "1")
	var ids []string
	for i := range 6 {
		ids = append(ids, fmt.Sprintf("r-%d", i))
	}
	keys := fleetKeys(t, h, ids)
	// r-2 holds its first call: the job is mid-run when hubsim stops
	var held sync.Once
	devs := connectJobDevices(t, h, keys, ids, func(d *jobDevice, _ *hubsess.MethodRequest) bool {
		hold := false
		if d.id == "r-2" {
			held.Do(func() { hold = true })
		}
		return !hold
	})
	waitSubscribed(t, h, devs, "$iothub/methods/POST/#")
	from := h.numLines()
	// connectTimeoutInSeconds lets the resumed job wait for devices reconnecting after the restart
	if _, err := h.svc.ScheduleJob(ctxT(t), service.JobRequest{JobID: "survivor", Type: service.JobTypeDeviceMethod, QueryCondition: "*",
		CloudToDeviceMethod: &service.CloudToDeviceMethod{MethodName: "upgrade", ResponseTimeoutInSeconds: 30, ConnectTimeoutInSeconds: 60}}); err != nil {
		t.Fatal(err)
	}
	h.await(from, "job started", and(msgIs("job started"), field("job", "survivor")))
	select {
	case <-devs[2].received:
	case <-ctxT(t).Done():
		t.Fatal("r-2 was never called")
	}
	var before *service.Job
	eventually(t, "r-0 and r-1 recorded as succeeded", func() error {
		j, err := h.svc.GetJob(ctxT(t), "survivor")
		if err != nil {
			return err
		}
		if j.Status != service.JobRunning || j.DeviceJobStatistics.SucceededCount != 2 {
			return fmt.Errorf("job %s %+v", j.Status, j.DeviceJobStatistics)
		}
		before = j
		return nil
	})
	if err := h.stop(); err != nil {
		t.Fatalf("hubsim exit: %v", err)
	}
	h2 := startHub(t, state, mqtt, https, "--job-parallelism", "1")
	j := awaitJob(t, h2, 0, "survivor")
	if j.Status != service.JobCompleted || *j.DeviceJobStatistics != (service.DeviceJobStatistics{DeviceCount: 6, SucceededCount: 6}) {
		t.Fatalf("after the restart: %s %+v", j.Status, j.DeviceJobStatistics)
	}
	if !j.CreatedTime.Equal(*before.CreatedTime) {
		t.Errorf("created time changed: %v then %v", before.CreatedTime, j.CreatedTime)
	}
	for _, d := range devs {
		d.mu.Lock()
		want := 1
		if d.id == "r-2" {
			want = 2 // the held call, then the resumed job's
		}
		if d.calls != want {
			t.Errorf("%s was called %d times, want %d", d.id, d.calls, want)
		}
		d.mu.Unlock()
	}
}
