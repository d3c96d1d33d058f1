package rest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/iothubby/iothubby/pkg/hubsim/methods"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Methods is what the API needs from the direct-method service.
type Methods interface {
	Invoke(ctx context.Context, deviceID string, req methods.Request) (methods.Result, error)
}

// methodRoute serves POST /twins/{id}/methods (ServiceConnect) and refuses the module form,
// since hubsim has no module identities.
func (h *handler) methodRoute(r *http.Request, seg []string) (registry.Rights, func(http.ResponseWriter, *http.Request, []string)) {
	if r.Method != http.MethodPost {
		return registry.ServiceConnect, methodNotAllowed
	}
	if len(seg) == 5 {
		return registry.ServiceConnect, func(w http.ResponseWriter, _ *http.Request, seg []string) {
			writeError(w, wire.ServiceError{Status: 404, Code: "ModuleNotFound", Number: 404010}.WithText("module %s on device %s not found", seg[3], seg[1]))
		}
	}
	if h.cfg.Methods == nil {
		return registry.ServiceConnect, func(w http.ResponseWriter, _ *http.Request, _ []string) {
			writeError(w, errNotFound.WithText("direct methods are not served by this hub"))
		}
	}
	return registry.ServiceConnect, h.invokeMethod
}

func (h *handler) invokeMethod(w http.ResponseWriter, r *http.Request, seg []string) {
	id := seg[1]
	if !validID(w, id) {
		return
	}
	if _, err := h.cfg.Registry.Get(id); err != nil {
		writeError(w, err)
		return
	}
	var req methods.Request
	if err := readJSON(w, r, &req); err != nil {
		writeError(w, err)
		return
	}
	if err := req.Validate(); err != nil {
		writeError(w, err)
		return
	}
	res, err := h.cfg.Methods.Invoke(r.Context(), id, req)
	var ce *methods.CallError
	switch {
	case errors.As(err, &ce):
		writeCallError(w, ce, h.cfg.Now())
	case err != nil:
		writeError(w, err)
	default:
		writeJSON(w, http.StatusOK, res)
	}
}

// writeCallError renders a failed call as IoT Hub does: the error document is a JSON string
// inside Message, with no "ErrorCode:" prefix.
func writeCallError(w http.ResponseWriter, e *methods.CallError, now time.Time) {
	info := map[string]string{}
	if e.Status == 404 {
		info["timeout"] = fmtTimeSpan(e.Timeout)
	}
	inner, _ := json.Marshal(map[string]any{
		"errorCode":    e.Code,
		"trackingId":   fmt.Sprintf("hubsim-%d", now.UnixNano()),
		"message":      e.Message,
		"info":         info,
		"timestampUtc": now.UTC().Format(time.RFC3339Nano),
	})
	body, _ := json.Marshal(map[string]string{"Message": string(inner), "ExceptionMessage": ""})
	w.Header().Set("Content-Type", ContentType)
	w.Header().Set("iothub-errorcode", fmt.Sprint(e.Code))
	w.WriteHeader(e.Status)
	_, _ = w.Write(body)
}

// fmtTimeSpan writes a duration as .NET's TimeSpan does: hh:mm:ss.
func fmtTimeSpan(d time.Duration) string {
	s := int(d / time.Second)
	return fmt.Sprintf("%02d:%02d:%02d", s/3600, s/60%60, s%60)
}
