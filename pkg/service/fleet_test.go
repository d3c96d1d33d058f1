package service_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

func bulkCreate(t *testing.T, c *service.Client, ids ...string) {
	t.Helper()
	rows := make([]service.BulkDevice, len(ids))
	for i, id := range ids {
		rows[i] = service.BulkDevice{ID: id, ImportMode: service.ImportCreate}
	}
	res, err := c.BulkDevices(ctx(t), rows)
	if err != nil || !res.IsSuccessful || len(res.Errors) != 0 {
		t.Fatalf("bulk create: %+v %v", res, err)
	}
}

func TestBulkRegistry(t *testing.T) {
	_, c := startHub(t)
	ids := make([]string, 100)
	for i := range ids {
		ids[i] = fmt.Sprintf("bulk-%03d", i)
	}
	bulkCreate(t, c, ids...)
	d, err := c.GetDevice(ctx(t), "bulk-042")
	if err != nil || len(d.Authentication.SymmetricKey.PrimaryKey) != 44 {
		t.Fatalf("bulk-created device %+v %v", d, err)
	}
	if _, err := c.BulkDevices(ctx(t), make([]service.BulkDevice, 101)); err == nil {
		t.Fatal("101 rows accepted by the client")
	}
	// mixed: one new, one existing (create fails), one update with a stale etag, one
	// capitalised delete as Microsoft's Node SDK sends it, one delete of a missing device
	res, err := c.BulkDevices(ctx(t), []service.BulkDevice{
		{ID: "bulk-new", ImportMode: "create"},
		{ID: "bulk-000", ImportMode: "create"},
		{ID: "bulk-001", ImportMode: "UpdateIfMatchETag", ETag: "stale", Status: "disabled"},
		{ID: "bulk-002", ImportMode: "Delete"},
		{ID: "nobody", ImportMode: "delete"},
		{ID: "bulk-003", ImportMode: "updateIfMatchETag", ETag: mustETag(t, c, "bulk-003"), Status: "disabled"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.IsSuccessful || len(res.Errors) != 3 {
		t.Fatalf("mixed result %+v", res)
	}
	want := map[string]string{"bulk-000": "DeviceAlreadyExists", "bulk-001": "PreconditionFailed", "nobody": "DeviceNotFound"}
	for _, e := range res.Errors {
		if want[e.DeviceID] != e.ErrorCode || e.ErrorStatus == "" || e.Operation == "" {
			t.Errorf("row error %+v", e)
		}
	}
	if _, err := c.GetDevice(ctx(t), "bulk-new"); err != nil {
		t.Errorf("the good create in a failed batch was lost: %v", err)
	}
	if _, err := c.GetDevice(ctx(t), "bulk-002"); !errors.Is(err, wire.ErrDeviceNotFound) {
		t.Errorf("bulk delete: %v", err)
	}
	if d, _ := c.GetDevice(ctx(t), "bulk-003"); d.Status != "disabled" {
		t.Errorf("etag-matched update not applied: %+v", d)
	}
	if d, _ := c.GetDevice(ctx(t), "bulk-001"); d.Status != "enabled" {
		t.Errorf("stale-etag update applied: %+v", d)
	}
	// a device twice in one call refuses the whole call
	_, err = c.BulkDevices(ctx(t), []service.BulkDevice{{ID: "dup", ImportMode: "create"}, {ID: "dup", ImportMode: "create"}})
	var se wire.ServiceError
	if !errors.As(err, &se) || se.Code != "DeviceDefinedMultipleTimes" {
		t.Errorf("duplicate rows: %v", err)
	}
	if _, err := c.GetDevice(ctx(t), "dup"); !errors.Is(err, wire.ErrDeviceNotFound) {
		t.Errorf("a refused call created a device: %v", err)
	}
}

func mustETag(t *testing.T, c *service.Client, id string) string {
	d, err := c.GetDevice(ctx(t), id)
	if err != nil {
		t.Fatal(err)
	}
	return d.ETag
}

func TestQueryPagingAndAggregates(t *testing.T) {
	_, c := startHub(t)
	var ids []string
	for i := range 23 {
		ids = append(ids, fmt.Sprintf("q-%02d", i))
	}
	bulkCreate(t, c, ids...)
	for i, id := range ids {
		site := []string{"north", "south", "east"}[i%3]
		if _, err := c.UpdateTwin(ctx(t), id, map[string]any{"tags": map[string]any{"site": site, "n": i}}, ""); err != nil {
			t.Fatal(err)
		}
	}
	p, err := c.Query(ctx(t), "SELECT * FROM devices WHERE tags.site = 'north'", service.QueryOptions{PageSize: 3})
	if err != nil || len(p.Items) != 3 || p.Continuation == "" || p.Type != "Twin" {
		t.Fatalf("first page %d items, continuation %q, type %q, %v", len(p.Items), p.Continuation, p.Type, err)
	}
	twins, err := c.QueryTwins(ctx(t), "SELECT * FROM devices WHERE tags.site = 'north'", 3)
	if err != nil || len(twins) != 8 {
		t.Fatalf("all pages: %d twins, %v", len(twins), err)
	}
	for i, tw := range twins {
		if tw.DeviceID != ids[i*3] {
			t.Errorf("row %d is %s, want %s", i, tw.DeviceID, ids[i*3])
		}
	}
	last, err := c.Query(ctx(t), "SELECT * FROM devices", service.QueryOptions{PageSize: 100})
	if err != nil || len(last.Items) != 23 || last.Continuation != "" {
		t.Fatalf("single page: %d, %q, %v", len(last.Items), last.Continuation, err)
	}
	// a token from another query is refused
	_, err = c.Query(ctx(t), "SELECT * FROM devices", service.QueryOptions{PageSize: 3, Continuation: p.Continuation})
	if !errors.Is(err, wire.ErrArgumentInvalid) {
		t.Errorf("foreign continuation: %v", err)
	}
	g, err := c.Query(ctx(t), "SELECT tags.site AS site, COUNT() AS n FROM devices GROUP BY tags.site", service.QueryOptions{})
	if err != nil || g.Type != "Raw" {
		t.Fatal(err)
	}
	b, _ := json.Marshal(g.Items)
	if string(b) != `[{"n":8,"site":"north"},{"n":8,"site":"south"},{"n":7,"site":"east"}]` {
		t.Errorf("group by: %s", b)
	}
	_, err = c.Query(ctx(t), "SELECT * FROM devices WHERE tags.site == 'x'", service.QueryOptions{})
	var se wire.ServiceError
	if !errors.As(err, &se) || se.Status != 400 || !strings.Contains(se.Text, "offset 39") {
		t.Errorf("bad query: %#v", err)
	}
}

// waitJob reads the job until it finishes (clients poll jobs; each read is a real request).
func waitJob(t *testing.T, c *service.Client, id string) *service.Job {
	t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		j, err := c.GetJob(ctx(t), id)
		if err != nil {
			t.Fatal(err)
		}
		if service.JobFinished(j.Status) {
			return j
		}
		select {
		case <-tick.C:
		case <-ctx(t).Done():
			t.Fatalf("job %s did not finish: %+v", id, j)
		}
	}
}

func TestJobsThroughTheClient(t *testing.T) {
	_, c := startHub(t)
	bulkCreate(t, c, "j-a", "j-b", "j-c")
	for _, id := range []string{"j-a", "j-b"} {
		if _, err := c.UpdateTwin(ctx(t), id, map[string]any{"tags": map[string]any{"ring": "canary"}}, ""); err != nil {
			t.Fatal(err)
		}
	}
	j, err := c.ScheduleJob(ctx(t), service.JobRequest{JobID: "tw", Type: service.JobTypeUpdateTwin, QueryCondition: "tags.ring = 'canary'",
		UpdateTwin: json.RawMessage(`{"properties":{"desired":{"fw":"2.0"}}}`)})
	if err != nil || j.JobID != "tw" || j.CreatedTime == nil || j.MaxExecutionTimeInSeconds != 3600 {
		t.Fatalf("schedule: %+v %v", j, err)
	}
	j = waitJob(t, c, "tw")
	if j.Status != service.JobCompleted || *j.DeviceJobStatistics != (service.DeviceJobStatistics{DeviceCount: 2, SucceededCount: 2}) {
		t.Fatalf("twin job %+v %+v", j, j.DeviceJobStatistics)
	}
	for id, want := range map[string]bool{"j-a": true, "j-b": true, "j-c": false} {
		tw, err := c.GetTwin(ctx(t), id)
		if err != nil || (tw.Properties.Desired["fw"] == "2.0") != want {
			t.Errorf("%s desired %v (want updated %v) %v", id, tw.Properties.Desired, want, err)
		}
	}
	// every device offline: a method job fails per device, and the job completes
	if _, err := c.ScheduleJob(ctx(t), service.JobRequest{JobID: "m", Type: service.JobTypeDeviceMethod, QueryCondition: "*",
		CloudToDeviceMethod: &service.CloudToDeviceMethod{MethodName: "reboot"}}); err != nil {
		t.Fatal(err)
	}
	j = waitJob(t, c, "m")
	if j.Status != service.JobCompleted || j.DeviceJobStatistics.FailedCount != 3 {
		t.Fatalf("method job %+v %+v", j, j.DeviceJobStatistics)
	}
	rows, err := c.DeviceJobs(ctx(t), "m")
	if err != nil || len(rows) != 3 {
		t.Fatalf("device jobs %+v %v", rows, err)
	}
	for _, r := range rows {
		if r.Status != service.DeviceJobFailed || r.Error == nil || r.Error.Code != "DeviceNotOnline" || r.JobType != service.JobTypeDeviceMethod {
			t.Errorf("row %+v", r)
		}
	}
	later := time.Now().Add(time.Hour)
	if _, err := c.ScheduleJob(ctx(t), service.JobRequest{JobID: "later", Type: service.JobTypeUpdateTwin, QueryCondition: "*",
		UpdateTwin: json.RawMessage(`{"tags":{"x":1}}`), StartTime: &later}); err != nil {
		t.Fatal(err)
	}
	if j, err := c.GetJob(ctx(t), "later"); err != nil || j.Status != service.JobScheduled {
		t.Fatalf("future job %+v %v", j, err)
	}
	if j, err := c.CancelJob(ctx(t), "later"); err != nil || j.Status != service.JobCancelled {
		t.Fatalf("cancel %+v %v", j, err)
	}
	list, err := c.QueryJobs(ctx(t), service.JobTypeUpdateTwin, "")
	if err != nil || len(list) != 2 || list[0].JobID != "tw" || list[1].JobID != "later" {
		t.Fatalf("list %+v %v", list, err)
	}
	if list, _ := c.QueryJobs(ctx(t), "", service.JobCancelled); len(list) != 1 {
		t.Errorf("list by status %+v", list)
	}
	if _, err := c.GetJob(ctx(t), "nope"); !errors.Is(err, service.ErrJobNotFound) {
		t.Errorf("unknown job: %v", err)
	}
	_, err = c.ScheduleJob(ctx(t), service.JobRequest{JobID: "bad", Type: service.JobTypeUpdateTwin, QueryCondition: "*",
		UpdateTwin: json.RawMessage(`{"etag":"AAAA","tags":{}}`)})
	if !errors.Is(err, wire.ErrArgumentInvalid) {
		t.Errorf("etag other than *: %v", err)
	}
}
