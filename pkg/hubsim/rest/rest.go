// Package rest is hubsim's HTTPS service API: IoT Hub's registry endpoints as Microsoft's
// service SDKs call them (shared access signature auth, Azure's JSON shapes, etags and error
// bodies), plus hubsim's own additions under /hubsim/ (recorded telemetry, cloud-to-device send,
// connection list, CA certificate registration).
package rest

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// MaxBodySize bounds request bodies.
const MaxBodySize = 1 << 20

// LogRequestRefused is the (sampled) log message for a request refused by authorization.
const LogRequestRefused = "service request refused"

// ContentType is the content type of every JSON response.
const ContentType = "application/json; charset=utf-8"

// Devices is what the API needs from the device endpoint.
type Devices interface {
	SendC2D(deviceID string, m broker.C2DMessage) (string, error)
	PurgeC2D(deviceID string) (int, error)
	Telemetry(deviceID string) ([]broker.Message, error)
	Connections() []broker.ConnectionInfo
}

// Config configures the API.
type Config struct {
	// HostName is the hub's host name; service tokens' sr must name it (a port is ignored).
	HostName string
	Registry *registry.Registry
	Devices  Devices
	// Twins serves /twins/{id}; nil answers 404.
	Twins Twins
	// Methods serves POST /twins/{id}/methods; nil answers 404.
	Methods Methods
	// Images serves /hubsim/images/... once the service token is checked (the path is split as
	// for every handler); nil answers 404.
	Images func(w http.ResponseWriter, r *http.Request, seg []string)
	// Faults serves /hubsim/faults/... (pkg/hubsim/faults) like Images; nil answers 404.
	Faults func(w http.ResponseWriter, r *http.Request, seg []string)
	// Jobs serves /jobs/v2 and devices.jobs queries; nil answers 404.
	Jobs Jobs
	// Now is the clock for token expiry; nil means time.Now.
	Now func() time.Time
	// Throttle applies an IoT Hub tier's rates to service requests (429 ThrottlingException,
	// throttle.go) and is shown at GET /hubsim/throttle; nil throttles nothing.
	Throttle *throttle.Limiter
	// ThrottleExtra, if set, adds rows to GET /hubsim/throttle (DPS registrations).
	ThrottleExtra func() []throttle.Counter
	// SetThrottle, if set, serves POST /hubsim/throttle (a tier) and DELETE (off: tier "").
	SetThrottle func(throttle.Request) error
}

type handler struct {
	cfg Config
	log *zap.Logger
	// refusedLog logs refused requests, sampled: a flood of bad keys must not flood the log.
	refusedLog *zap.Logger
	// throttleLog logs throttled requests, sampled the same way.
	throttleLog *zap.Logger
}

// Refused requests are logged at most refusedFirst times a second per message, then one in
// refusedThereafter.
const (
	refusedFirst      = 10
	refusedThereafter = 1000
)

// NewHandler returns the API's HTTP handler.
func NewHandler(cfg Config, log *zap.Logger) http.Handler {
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	sampled := log.WithOptions(zap.WrapCore(func(c zapcore.Core) zapcore.Core {
		return zapcore.NewSamplerWithOptions(c, time.Second, refusedFirst, refusedThereafter)
	}))
	return &handler{cfg: cfg, log: log, refusedLog: sampled, throttleLog: sampled}
}

// Server serves the API over TLS.
type Server struct {
	srv  *http.Server
	ln   net.Listener
	done chan struct{}
	log  *zap.Logger
	once sync.Once
}

// Start listens on addr (":0" picks a port) and serves h with tlsConf until Close.
func Start(addr string, tlsConf *tls.Config, h http.Handler, log *zap.Logger) (*Server, error) {
	if log == nil {
		log = zap.NewNop()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("rest: listen %s: %w", addr, err)
	}
	tc := tlsConf.Clone()
	tc.NextProtos = []string{"http/1.1"}
	if tc.MinVersion < tls.VersionTLS12 {
		tc.MinVersion = tls.VersionTLS12
	}
	errLog, _ := zap.NewStdLogAt(log.Named("http"), zap.DebugLevel)
	s := &Server{
		srv: &http.Server{
			Handler:           h,
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       60 * time.Second,
			IdleTimeout:       2 * time.Minute,
			ErrorLog:          errLog,
		},
		ln:   ln,
		done: make(chan struct{}),
		log:  log,
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(tls.NewListener(ln, tc)); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("HTTPS server stopped", zap.Error(err))
		}
	}()
	log.Info("HTTPS listener ready", zap.String("addr", ln.Addr().String()))
	return s, nil
}

