// Package hubsim is a local Azure IoT Hub: device MQTT over TLS and the service REST API over
// HTTPS, faithful enough that Microsoft's SDKs run against it unmodified, with persistent state
// in a directory. docs/hubsim.md is the contract for scripts and tests.
//
// A Server is started in-process with Start and stopped with Close:
//
//	srv, err := hubsim.Start(ctx, hubsim.Config{StateDir: dir, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, logger)
//	...
//	dev, err := srv.Registry().Create(registry.Device{DeviceID: "dev1"}) // keys generated
//	...
//	defer srv.Close()
package hubsim

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/internal/atomicfile"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/connstr"
	hubamqp "github.com/iothubby/iothubby/pkg/hubsim/amqp"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/dps"
	"github.com/iothubby/iothubby/pkg/hubsim/endpoints"
	"github.com/iothubby/iothubby/pkg/hubsim/eventhubs"
	"github.com/iothubby/iothubby/pkg/hubsim/faults"
	"github.com/iothubby/iothubby/pkg/hubsim/images"
	"github.com/iothubby/iothubby/pkg/hubsim/jobs"
	"github.com/iothubby/iothubby/pkg/hubsim/methods"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/hubsim/rest"
	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
	"github.com/iothubby/iothubby/pkg/hubsim/twins"
)

// File names in the state directory.
const (
	EndpointsFile = endpoints.File
	DatabaseFile  = "hubsim.db"
	// DPSDatabaseFile holds DPS enrollments and registrations.
	DPSDatabaseFile = "dps.db"
)

// MsgReady is the log message hubsim writes once every listener is up and endpoints.json is
// written; tests and scripts wait for it.
const MsgReady = "hubsim ready"

// Config configures a Server. The zero value works: an ephemeral state directory, host name
// localhost, MQTT on 127.0.0.1:8883 and HTTPS on 127.0.0.1:8443.
type Config struct {
	// StateDir holds the CA, the server certificate, the registry and endpoints.json. Empty
	// means a temporary directory that Close removes.
	StateDir string
	// HostName is the hub's host name, without a port. Default "localhost".
	HostName string
	// MQTTAddr and HTTPSAddr are listen addresses; port 0 picks a free port.
	MQTTAddr  string
	HTTPSAddr string
	// AMQPAddr is the service AMQP (amqps) listen address; empty: no AMQP endpoint. With
	// AMQPFallback, an address in use is replaced by a free port (the binary's default).
	AMQPAddr     string
	AMQPFallback bool
	// ConnectTimeout bounds a device's TLS handshake and CONNECT. Default 30 s.
	ConnectTimeout time.Duration
	// TokenGrace is added to a device SAS token's expiry before its connection is closed.
	TokenGrace time.Duration
	// TelemetryPerDevice is how many device-to-cloud messages are kept per device (default 1000,
	// negative: none).
	TelemetryPerDevice int
	// TelemetryBytes bounds the memory of the recorded telemetry of all devices together (default
	// broker.DefaultTelemetryBytes, 256 MiB); the oldest messages of any device go first.
	TelemetryBytes int64
	// FlushInterval is how often connection state changes are written to disk (default 2 s;
	// lastActivityTime alone is written every 15 intervals, everything at Close).
	FlushInterval time.Duration
	// Twins replaces hubsim's twin store for device requests (nil: the store in pkg/hubsim/twins).
	Twins   broker.TwinHandler
	Methods broker.MethodResponseHandler
	// TwinFlushInterval is how often changed twins are written to disk (default 100 ms).
	TwinFlushInterval time.Duration
	// TwinRateLimit, when positive, limits device twin GETs and PATCHes to this many per second
	// across the hub; requests over it are answered 429. Default 0: unlimited.
	TwinRateLimit float64
	// DeviceOutboundBytes and DeviceWriteTimeout bound what the hub sends a device that does
	// not read: past either, the device is disconnected (broker.DefaultOutboundBytes, 4 MiB, and
	// broker.DefaultWriteTimeout, 10 s, when zero).
	DeviceOutboundBytes int
	DeviceWriteTimeout  time.Duration
	// OnEvent observes the device endpoint (connections, refusals, telemetry, ...); it is
	// called synchronously and must not block.
	OnEvent func(broker.Event)

	// IDScope is the DPS ID scope (default dps.DefaultIDScope).
	IDScope string
	// HubHostNames are further linked hub host names DPS may assign devices to; the device
	// endpoint answers to all of them (they share one registry).
	HubHostNames []string
	// DPSRetryAfter is the retry-after (seconds) of DPS 202 replies (default 1; negative: 0).
	DPSRetryAfter int
	// MaxConcurrentJobs is how many jobs v2 run at once; the others wait, queued (0: one, as
	// IoT Hub's S1 tier).
	MaxConcurrentJobs int
	// JobParallelism is how many devices one job works on at once (0: jobs.DefaultParallelism).
	JobParallelism int

	// DPSRegistrationRate limits DPS register requests per second (0: unlimited), with
	// DPSRegistrationBurst (default 1).
	DPSRegistrationRate  float64
	DPSRegistrationBurst int

	// ImagesMaxTotal bounds the firmware image store (StateDir/images, served under
	// /hubsim/images) in bytes (default images.DefaultMaxTotal); ImagesMaxUpload one image
	// (default images.DefaultMaxUpload).
	ImagesMaxTotal  int64
	ImagesMaxUpload int64

	// Events configures the Event Hubs-compatible endpoint's store (StateDir/eventhubs.db):
	// partitions, retention, consumer groups.
	Events EventsConfig

	// Tier, when set (F1, S1, S2, S3, B1-B3), throttles like an IoT Hub of that tier with Units
	// units (0: 1): new connections, telemetry, twin reads and updates, registry, direct
	// methods, jobs and queries at the documented rates (pkg/hubsim/throttle), and DPS
	// registrations at DPS's 1,000/min unless DPSRegistrationRate is set. Empty: no throttling.
	Tier  string
	Units int
	// Clock is the clock of the throttles and of injected faults' delays and durations (nil:
	// the real one); tests advance a fake one.
	Clock clock.Clock
}

