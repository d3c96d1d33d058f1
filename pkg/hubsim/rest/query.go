package rest

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"hash/fnv"
	"net/http"
	"strconv"
	"strings"

	"github.com/iothubby/iothubby/pkg/hubsim/query"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// defaultPageSize is the page size of a query without x-ms-max-item-count, and the most rows a
// page holds.
const defaultPageSize = service.MaxQueryPageSize

// pageToken is what a continuation token holds: where the next page starts, and a hash of the
// request it continues (a token is only good for the same query).
type pageToken struct {
	Offset int    `json:"o"`
	Hash   uint64 `json:"h"`
}

func hashOf(s string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(s))
	return h.Sum64()
}

// page reads the paging headers: the page size (clamped to 1..100) and the offset the
// continuation token names for the request identified by key.
func page(r *http.Request, key string) (size, offset int, err error) {
	size = defaultPageSize
	if v := r.Header.Get(service.HeaderMaxItemCount); v != "" {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < 1 {
			return 0, 0, wire.ErrArgumentInvalid.WithText("%s must be a positive integer, not %q", service.HeaderMaxItemCount, v)
		}
		size = min(n, defaultPageSize)
	}
	if v := r.Header.Get(service.HeaderContinuation); v != "" {
		var t pageToken
		b, err := base64.RawURLEncoding.DecodeString(v)
		if err != nil || json.Unmarshal(b, &t) != nil || t.Offset < 0 {
			return 0, 0, wire.ErrArgumentInvalid.WithText("%s is not a token this hub issued", service.HeaderContinuation)
		}
		if t.Hash != hashOf(key) {
			return 0, 0, wire.ErrArgumentInvalid.WithText("%s belongs to a different query", service.HeaderContinuation)
		}
		offset = t.Offset
	}
	return size, offset, nil
}

// writePage sends rows[offset:offset+size] with x-ms-continuation when more follow (and
// without it on the last page, which is how clients know they are done).
func writePage[T any](w http.ResponseWriter, rows []T, size, offset int, key, itemType string) {
	offset = min(offset, len(rows))
	end := min(offset+size, len(rows))
	if end < len(rows) {
		b, _ := json.Marshal(pageToken{Offset: end, Hash: hashOf(key)})
		w.Header().Set(service.HeaderContinuation, base64.RawURLEncoding.EncodeToString(b))
	}
	if itemType != "" {
		w.Header().Set(service.HeaderItemType, itemType)
	}
	out := rows[offset:end]
	if out == nil {
		out = []T{}
	}
	writeJSON(w, http.StatusOK, out)
}

// queryDevices serves POST /devices/query: IoT Hub's query language over twins and devices.jobs.
func (h *handler) queryDevices(w http.ResponseWriter, r *http.Request, _ []string) {
	var spec service.QuerySpec
	if err := readJSON(w, r, &spec); err != nil {
		writeError(w, err)
		return
	}
	q, err := query.Parse(spec.Query)
	if err != nil {
		var qe *query.Error
		if errors.As(err, &qe) {
			writeError(w, wire.ErrArgumentInvalid.WithText("%v", qe))
			return
		}
		writeError(w, err)
		return
	}
	size, offset, err := page(r, spec.Query)
	if err != nil {
		writeError(w, err)
		return
	}
	var rows []map[string]any
	switch q.From {
	case query.DeviceJobs:
		if h.cfg.Jobs == nil {
			writeError(w, errNotFound.WithText("jobs are not served by this hub"))
			return
		}
		for _, dj := range h.cfg.Jobs.DeviceJobs() {
			row, err := query.Row(dj)
			if err != nil {
				writeError(w, wire.ErrServerError.WithText("device job row: %v", err))
				return
			}
			rows = append(rows, row)
		}
	default:
		if rows, err = h.twinRows(); err != nil {
			writeError(w, err)
			return
		}
	}
	writePage(w, q.Run(rows), size, offset, spec.Query, q.ItemType())
}

// twinRows are every device's twin, by device ID.
func (h *handler) twinRows() ([]map[string]any, error) {
	if h.cfg.Twins == nil {
		return nil, errNotFound.WithText("twins are not served by this hub")
	}
	devs := h.cfg.Registry.List(0)
	rows := make([]map[string]any, 0, len(devs))
	for _, d := range devs {
		t, err := h.cfg.Twins.Get(d.DeviceID)
		if err != nil {
			continue // deleted meanwhile
		}
		row, err := query.Row(t)
		if err != nil {
			return nil, wire.ErrServerError.WithText("twin %s: %v", d.DeviceID, err)
		}
		rows = append(rows, row)
	}
	return rows, nil
}
