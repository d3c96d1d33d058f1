package rest

import (
	"encoding/json"
	"net/http"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/wire"
)

var (
	errTooManyDevices       = wire.ServiceError{Status: 413, Code: "TooManyDevices", Number: 413002}
	errDefinedMultipleTimes = wire.ServiceError{Status: 400, Code: "DeviceDefinedMultipleTimes", Number: 400011}
)

// bulkDevices serves POST /devices: up to 100 rows, each {id, importMode, eTag, ...device}.
// Every row succeeds or fails on its own; the answer is 200 when all succeeded and 400 with the
// same result document (isSuccessful false, an error per failed row) otherwise.
func (h *handler) bulkDevices(w http.ResponseWriter, r *http.Request, _ []string) {
	var rows []map[string]json.RawMessage
	if err := readJSON(w, r, &rows); err != nil {
		writeError(w, err)
		return
	}
	switch {
	case len(rows) == 0:
		writeError(w, wire.ErrArgumentInvalid.WithText("a bulk operation needs at least one device"))
		return
	case len(rows) > hubapi.MaxBulkDevices:
		writeError(w, errTooManyDevices.WithText("a bulk operation takes at most %d devices, not %d", hubapi.MaxBulkDevices, len(rows)))
		return
	}
	ops := make([]registry.BulkOp, len(rows))
	seen := map[string]bool{}
	for i, row := range rows {
		var id, mode, etag string
		if row == nil || json.Unmarshal(row["id"], &id) != nil || id == "" {
			writeError(w, wire.ErrArgumentInvalid.WithText("row %d has no id", i))
			return
		}
		if seen[id] {
			writeError(w, errDefinedMultipleTimes.WithText("device %s is defined more than once", id))
			return
		}
		seen[id] = true
		_ = json.Unmarshal(row["importMode"], &mode)
		m, ok := registry.ParseBulkMode(mode)
		if !ok {
			writeError(w, wire.ErrArgumentInvalid.WithText("row %d (%s): importMode %q is not create, update, updateIfMatchETag, delete or deleteIfMatchETag", i, id, mode))
			return
		}
		for _, k := range []string{"eTag", "etag"} {
			if v, ok := row[k]; ok && etag == "" {
				_ = json.Unmarshal(v, &etag)
			}
		}
		delete(row, "id")
		delete(row, "eTag")
		delete(row, "etag")
		row["deviceId"], _ = json.Marshal(id)
		b, _ := json.Marshal(row)
		var d registry.Device
		if err := json.Unmarshal(b, &d); err != nil {
			writeError(w, wire.ErrIotHubFormatError.WithText("row %d (%s): %v", i, id, err))
			return
		}
		ops[i] = registry.BulkOp{Device: d, Mode: m, ETag: etag}
	}
	failed, err := h.cfg.Registry.Bulk(ops)
	if err != nil {
		writeError(w, err)
		return
	}
	res := hubapi.BulkResult{IsSuccessful: len(failed) == 0, Errors: []hubapi.BulkError{}, Warnings: []hubapi.BulkWarning{}}
	for _, f := range failed {
		res.Errors = append(res.Errors, hubapi.BulkError{DeviceID: f.DeviceID, Operation: string(f.Operation),
			ErrorCode: f.Err.Code, ErrorStatus: f.Err.Text})
	}
	status := http.StatusOK
	if !res.IsSuccessful {
		status = http.StatusBadRequest
	}
	writeJSON(w, status, res)
}
