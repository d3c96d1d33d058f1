package faults

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/iothubby/iothubby/pkg/wire"
)

// ServeAdmin serves /hubsim/faults once the caller's service token is checked: GET returns
// the Status (open fault windows, admin rules, counters, the recent log), POST applies a
// RuleRequest, DELETE clears every rule and window. seg is the full path split at
// "/" (["hubsim", "faults", ...]).
func (in *Injector) ServeAdmin(w http.ResponseWriter, r *http.Request, seg []string) {
	if len(seg) != 2 {
		writeJSON(w, http.StatusNotFound, map[string]string{"Message": "no such resource: " + r.URL.Path})
		return
	}
	switch r.Method {
	case http.MethodGet:
		writeJSON(w, http.StatusOK, in.Status())
	case http.MethodPost:
		var req RuleRequest
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"Message": "fault request: " + err.Error()})
			return
		}
		rule, err := in.Apply(req)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"Message": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, rule)
	case http.MethodDelete:
		writeJSON(w, http.StatusOK, map[string]int{"cleared": in.ClearRules()})
	default:
		w.Header().Set("Allow", "GET, POST, DELETE")
		writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"Message": "method not allowed: " + r.Method})
	}
}

// maxBody bounds a POST body.
const maxBody = 4096

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// WrapREST applies the rest-error and rest-delay faults to the hub's service REST API served by
// next. hubsim's own additions under /hubsim/ (this admin API among them) are never faulted.
// A delay holds the request on the Injector's clock; an error is answered before next sees the
// request (so before authorization) with IoT Hub's error body, an iothub-errorcode header and
// Retry-After.
func (in *Injector) WrapREST(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.EscapedPath()
		if p == "/hubsim" || strings.HasPrefix(p, "/hubsim/") {
			next.ServeHTTP(w, r)
			return
		}
		f := in.RESTFault(r.Method, p, addressedDevice(p))
		se := wire.ServiceError{}
		if err := in.Sleep(r.Context(), f.Delay); err != nil {
			// The client left, or hubsim is stopping: answer 503 rather than nothing.
			f.Status, f.RetryAfter = http.StatusServiceUnavailable, 1
			se = restErrors[f.Status].WithText("request held by rest-delay: %v", err)
		} else if f.Status == 0 {
			next.ServeHTTP(w, r)
			return
		} else {
			se = restErrors[f.Status].WithText("fault injected: rest-error %d", f.Status)
		}
		b, _ := json.Marshal(se)
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.Header().Set("iothub-errorcode", se.Code)
		w.Header().Set("Retry-After", strconv.Itoa(f.RetryAfter))
		w.WriteHeader(f.Status)
		_, _ = w.Write(b)
	})
}

// restErrors are IoT Hub's errors for the statuses rest-error answers.
var restErrors = map[int]wire.ServiceError{
	http.StatusTooManyRequests:     wire.ErrThrottled,
	http.StatusInternalServerError: wire.ErrServerError,
	http.StatusServiceUnavailable:  {Status: http.StatusServiceUnavailable, Code: "ServiceUnavailable", Number: 503001},
}

// addressedDevice is the device a REST path names (/devices/{id}..., /twins/{id}...), or "".
func addressedDevice(escapedPath string) string {
	seg := strings.Split(strings.TrimPrefix(escapedPath, "/"), "/")
	if len(seg) < 2 || (seg[0] != "devices" && seg[0] != "twins") {
		return ""
	}
	id, err := url.PathUnescape(seg[1])
	if err != nil {
		return ""
	}
	return id
}
