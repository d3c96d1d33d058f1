package rest

import (
	"net/http"

	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Jobs is what the API needs from the jobs v2 runner.
type Jobs interface {
	Schedule(req service.JobRequest) (service.Job, error)
	Get(id string) (service.Job, error)
	Cancel(id string) (service.Job, error)
	List(jobType, status string) []service.Job
	DeviceJobs() []service.DeviceJob
}

// jobRoute serves /jobs/v2/...: PUT {id} schedules, GET {id} reads, POST {id}/cancel cancels,
// GET query lists. Reading needs ServiceConnect; scheduling and cancelling also RegistryWrite,
// since a job changes twins or calls devices in bulk.
func (h *handler) jobRoute(r *http.Request, seg []string) (registry.Rights, func(http.ResponseWriter, *http.Request, []string)) {
	if h.cfg.Jobs == nil {
		return registry.ServiceConnect, func(w http.ResponseWriter, _ *http.Request, _ []string) {
			writeError(w, errNotFound.WithText("jobs are not served by this hub"))
		}
	}
	write := registry.ServiceConnect | registry.RegistryWrite
	switch {
	case len(seg) == 3 && seg[2] == "query" && r.Method == http.MethodGet:
		return registry.ServiceConnect, h.queryJobs
	case len(seg) == 3 && r.Method == http.MethodGet:
		return registry.ServiceConnect, h.getJob
	case len(seg) == 3 && r.Method == http.MethodPut:
		return write, h.putJob
	case len(seg) == 4 && seg[3] == "cancel" && r.Method == http.MethodPost:
		return write, h.cancelJob
	case len(seg) == 3 || len(seg) == 4 && seg[3] == "cancel":
		return registry.ServiceConnect, methodNotAllowed
	}
	return registry.ServiceConnect, func(w http.ResponseWriter, r *http.Request, _ []string) {
		writeError(w, errNotFound.WithText("no such resource: %s %s", r.Method, r.URL.Path))
	}
}

func (h *handler) putJob(w http.ResponseWriter, r *http.Request, seg []string) {
	var req service.JobRequest
	if err := readJSON(w, r, &req); err != nil {
		writeError(w, err)
		return
	}
	if req.JobID == "" {
		req.JobID = seg[2]
	} else if req.JobID != seg[2] {
		writeError(w, wire.ErrArgumentInvalid.WithText("jobId %q in the body does not match %q in the URI", req.JobID, seg[2]))
		return
	}
	j, err := h.cfg.Jobs.Schedule(req)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, j)
}

func (h *handler) getJob(w http.ResponseWriter, _ *http.Request, seg []string) {
	j, err := h.cfg.Jobs.Get(seg[2])
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, j)
}

func (h *handler) cancelJob(w http.ResponseWriter, _ *http.Request, seg []string) {
	j, err := h.cfg.Jobs.Cancel(seg[2])
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, j)
}

// queryJobs serves GET /jobs/v2/query?jobType=&jobStatus=, paged like device queries.
func (h *handler) queryJobs(w http.ResponseWriter, r *http.Request, _ []string) {
	jt, st := r.URL.Query().Get("jobType"), r.URL.Query().Get("jobStatus")
	key := "jobs\x00" + jt + "\x00" + st
	size, offset, err := page(r, key)
	if err != nil {
		writeError(w, err)
		return
	}
	writePage(w, h.cfg.Jobs.List(jt, st), size, offset, key, "JobResponse")
}
