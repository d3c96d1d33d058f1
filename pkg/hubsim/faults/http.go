package faults

import (
	"encoding/json"
	"net/http"
)

// ServeAdmin serves /hubsim/faults once the caller's service token is checked: GET returns
// the Status (open fault windows, counters, the recent log). seg is the full path split at
// "/" (["hubsim", "faults", ...]).
func (in *Injector) ServeAdmin(w http.ResponseWriter, r *http.Request, seg []string) {
	if len(seg) != 2 {
		writeJSON(w, http.StatusNotFound, map[string]string{"Message": "no such resource: " + r.URL.Path})
		return
	}
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"Message": "method not allowed: " + r.Method})
		return
	}
	writeJSON(w, http.StatusOK, in.Status())
}

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