// Addr is the listener's address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Close stops the server, letting requests in progress finish for up to five seconds, and waits
// for its goroutine.
func (s *Server) Close() error {
	var err error
	s.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err = s.srv.Shutdown(ctx); err != nil {
			err = s.srv.Close()
		}
		<-s.done
	})
	return err
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rw := &statusWriter{ResponseWriter: w, status: 200}
	h.serve(rw, r)
	h.log.Debug("request", zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.Int("status", rw.status))
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

var (
	errNotFound = wire.ServiceError{Status: 404, Code: "NotFound", Number: 404000}
	errMethod   = wire.ServiceError{Status: 405, Code: "MethodNotAllowed", Number: 405000}
)

// Segments splits a request's path into segments, each percent-decoded once, a trailing slash
// dropped. hubsim's other HTTPS APIs (DPS) route with it too.
func Segments(r *http.Request) ([]string, error) {
	p := strings.TrimPrefix(r.URL.EscapedPath(), "/")
	parts := strings.Split(p, "/")
	if n := len(parts); n > 1 && parts[n-1] == "" {
		parts = parts[:n-1]
	}
	for i, s := range parts {
		d, err := url.PathUnescape(s)
		if err != nil {
			return nil, wire.ErrArgumentInvalid.WithText("path segment %d is not valid percent-encoding", i+1)
		}
		parts[i] = d
	}
	return parts, nil
}

func (h *handler) serve(w http.ResponseWriter, r *http.Request) {
	seg, err := Segments(r)
	if err != nil {
		writeError(w, err)
		return
	}
	var need registry.Rights
	var fn func(http.ResponseWriter, *http.Request, []string)
	switch {
	case len(seg) == 1 && seg[0] == "devices" && r.Method == http.MethodPost:
		need, fn = registry.RegistryWrite, h.bulkDevices
	case len(seg) == 1 && seg[0] == "devices":
		need, fn = registry.RegistryRead, onlyMethod(http.MethodGet, h.listDevices)
	case len(seg) == 3 && seg[0] == "devices" && seg[2] == "commands":
		need, fn = registry.ServiceConnect, onlyMethod(http.MethodDelete, h.purgeCommands)
	case len(seg) == 2 && seg[0] == "devices" && seg[1] == "query" && r.Method == http.MethodPost:
		need, fn = registry.RegistryRead, h.queryDevices
	case len(seg) >= 3 && seg[0] == "jobs" && seg[1] == "v2":
		need, fn = h.jobRoute(r, seg)
	case len(seg) == 2 && seg[0] == "devices":
		switch r.Method {
		case http.MethodGet:
			need, fn = registry.RegistryRead, h.getDevice
		case http.MethodPut:
			need, fn = registry.RegistryWrite, h.putDevice
		case http.MethodDelete:
			need, fn = registry.RegistryWrite, h.deleteDevice
		default:
			need, fn = registry.RegistryRead, methodNotAllowed
		}
	case len(seg) == 2 && seg[0] == "twins":
		need, fn = h.twinRoute(r)
	case seg[0] == "twins" && (len(seg) == 3 && seg[2] == "methods" || len(seg) == 5 && seg[2] == "modules" && seg[4] == "methods"):
		need, fn = h.methodRoute(r, seg)
	case len(seg) == 2 && seg[0] == "statistics" && seg[1] == "devices":
		need, fn = registry.RegistryRead, onlyMethod(http.MethodGet, h.deviceStats)
	case len(seg) == 2 && seg[0] == "statistics" && seg[1] == "service":
		need, fn = registry.ServiceConnect, onlyMethod(http.MethodGet, h.serviceStats)
	case len(seg) >= 1 && seg[0] == "hubsim":
		need, fn = registry.ServiceConnect, h.hubsimRoute(r, seg[1:])
	default:
		need, fn = 0, func(w http.ResponseWriter, r *http.Request, _ []string) {
			writeError(w, errNotFound.WithText("no such resource: %s %s", r.Method, r.URL.Path))
		}
	}
	if err := h.authorize(r, need); err != nil {
		h.refusedLog.Info(LogRequestRefused, zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.Error(err))
		writeError(w, err)
		return
	}
	if h.throttled(w, r, seg) {
		return
	}
	fn(w, r, seg)
}

