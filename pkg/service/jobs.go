package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/iothubby/iothubby/pkg/wire"
)

// Job types of jobs v2 (JobRequest.Type).
const (
	JobTypeUpdateTwin   = "scheduleUpdateTwin"
	JobTypeDeviceMethod = "scheduleDeviceMethod"
)

// Job statuses, as IoT Hub reports them. A job is finished once it is completed, failed or
// cancelled.
const (
	JobQueued    = "queued"
	JobScheduled = "scheduled"
	JobRunning   = "running"
	JobCompleted = "completed"
	JobFailed    = "failed"
	JobCancelled = "cancelled"
)

// Per-device job statuses (DeviceJob.Status).
const (
	DeviceJobPending   = "pending"
	DeviceJobScheduled = "scheduled"
	DeviceJobRunning   = "running"
	DeviceJobCompleted = "completed"
	DeviceJobFailed    = "failed"
	DeviceJobCanceled  = "canceled"
)

// Job errors, matchable with errors.Is.
var (
	ErrJobNotFound      = wire.ServiceError{Status: 404, Code: "JobNotFound", Number: 404002}
	ErrJobAlreadyExists = wire.ServiceError{Status: 409, Code: "JobAlreadyExists", Number: 409002}
)

// DefaultMaxExecutionTime is the maxExecutionTimeInSeconds a job gets when none is given, as
// Microsoft's SDK defaults it.
const DefaultMaxExecutionTime = 3600

// JobFinished says whether a job status is final.
func JobFinished(status string) bool {
	return status == JobCompleted || status == JobFailed || status == JobCancelled
}

// CloudToDeviceMethod is the method a scheduleDeviceMethod job calls on every device.
type CloudToDeviceMethod struct {
	MethodName string `json:"methodName"`
	// Payload is JSON; empty sends null.
	Payload json.RawMessage `json:"payload"`
	// ResponseTimeoutInSeconds: 5 to 300; 0 means the default, 30.
	ResponseTimeoutInSeconds int `json:"responseTimeoutInSeconds,omitempty"`
	// ConnectTimeoutInSeconds: 0 to 300; 0: the device must be connected.
	ConnectTimeoutInSeconds int `json:"connectTimeoutInSeconds,omitempty"`
}

// MarshalJSON sends a null payload rather than omitting it, as Microsoft's SDK does.
func (m CloudToDeviceMethod) MarshalJSON() ([]byte, error) {
	type plain CloudToDeviceMethod
	p := plain(m)
	if len(p.Payload) == 0 {
		p.Payload = json.RawMessage("null")
	}
	return json.Marshal(p)
}

// JobRequest schedules a job (PUT /jobs/v2/{jobId}).
type JobRequest struct {
	JobID string `json:"jobId"`
	// Type is JobTypeUpdateTwin or JobTypeDeviceMethod.
	Type string `json:"type"`
	// QueryCondition is the WHERE clause selecting the devices (without SELECT ... FROM), or
	// "*" for every device.
	QueryCondition string `json:"queryCondition"`
	// UpdateTwin is the twin patch of an update job: {"etag":"*","tags":{...},
	// "properties":{"desired":{...}}}. IoT Hub accepts only etag "*"; ScheduleJob adds it when
	// missing.
	UpdateTwin json.RawMessage `json:"updateTwin,omitempty"`
	// CloudToDeviceMethod is the call of a method job.
	CloudToDeviceMethod *CloudToDeviceMethod `json:"cloudToDeviceMethod,omitempty"`
	// StartTime is when the job starts; nil means now.
	StartTime *time.Time `json:"startTime"`
	// MaxExecutionTimeInSeconds bounds the job's run; 0 means DefaultMaxExecutionTime.
	MaxExecutionTimeInSeconds int64 `json:"maxExecutionTimeInSeconds,omitempty"`
}

// DeviceJobStatistics count a job's devices by outcome.
type DeviceJobStatistics struct {
	DeviceCount    int `json:"deviceCount"`
	FailedCount    int `json:"failedCount"`
	SucceededCount int `json:"succeededCount"`
	RunningCount   int `json:"runningCount"`
	PendingCount   int `json:"pendingCount"`
}

// Job is a jobs v2 job as the service reports it (JobResponse).
type Job struct {
	JobID                     string               `json:"jobId"`
	QueryCondition            string               `json:"queryCondition,omitempty"`
	CreatedTime               *time.Time           `json:"createdTime,omitempty"`
	StartTime                 *time.Time           `json:"startTime,omitempty"`
	EndTime                   *time.Time           `json:"endTime,omitempty"`
	MaxExecutionTimeInSeconds int64                `json:"maxExecutionTimeInSeconds,omitempty"`
	Type                      string               `json:"type"`
	CloudToDeviceMethod       *CloudToDeviceMethod `json:"cloudToDeviceMethod,omitempty"`
	UpdateTwin                json.RawMessage      `json:"updateTwin,omitempty"`
	Status                    string               `json:"status"`
	FailureReason             string               `json:"failureReason,omitempty"`
	StatusMessage             string               `json:"statusMessage,omitempty"`
	DeviceJobStatistics       *DeviceJobStatistics `json:"deviceJobStatistics,omitempty"`
}

