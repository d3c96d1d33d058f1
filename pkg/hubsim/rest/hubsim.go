package rest

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"time"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/wire"
)

// hubsimRoute routes /hubsim/... (seg excludes "hubsim").
func (h *handler) hubsimRoute(r *http.Request, seg []string) func(http.ResponseWriter, *http.Request, []string) {
	switch {
	case len(seg) == 4 && seg[0] == "devices" && seg[2] == "messages" && seg[3] == "events":
		return onlyMethod(http.MethodGet, h.getTelemetry)
	case len(seg) == 4 && seg[0] == "devices" && seg[2] == "messages" && seg[3] == "devicebound":
		return onlyMethod(http.MethodPost, h.postC2D)
	case len(seg) == 1 && seg[0] == "connections":
		return onlyMethod(http.MethodGet, h.getConnections)
	case len(seg) == 1 && seg[0] == "certificates":
		if r.Method == http.MethodPost {
			return h.postCertificate
		}
		return onlyMethod(http.MethodGet, h.listCertificates)
	case len(seg) == 2 && seg[0] == "certificates":
		return onlyMethod(http.MethodDelete, h.deleteCertificate)
	case len(seg) >= 1 && seg[0] == "images" && h.cfg.Images != nil: // pkg/hubsim/images (uploads, list, delete)
		return h.cfg.Images
	case len(seg) >= 1 && seg[0] == "faults" && h.cfg.Faults != nil: // pkg/hubsim/faults
		return h.cfg.Faults
	case len(seg) == 1 && seg[0] == "throttle": // throttle.go
		return h.throttleRoute(r)
	}
	return func(w http.ResponseWriter, r *http.Request, _ []string) {
		writeError(w, errNotFound.WithText("no such resource: %s %s", r.Method, r.URL.Path))
	}
}

// seg passed to the handlers below is the full path: ["hubsim", "devices", id, ...].

func (h *handler) getTelemetry(w http.ResponseWriter, _ *http.Request, seg []string) {
	if !validID(w, seg[2]) {
		return
	}
	msgs, err := h.cfg.Devices.Telemetry(seg[2])
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Messages []broker.Message `json:"messages"`
	}{msgs})
}

type c2dRequest struct {
	Body            *string         `json:"body"`
	BodyBase64      *string         `json:"bodyBase64"`
	Properties      json.RawMessage `json:"properties"`
	MessageID       string          `json:"messageId"`
	CorrelationID   string          `json:"correlationId"`
	UserID          string          `json:"userId"`
	ContentType     string          `json:"contentType"`
	ContentEncoding string          `json:"contentEncoding"`
	ExpiryTimeUTC   string          `json:"expiryTimeUtc"`
	Ack             string          `json:"ack"`
}

func (h *handler) postC2D(w http.ResponseWriter, r *http.Request, seg []string) {
	id := seg[2]
	if !validID(w, id) {
		return
	}
	var req c2dRequest
	if err := readJSON(w, r, &req); err != nil {
		writeError(w, err)
		return
	}
	m := broker.C2DMessage{
		MessageID: req.MessageID, CorrelationID: req.CorrelationID, UserID: req.UserID,
		ContentType: req.ContentType, ContentEncoding: req.ContentEncoding, Ack: req.Ack,
	}
	switch {
	case req.Body != nil && req.BodyBase64 != nil:
		writeError(w, wire.ErrArgumentInvalid.WithText("give body or bodyBase64, not both"))
		return
	case req.BodyBase64 != nil:
		b, err := base64.StdEncoding.DecodeString(*req.BodyBase64)
		if err != nil {
			writeError(w, wire.ErrArgumentInvalid.WithText("bodyBase64 is not base64: %v", err))
			return
		}
		m.Body = b
	case req.Body != nil:
		m.Body = []byte(*req.Body)
	}
	if req.ExpiryTimeUTC != "" {
		t, err := time.Parse(time.RFC3339Nano, req.ExpiryTimeUTC)
		if err != nil {
			writeError(w, wire.ErrArgumentInvalid.WithText("expiryTimeUtc is not an RFC 3339 time"))
			return
		}
		m.ExpiryTime = t
	}
	props, err := orderedProperties(req.Properties)
	if err != nil {
		writeError(w, err)
		return
	}
	m.Properties = props
	mid, err := h.cfg.Devices.SendC2D(id, m)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"messageId": mid})
}

// orderedProperties reads a JSON object of string (or null) values, keeping the key order.
func orderedProperties(raw json.RawMessage) (wire.Properties, error) {
	if len(bytes.TrimSpace(raw)) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return nil, nil
	}
	bad := wire.ErrArgumentInvalid.WithText("properties must be an object of string or null values")
	dec := json.NewDecoder(bytes.NewReader(raw))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil, bad
	}
	var out wire.Properties
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return nil, bad
		}
		k, _ := kt.(string)
		vt, err := dec.Token()
		if err != nil {
			return nil, bad
		}
		switch v := vt.(type) {
		case string:
			out = append(out, wire.Property{Key: k, Value: v})
		case nil:
			out = append(out, wire.Property{Key: k, Null: true})
		default:
			return nil, bad
		}
	}
	if t, err := dec.Token(); err != nil || t != json.Delim('}') {
		return nil, bad
	}
	return out, nil
}

func (h *handler) getConnections(w http.ResponseWriter, _ *http.Request, _ []string) {
	conns := h.cfg.Devices.Connections()
	if conns == nil {
		conns = []broker.ConnectionInfo{}
	}
	writeJSON(w, http.StatusOK, struct {
		Connections []broker.ConnectionInfo `json:"connections"`
	}{conns})
}

// postCertificate registers a CA: a PEM body (name from ?name=) or JSON {"name","certificate"}.
func (h *handler) postCertificate(w http.ResponseWriter, r *http.Request, _ []string) {
	b, err := readBody(w, r)
	if err != nil {
		writeError(w, err)
		return
	}
	name := r.URL.Query().Get("name")
	pemText := b
	if t := bytes.TrimSpace(b); len(t) > 0 && t[0] == '{' {
		var req struct {
			Name        string `json:"name"`
			Certificate string `json:"certificate"`
		}
		if err := json.Unmarshal(b, &req); err != nil {
			writeError(w, wire.ErrIotHubFormatError.WithText("request body is not valid JSON: %v", err))
			return
		}
		if req.Name != "" {
			name = req.Name
		}
		pemText = []byte(req.Certificate)
	}
	ca, err := h.cfg.Registry.AddCACertificate(name, pemText)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, ca)
}

func (h *handler) listCertificates(w http.ResponseWriter, _ *http.Request, _ []string) {
	writeJSON(w, http.StatusOK, struct {
		Certificates []registry.CACertificate `json:"certificates"`
	}{h.cfg.Registry.CACertificates()})
}

func (h *handler) deleteCertificate(w http.ResponseWriter, _ *http.Request, seg []string) {
	if err := h.cfg.Registry.DeleteCACertificate(seg[2]); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