func onlyMethod(m string, fn func(http.ResponseWriter, *http.Request, []string)) func(http.ResponseWriter, *http.Request, []string) {
	return func(w http.ResponseWriter, r *http.Request, seg []string) {
		if r.Method != m {
			methodNotAllowed(w, r, seg)
			return
		}
		fn(w, r, seg)
	}
}

func methodNotAllowed(w http.ResponseWriter, r *http.Request, _ []string) {
	writeError(w, errMethod.WithText("method %s is not allowed on %s", r.Method, r.URL.Path))
}

// authorize checks the Authorization header: a SAS token scoped to the hub, signed with a
// shared access policy's key, not expired, from a policy holding need.
func (h *handler) authorize(r *http.Request, need registry.Rights) error {
	hdr := r.Header.Get("Authorization")
	if hdr == "" {
		return wire.ErrUnauthorized.WithText("missing Authorization header")
	}
	tok, err := sas.Parse(hdr)
	if err != nil {
		return wire.ErrUnauthorized.WithText("malformed Authorization header: %v", err)
	}
	if !sas.ResourceCovers(tok.Resource, h.cfg.HostName) {
		return wire.ErrUnauthorized.WithText("token resource %q is not this hub (%s)", tok.Resource, h.cfg.HostName)
	}
	if tok.KeyName == "" {
		return wire.ErrUnauthorized.WithText("token names no shared access policy (skn)")
	}
	p, ok := h.cfg.Registry.Policy(tok.KeyName)
	if !ok {
		return wire.ErrUnauthorized.WithText("unknown shared access policy %q", tok.KeyName)
	}
	if err := p.Verify(tok, h.cfg.Now()); err != nil {
		if errors.Is(err, sas.ErrExpired) {
			return wire.ErrUnauthorized.WithText("token expired")
		}
		return wire.ErrUnauthorized.WithText("token signature does not match policy %q", tok.KeyName)
	}
	if !p.Rights.Has(need) {
		return wire.ErrUnauthorized.WithText("policy %q lacks %s", tok.KeyName, (need &^ p.Rights).String())
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, wire.ErrServerError.WithText("encoding the response: %v", err))
		return
	}
	w.Header().Set("Content-Type", ContentType)
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func writeError(w http.ResponseWriter, err error) {
	var se wire.ServiceError
	if !errors.As(err, &se) {
		se = wire.ErrServerError.WithText("%v", err)
	}
	b, _ := json.Marshal(se)
	w.Header().Set("Content-Type", ContentType)
	w.Header().Set("iothub-errorcode", se.Code)
	w.WriteHeader(se.Status)
	_, _ = w.Write(b)
}

// readJSON reads a JSON request body into v: at most MaxBodySize bytes, valid UTF-8, one JSON
// value. Unknown fields are ignored.
func readJSON(w http.ResponseWriter, r *http.Request, v any) error {
	b, err := readBody(w, r)
	if err != nil {
		return err
	}
	if len(strings.TrimSpace(string(b))) == 0 {
		return wire.ErrArgumentInvalid.WithText("request body is empty")
	}
	if err := json.Unmarshal(b, v); err != nil {
		return wire.ErrIotHubFormatError.WithText("request body is not valid JSON for this request: %v", err)
	}
	return nil
}

func readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	if r.ContentLength > MaxBodySize {
		// Refused before reading: the client may never send that much, and waiting for it would
		// hold the connection until the read timeout. net/http closes the connection after the
		// response, since the body is left unread.
		return nil, wire.ErrArgumentInvalid.WithText("request body is larger than %d bytes (Content-Length %d)", MaxBodySize, r.ContentLength)
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBodySize))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, wire.ErrArgumentInvalid.WithText("request body is larger than %d bytes", MaxBodySize)
		}
		return nil, wire.ErrArgumentInvalid.WithText("reading the request body: %v", err)
	}
	if !utf8.Valid(b) {
		return nil, wire.ErrIotHubFormatError.WithText("request body is not valid UTF-8")
	}
	return b, nil
}
