package rest

import (
	"net/http"
	"strconv"
	"strings"

	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/wire"
)

// maxList is the most devices GET /devices returns (IoT Hub's cap for top).
const maxList = 1000

func (h *handler) listDevices(w http.ResponseWriter, r *http.Request, _ []string) {
	top := maxList
	if v := r.URL.Query().Get("top"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			writeError(w, wire.ErrArgumentInvalid.WithText("top must be a non-negative integer"))
			return
		}
		if n > 0 && n < maxList {
			top = n
		}
	}
	writeJSON(w, http.StatusOK, h.cfg.Registry.List(top))
}

func validID(w http.ResponseWriter, id string) bool {
	if err := wire.ValidateDeviceID(id); err != nil {
		writeError(w, wire.ErrArgumentInvalid.WithText("%v", err))
		return false
	}
	return true
}

func (h *handler) getDevice(w http.ResponseWriter, _ *http.Request, seg []string) {
	if !validID(w, seg[1]) {
		return
	}
	d, err := h.cfg.Registry.Get(seg[1])
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

// ifMatch returns the If-Match header and whether one was sent. A header sent empty matches no
// etag.
func ifMatch(r *http.Request) (string, bool) {
	vals := r.Header.Values("If-Match")
	if len(vals) == 0 {
		return "", false
	}
	v := strings.TrimSpace(strings.Join(vals, ","))
	if v == "" {
		v = `""`
	}
	return v, true
}

// putDevice creates (no If-Match) or updates (If-Match "*" or the current etag) a device.
func (h *handler) putDevice(w http.ResponseWriter, r *http.Request, seg []string) {
	id := seg[1]
	if !validID(w, id) {
		return
	}
	var d registry.Device
	if err := readJSON(w, r, &d); err != nil {
		writeError(w, err)
		return
	}
	if d.DeviceID == "" {
		d.DeviceID = id
	} else if d.DeviceID != id {
		writeError(w, wire.ErrArgumentInvalid.WithText("deviceId %q in the body does not match %q in the URI", d.DeviceID, id))
		return
	}
	var err error
	if m, ok := ifMatch(r); ok {
		d, err = h.cfg.Registry.Update(d, m)
	} else {
		d, err = h.cfg.Registry.Create(d)
	}
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

// deleteDevice deletes a device; If-Match is optional ("*" or the current etag).
func (h *handler) deleteDevice(w http.ResponseWriter, r *http.Request, seg []string) {
	if !validID(w, seg[1]) {
		return
	}
	m, _ := ifMatch(r)
	if err := h.cfg.Registry.Delete(seg[1], m); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) deviceStats(w http.ResponseWriter, _ *http.Request, _ []string) {
	writeJSON(w, http.StatusOK, h.cfg.Registry.Stats())
}

func (h *handler) serviceStats(w http.ResponseWriter, _ *http.Request, _ []string) {
	writeJSON(w, http.StatusOK, map[string]int{"connectedDeviceCount": h.cfg.Registry.ConnectedCount()})
}

// purgeCommands is DELETE /devices/{id}/commands: IoT Hub's purge of a device's cloud-to-device
// queue.
func (h *handler) purgeCommands(w http.ResponseWriter, _ *http.Request, seg []string) {
	if !validID(w, seg[1]) {
		return
	}
	n, err := h.cfg.Devices.PurgeC2D(seg[1])
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, struct {
		TotalMessagesPurged int    `json:"totalMessagesPurged"`
		DeviceID            string `json:"deviceId"`
	}{n, seg[1]})
}