// Endpoints is what endpoints.json holds.
type Endpoints = endpoints.Endpoints

// Server is a running hubsim.
type Server struct {
	cfg       Config
	log       *zap.Logger
	ca        *pki.CA
	reg       *registry.Registry
	twins     *twins.Store
	methods   *methods.Service
	jobs      *jobs.Runner
	brk       *broker.Broker
	faults    *faults.Injector
	amqp      *hubamqp.Server
	throttle  *throttle.Limiter
	api       *rest.Server
	dps       *dps.Server
	images    *images.Store
	events    *eventhubs.Store
	endpoints Endpoints
	tempDir   bool
	lock      *os.File // held on the state directory from Start to Close
	closeOnce sync.Once
	closeErr  error
}

// Start starts a Server: it creates (or reuses) the CA and server certificate in the state
// directory, opens the registry, starts both listeners and then writes endpoints.json. ctx bounds
// only the start; Close stops the server.
func Start(ctx context.Context, cfg Config, log *zap.Logger) (_ *Server, err error) {
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.HostName == "" {
		cfg.HostName = "localhost"
	}
	if strings.ContainsAny(cfg.HostName, "/ ") || (strings.Contains(cfg.HostName, ":") && net.ParseIP(strings.Trim(cfg.HostName, "[]")) == nil) {
		return nil, fmt.Errorf("hubsim: host name %q must be a bare host name (no port)", cfg.HostName)
	}
	if cfg.MQTTAddr == "" {
		cfg.MQTTAddr = "127.0.0.1:8883"
	}
	if cfg.HTTPSAddr == "" {
		cfg.HTTPSAddr = "127.0.0.1:8443"
	}
	s := &Server{cfg: cfg, log: log}
	defer func() {
		if err != nil {
			_ = s.Close()
		}
	}()
	if cfg.StateDir == "" {
		dir, err := os.MkdirTemp("", "hubsim-")
		if err != nil {
			return nil, fmt.Errorf("hubsim: %w", err)
		}
		s.cfg.StateDir, s.tempDir = dir, true
	} else if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("hubsim: state directory: %w", err)
	}
	dir, err := filepath.Abs(s.cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("hubsim: %w", err)
	}
	s.cfg.StateDir = dir
	if s.lock, err = lockStateDir(dir); err != nil {
		return nil, err
	}
	if err := tightenModes(dir, log); err != nil {
		return nil, err
	}

	lim, err := s.tierThrottle()
	if err != nil {
		return nil, err
	}
	if s.ca, err = pki.LoadOrCreateCA(dir); err != nil {
		return nil, err
	}
	cert, err := pki.LoadOrCreateServer(dir, s.ca, cfg.HostName)
	if err != nil {
		return nil, err
	}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.reg, err = registry.Open(filepath.Join(dir, DatabaseFile), log.Named("registry"),
		registry.Options{FlushInterval: cfg.FlushInterval})
	if err != nil {
		return nil, err
	}
	s.twins, err = twins.Open(s.reg, log.Named("twins"), twins.Options{FlushInterval: cfg.TwinFlushInterval, RateLimit: cfg.TwinRateLimit})
	if err != nil {
		return nil, err
	}
	retryAfter := cfg.DPSRetryAfter
	if retryAfter == 0 {
		retryAfter = 1
	}
	s.faults = faults.New(cfg.Clock, log.Named("faults"))
	s.dps, err = dps.Open(dps.Config{
		Path: filepath.Join(dir, DPSDatabaseFile), IDScope: cfg.IDScope, ServiceHostName: cfg.HostName,
		Hubs: append([]string{cfg.HostName}, cfg.HubHostNames...), Registry: s.reg, RetryAfter: retryAfter,
		RegistrationRate: s.cfg.DPSRegistrationRate, RegistrationBurst: s.cfg.DPSRegistrationBurst,
		ApplyInitialTwin: s.applyInitialTwin, Fault: s.dpsFault,
	}, log.Named("dps"))
	if err != nil {
		return nil, err
	}
	var twinHandler broker.TwinHandler = s.twins
	if cfg.Twins != nil {
		twinHandler = cfg.Twins
	}
	s.methods = methods.New(log.Named("methods"))
	var methodHandler broker.MethodResponseHandler = s.methods
	if cfg.Methods != nil {
		methodHandler = cfg.Methods
	}
	if err := s.openEvents(); err != nil {
		return nil, err
	}
	s.brk, err = broker.Start(broker.Config{
		HostName: cfg.HostName, Addr: cfg.MQTTAddr, TLS: tlsConf, Registry: s.reg,
		ConnectTimeout: cfg.ConnectTimeout, TokenGrace: cfg.TokenGrace,
		TelemetryPerDevice: cfg.TelemetryPerDevice, TelemetryBytes: cfg.TelemetryBytes, Twins: twinHandler, Methods: methodHandler,
		OutboundBytes: cfg.DeviceOutboundBytes, WriteTimeout: cfg.DeviceWriteTimeout,
		OnEvent: cfg.OnEvent, DPS: s.dps, HostNames: cfg.HubHostNames, HubOf: s.dps.HubOf,
		OnTelemetry: s.recordEvent, Faults: s.faults, Throttle: lim,
	}, log.Named("mqtt"))
	if err != nil {
		return nil, err
	}
	s.faults.SetConns(faultConns{s})
	s.twins.SetNotifier(s.brk)
	s.methods.SetSender(s.brk)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if _, port, err := net.SplitHostPort(s.brk.Addr().String()); err == nil && port != "8883" {
		s.dps.SetAssignedHubSuffix(":" + port)
	}
	s.images, err = images.Open(images.Config{Dir: filepath.Join(dir, "images"), MaxTotal: cfg.ImagesMaxTotal,
		MaxUpload: cfg.ImagesMaxUpload, Logger: log.Named("images")})
	if err != nil {
		return nil, err
	}
	if s.amqp, err = startAMQP(cfg, tlsConf, s.reg, s.brk, log.Named("amqp")); err != nil {
		return nil, err
	}
	s.jobs, err = jobs.Open(jobs.Config{
		Store: s.reg, Devices: jobDevices{s.reg, s.twins}, Methods: s.methods,
		MaxConcurrent: cfg.MaxConcurrentJobs, Parallelism: cfg.JobParallelism,
	}, log.Named("jobs"))
	if err != nil {
		return nil, err
	}
	h := rest.NewHandler(rest.Config{HostName: cfg.HostName, Registry: s.reg, Devices: s.brk, Twins: s.twins, Methods: s.methods,
		Images: s.images.ServeAdmin, Jobs: s.jobs, Faults: s.faults.ServeAdmin,
		Throttle: lim, ThrottleExtra: s.dpsThrottleCounters, SetThrottle: s.SetThrottle}, log.Named("rest"))
	httpsTLS := tlsConf.Clone()
	httpsTLS.ClientAuth = tls.RequestClientCert // DPS X.509 registrations over HTTPS
	if s.api, err = rest.Start(cfg.HTTPSAddr, httpsTLS, dpsMux{dps: s.dps, images: s.images, hub: s.faults.WrapREST(h), ws: s.brk}, log.Named("https")); err != nil {
		return nil, err
	}
	owner, ok := s.reg.Policy("iothubowner")
	if !ok {
		return nil, errors.New("hubsim: registry has no iothubowner policy")
	}
	s.endpoints = Endpoints{
		HubHostName:  cfg.HostName,
		MQTTAddress:  s.brk.Addr().String(),
		HTTPSAddress: s.api.Addr().String(),
		ServiceConnectionString: connstr.ConnectionString{
			HostName: cfg.HostName, SharedAccessKeyName: owner.KeyName, SharedAccessKey: owner.PrimaryKey,
		}.String(),
		CAFile:              filepath.Join(dir, pki.CACertFile),
		PID:                 os.Getpid(),
		IDScope:             s.dps.IDScope(),
		DPSConnectionString: s.dps.ConnectionString(),
	}
	if s.amqp != nil {
		s.endpoints.AMQPAddress = s.amqp.Addr().String()
		if err := s.serveEventHubs(owner.KeyName, owner.PrimaryKey); err != nil {
			return nil, err
		}
	}
	b, _ := json.MarshalIndent(s.endpoints, "", "  ")
	if err := atomicfile.WriteFile(filepath.Join(dir, EndpointsFile), append(b, '\n'), 0o600); err != nil {
		return nil, fmt.Errorf("hubsim: %w", err)
	}
	log.Info(MsgReady, zap.String("host", cfg.HostName), zap.String("mqtt", s.endpoints.MQTTAddress),
		zap.String("https", s.endpoints.HTTPSAddress), zap.String("state", dir))
	return s, nil
}