// DeviceJob is one device's part in a job: a row of SELECT * FROM devices.jobs.
type DeviceJob struct {
	DeviceID               string            `json:"deviceId"`
	JobID                  string            `json:"jobId"`
	JobType                string            `json:"jobType"`
	Status                 string            `json:"status"`
	StartTimeUTC           *time.Time        `json:"startTimeUtc,omitempty"`
	EndTimeUTC             *time.Time        `json:"endTimeUtc,omitempty"`
	CreatedDateTimeUTC     *time.Time        `json:"createdDateTimeUtc,omitempty"`
	LastUpdatedDateTimeUTC *time.Time        `json:"lastUpdatedDateTimeUtc,omitempty"`
	Outcome                *DeviceJobOutcome `json:"outcome,omitempty"`
	Error                  *DeviceJobError   `json:"error,omitempty"`
}

// DeviceJobOutcome is what a device answered in a method job.
type DeviceJobOutcome struct {
	DeviceMethodResponse *MethodResult `json:"deviceMethodResponse"`
}

// DeviceJobError says why a device's part of a job failed.
type DeviceJobError struct {
	Code        string `json:"code"`
	Description string `json:"description"`
}

func jobPath(id string) string { return "/jobs/v2/" + url.PathEscape(id) }

// ScheduleJob creates a job. A twin-update patch without an etag gets "*", the only value IoT
// Hub accepts.
func (c *Client) ScheduleJob(ctx context.Context, req JobRequest) (*Job, error) {
	if req.JobID == "" {
		return nil, errors.New("service: a job ID is required")
	}
	if strings.TrimSpace(req.QueryCondition) == "" {
		return nil, errors.New("service: a query condition is required (\"*\" selects every device)")
	}
	switch req.Type {
	case JobTypeUpdateTwin:
		patch, err := withWildcardETag(req.UpdateTwin)
		if err != nil {
			return nil, err
		}
		req.UpdateTwin = patch
	case JobTypeDeviceMethod:
		if req.CloudToDeviceMethod == nil || req.CloudToDeviceMethod.MethodName == "" {
			return nil, errors.New("service: a method job needs cloudToDeviceMethod.methodName")
		}
	default:
		return nil, fmt.Errorf("service: job type %q is not %s or %s", req.Type, JobTypeUpdateTwin, JobTypeDeviceMethod)
	}
	var out Job
	if _, err := c.do(ctx, request{method: http.MethodPut, path: jobPath(req.JobID), body: req}, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

func withWildcardETag(patch json.RawMessage) (json.RawMessage, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(patch, &m); err != nil || m == nil {
		return nil, errors.New("service: a twin-update job needs updateTwin as a JSON object")
	}
	if _, ok := m["etag"]; ok {
		return patch, nil
	}
	m["etag"] = json.RawMessage(`"*"`)
	return json.Marshal(m)
}

// GetJob reads a job.
func (c *Client) GetJob(ctx context.Context, id string) (*Job, error) {
	var out Job
	if _, err := c.do(ctx, request{method: http.MethodGet, path: jobPath(id)}, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// CancelJob cancels a job that has not finished and returns it.
func (c *Client) CancelJob(ctx context.Context, id string) (*Job, error) {
	var out Job
	if _, err := c.do(ctx, request{method: http.MethodPost, path: jobPath(id) + "/cancel"}, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// QueryJobs lists jobs (GET /jobs/v2/query), optionally only those of one type and status
// ("" for any), following continuation tokens to the end.
func (c *Client) QueryJobs(ctx context.Context, jobType, status string) ([]Job, error) {
	q := url.Values{}
	if jobType != "" {
		q.Set("jobType", jobType)
	}
	if status != "" {
		q.Set("jobStatus", status)
	}
	var all []Job
	cont := ""
	for {
		h := map[string]string{HeaderMaxItemCount: strconv.Itoa(MaxQueryPageSize)}
		if cont != "" {
			h[HeaderContinuation] = cont
		}
		var page []Job
		qq := url.Values{}
		for k, v := range q {
			qq[k] = v
		}
		hdr, err := c.do(ctx, request{method: http.MethodGet, path: "/jobs/v2/query", query: qq, header: h}, &page)
		if err != nil {
			return nil, err
		}
		all = append(all, page...)
		next := hdr.Get(HeaderContinuation)
		if next == "" {
			return all, nil
		}
		if next == cont {
			return nil, errors.New("service: job query continuation token did not advance")
		}
		cont = next
	}
}

// DeviceJobs lists every device's part in a job, through the query
// SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '<id>'.
func (c *Client) DeviceJobs(ctx context.Context, jobID string) ([]DeviceJob, error) {
	sql := "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = " + QuoteString(jobID)
	var out []DeviceJob
	err := c.QueryAll(ctx, sql, MaxQueryPageSize, func(m json.RawMessage) error {
		var dj DeviceJob
		if err := json.Unmarshal(m, &dj); err != nil {
			return fmt.Errorf("service: device job row: %w", err)
		}
		out = append(out, dj)
		return nil
	})
	return out, err
}

// QuoteString renders s as a query-language string literal (single quotes, with backslash
// escapes), for building queries from values.
func QuoteString(s string) string {
	var b strings.Builder
	b.WriteByte('\'')
	for _, r := range s {
		switch r {
		case '\'', '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('\'')
	return b.String()
}
