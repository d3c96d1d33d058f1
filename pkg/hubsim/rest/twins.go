package rest

import (
	"net/http"

	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/hubsim/twins"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Twins is what the API needs from the twin store.
type Twins interface {
	Get(id string) (twins.Twin, error)
	Update(id, ifMatch string, body []byte) (twins.Twin, error)
	Replace(id, ifMatch string, body []byte) (twins.Twin, error)
}

// twinRoute serves GET, PATCH and PUT on /twins/{id}; all need ServiceConnect, as IoT Hub's
// permissions say ("retrieve and update device twins").
func (h *handler) twinRoute(r *http.Request) (registry.Rights, func(http.ResponseWriter, *http.Request, []string)) {
	if h.cfg.Twins == nil {
		return 0, func(w http.ResponseWriter, r *http.Request, _ []string) {
			writeError(w, errNotFound.WithText("twins are not served by this hub"))
		}
	}
	switch r.Method {
	case http.MethodGet:
		return registry.ServiceConnect, h.getTwin
	case http.MethodPatch:
		return registry.ServiceConnect, h.changeTwin(h.cfg.Twins.Update)
	case http.MethodPut:
		return registry.ServiceConnect, h.changeTwin(h.cfg.Twins.Replace)
	}
	return registry.ServiceConnect, methodNotAllowed
}

func (h *handler) getTwin(w http.ResponseWriter, _ *http.Request, seg []string) {
	t, err := h.cfg.Twins.Get(seg[1])
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, t)
}

func (h *handler) changeTwin(fn func(id, ifMatch string, body []byte) (twins.Twin, error)) func(http.ResponseWriter, *http.Request, []string) {
	return func(w http.ResponseWriter, r *http.Request, seg []string) {
		body, err := readBody(w, r)
		if err != nil {
			writeError(w, err)
			return
		}
		if len(body) == 0 {
			writeError(w, wire.ErrArgumentInvalid.WithText("request body is empty"))
			return
		}
		t, err := fn(seg[1], r.Header.Get("If-Match"), body)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, t)
	}
}
