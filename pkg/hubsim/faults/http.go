package faults

import (
	"encoding/json"
	"net/http"
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