// Endpoints returns what endpoints.json holds (the connection string includes a key).
func (s *Server) Endpoints() Endpoints { return s.endpoints }

// DPS is the Device Provisioning Service (enrollments, registrations, counters).
func (s *Server) DPS() *dps.Server { return s.dps }

// applyInitialTwin gives a device DPS has just assigned (or reset) its enrollment's initial
// twin: tags and desired properties replace what the twin had.
func (s *Server) applyInitialTwin(deviceID string, initial json.RawMessage) error {
	if len(initial) == 0 {
		initial = json.RawMessage(`{}`)
	}
	_, err := s.twins.Replace(deviceID, "*", initial)
	return err
}

// dpsMux sends DPS paths (service API, device registration, /hubsim/dps) to DPS, image
// downloads (authorised by their URL's token, not a service token) to the image store, device
// MQTT over WebSockets (any path ending in /$iothub/websocket) to the broker, and everything
// else to the hub's API.
type dpsMux struct {
	dps    *dps.Server
	images *images.Store
	hub    http.Handler
	ws     *broker.Broker
}

func (m dpsMux) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if broker.IsWebSocketPath(r.URL.Path) {
		m.ws.ServeWebSocket(w, r)
		return
	}
	if images.IsDownload(r) {
		m.images.ServeDownload(w, r)
		return
	}
	if seg, ok := dps.Segments(r); ok && dps.Owns(seg) {
		m.dps.ServeHTTP(w, r)
		return
	}
	m.hub.ServeHTTP(w, r)
}

