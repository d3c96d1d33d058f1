package rest

import (
	"net/http"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
	"github.com/iothubby/iothubby/pkg/wire"
)

// LogRequestThrottled is the (sampled) log message of a service request refused with 429 by the
// hub tier's throttles (Config.Throttle).
const LogRequestThrottled = "service request throttled: 429"

// throttleOp is the throttled operation a service request counts as, and how many times (direct
// methods count in 4 KB meters of the request body); ok false: not throttled (hubsim's own
// /hubsim/ API, statistics, unknown paths).
func throttleOp(r *http.Request, seg []string) (op throttle.Op, n int, ok bool) {
	switch {
	case len(seg) == 0:
		return "", 0, false
	case seg[0] == "devices" && len(seg) == 2 && seg[1] == "query" && r.Method == http.MethodPost:
		return throttle.Query, 1, true
	case seg[0] == "devices" && len(seg) <= 2:
		return throttle.Registry, 1, true // create/get/list/update/delete, bulk (one call)
	case seg[0] == "twins" && len(seg) == 2:
		if r.Method == http.MethodGet {
			return throttle.TwinRead, 1, true
		}
		return throttle.TwinUpdate, 1, true
	case seg[0] == "twins" && seg[len(seg)-1] == "methods":
		return throttle.Method, throttle.MethodUnits(r.ContentLength), true
	case seg[0] == "jobs":
		return throttle.JobOp, 1, true
	}
	return "", 0, false
}

// throttled answers 429 ThrottlingException (Azure's body, and the iothub-errorcode header that
// the C# SDK checks against it) when the request is over the tier's rate, and reports whether it
// did.
func (h *handler) throttled(w http.ResponseWriter, r *http.Request, seg []string) bool {
	if h.cfg.Throttle == nil {
		return false
	}
	op, n, ok := throttleOp(r, seg)
	if !ok || h.cfg.Throttle.AllowN(op, n) {
		return false
	}
	h.throttleLog.Info(LogRequestThrottled, zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.String("op", string(op)))
	writeError(w, wire.ErrThrottled.WithText("%s requests over the hub tier's rate (%.4g/s); retry later", op, h.cfg.Throttle.Rate(op)))
	return true
}

// throttleRoute serves /hubsim/throttle: GET the counters, POST {"tier","units","limits"} to
// throttle as that tier from now on, DELETE to stop throttling; POST and DELETE answer with the
// new status.
func (h *handler) throttleRoute(r *http.Request) func(http.ResponseWriter, *http.Request, []string) {
	switch {
	case r.Method == http.MethodGet:
		return h.getThrottle
	case r.Method == http.MethodPost && h.cfg.SetThrottle != nil:
		return h.postThrottle
	case r.Method == http.MethodDelete && h.cfg.SetThrottle != nil:
		return func(w http.ResponseWriter, r *http.Request, seg []string) {
			if err := h.cfg.SetThrottle(throttle.Request{}); err != nil {
				writeError(w, err)
				return
			}
			h.getThrottle(w, r, seg)
		}
	}
	return methodNotAllowed
}

func (h *handler) postThrottle(w http.ResponseWriter, r *http.Request, seg []string) {
	b, err := readBody(w, r)
	if err != nil {
		writeError(w, err)
		return
	}
	req, err := throttle.ParseRequest(b)
	if err != nil {
		writeError(w, wire.ErrArgumentInvalid.WithText("%v", err))
		return
	}
	if err := h.cfg.SetThrottle(req); err != nil {
		writeError(w, wire.ErrArgumentInvalid.WithText("%v", err))
		return
	}
	h.getThrottle(w, r, seg)
}

// getThrottle serves GET /hubsim/throttle: the tier, units and each operation's limit and
// counters (throttle.Status, plus what Config.ThrottleExtra adds).
func (h *handler) getThrottle(w http.ResponseWriter, _ *http.Request, _ []string) {
	st := h.cfg.Throttle.Status()
	if h.cfg.ThrottleExtra != nil {
		st.Operations = append(st.Operations, h.cfg.ThrottleExtra()...)
	}
	writeJSON(w, http.StatusOK, st)
}