// AMQP is the service AMQP endpoint (nil when Config.AMQPAddr is empty); register further
// nodes on it with Handle.
func (s *Server) AMQP() *hubamqp.Server { return s.amqp }

func startAMQP(cfg Config, tlsConf *tls.Config, reg *registry.Registry, brk *broker.Broker, log *zap.Logger) (*hubamqp.Server, error) {
	if cfg.AMQPAddr == "" {
		return nil, nil
	}
	ac := hubamqp.Config{Addr: cfg.AMQPAddr, TLS: tlsConf, HostName: cfg.HostName, HostNames: cfg.HubHostNames, Policies: reg, C2D: brk}
	srv, err := hubamqp.Start(ac, log)
	if err != nil && cfg.AMQPFallback && errors.Is(err, syscall.EADDRINUSE) {
		host, _, _ := net.SplitHostPort(cfg.AMQPAddr)
		log.Warn("AMQP address in use; listening on a free port (see amqpAddress in endpoints.json)", zap.String("addr", cfg.AMQPAddr))
		ac.Addr = net.JoinHostPort(host, "0")
		srv, err = hubamqp.Start(ac, log)
	}
	return srv, err
}

// jobDevices gives the job runner the devices and their twins.
type jobDevices struct {
	reg   *registry.Registry
	twins *twins.Store
}

func (d jobDevices) IDs() []string {
	devs := d.reg.List(0)
	ids := make([]string, len(devs))
	for i, dv := range devs {
		ids[i] = dv.DeviceID
	}
	return ids
}

func (d jobDevices) Get(id string) (twins.Twin, error) { return d.twins.Get(id) }

func (d jobDevices) Update(id, ifMatch string, body []byte) (twins.Twin, error) {
	return d.twins.Update(id, ifMatch, body)
}

// Jobs is the jobs v2 runner.
func (s *Server) Jobs() *jobs.Runner { return s.jobs }

// Registry is the device registry (create devices through it in tests and benchmarks).
func (s *Server) Registry() *registry.Registry { return s.reg }

// Broker is the device MQTT endpoint (cloud-to-device send, telemetry records, connections).
func (s *Server) Broker() *broker.Broker { return s.brk }

// dropConnections closes deviceID's connection, or every device connection for "".
func (s *Server) dropConnections(deviceID string) int {
	if deviceID != "" {
		if s.brk.Disconnect(deviceID) {
			return 1
		}
		return 0
	}
	n := 0
	for _, c := range s.brk.Connections() {
		if s.brk.Disconnect(c.DeviceID) {
			n++
		}
	}
	return n
}

// dpsFault applies the dps-delay and dps-error faults to a device registration request.
func (s *Server) dpsFault(ctx context.Context, regID string) (status, retryAfter int) {
	f := s.faults.DPSFault(regID)
	if err := s.faults.Sleep(ctx, f.Delay); err != nil {
		return http.StatusServiceUnavailable, 1 // hubsim is stopping (or the client left)
	}
	return f.Status, f.RetryAfter
}

// faultConns is what admin faults do to device connections.
type faultConns struct{ s *Server }

func (c faultConns) Drop(deviceID string) int        { return c.s.dropConnections(deviceID) }
func (c faultConns) ExpireToken(deviceID string) int { return c.s.brk.ExpireToken(deviceID) }
func (c faultConns) Stall(deviceID string, release <-chan struct{}) int {
	return c.s.brk.Stall(deviceID, release)
}

// Faults is the fault injector (AzIoTHub_Fault* telemetry, GET /hubsim/faults).
func (s *Server) Faults() *faults.Injector { return s.faults }

// Twins is the twin store.
func (s *Server) Twins() *twins.Store { return s.twins }

// Methods is the direct-method service.
func (s *Server) Methods() *methods.Service { return s.methods }

// Images is the firmware image store (served under /hubsim/images).
func (s *Server) Images() *images.Store { return s.images }

// CA is the certificate authority that signed the server certificate.
func (s *Server) CA() *pki.CA { return s.ca }

// StateDir is the absolute state directory.
func (s *Server) StateDir() string { return s.cfg.StateDir }

// ClientTLSConfig returns a TLS client configuration that trusts hubsim's CA and names the hub
// host (for clients dialling an IP address).
func (s *Server) ClientTLSConfig() *tls.Config {
	return &tls.Config{RootCAs: s.ca.Pool(), ServerName: s.cfg.HostName, MinVersion: tls.VersionTLS12}
}

// Close stops both listeners, closes every connection, waits for every goroutine, flushes and
// closes the registry, and removes endpoints.json (and an ephemeral state directory).
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		var errs []error
		if s.endpoints.PID != 0 {
			if err := os.Remove(filepath.Join(s.cfg.StateDir, EndpointsFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
		if s.faults != nil {
			// Pending faults first: requests held by a delay are answered at once and stalled
			// connections released, so nothing below waits for a fault's duration.
			s.faults.Close()
		}
		if s.api != nil {
			errs = append(errs, s.api.Close())
		}
		if s.amqp != nil {
			errs = append(errs, s.amqp.Close())
		}
		if s.jobs != nil {
			errs = append(errs, s.jobs.Close())
		}
		if s.brk != nil {
			errs = append(errs, s.brk.Close())
		}
		if s.events != nil {
			errs = append(errs, s.events.Close())
		}
		if s.dps != nil {
			errs = append(errs, s.dps.Close())
		}
		if s.twins != nil {
			errs = append(errs, s.twins.Close())
		}
		if s.reg != nil {
			errs = append(errs, s.reg.Close())
		}
		if s.lock != nil {
			errs = append(errs, s.lock.Close()) // releases the flock
		}
		if s.tempDir {
			errs = append(errs, os.RemoveAll(s.cfg.StateDir))
		}
		s.closeErr = errors.Join(errs...)
		s.log.Info("hubsim stopped")
	})
	return s.closeErr
}
