// Package broker is hubsim's device-facing MQTT endpoint: a mochi-mqtt broker behind a TLS
// listener, with hooks that make it behave as Azure IoT Hub does.
//
//   - The first packet of every connection is checked before mochi reads it (mqttpkt.Screen):
//     MQTT 3.1.1 only; any other protocol level gets CONNACK 1 and is closed;
//     garbage is closed.
//   - Authentication: SAS tokens (device keys, or a policy with DeviceConnect) and X.509
//     (thumbprint or registered CA). Failures get CONNACK 5 and a logged reason. A connection is
//     closed when its token expires.
//   - Only IoT Hub's documented topics and filters are allowed; anything else, QoS 2, or
//     telemetry over 256 KB closes the connection.
//   - Nothing a device publishes goes through mochi's topic tree: telemetry is recorded, twin and
//     method traffic goes to pluggable handlers, and every hub-to-device packet (twin responses,
//     desired notifications, method requests, cloud-to-device messages) goes to the one target
//     connection through its bounded outbound queue (outbound.go): callers never block on the
//     network, and a device that does not read is disconnected.
//
// Telemetry records and cloud-to-device queues are kept in memory only.
package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/faults"
	"github.com/iothubby/iothubby/pkg/hubsim/mqttpkt"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
	"github.com/iothubby/iothubby/pkg/wire"
)

const (
	listenerID = "iothub"
	// maxPacketSize bounds any packet a device may send (mochi allocates the announced size
	// up front). Telemetry's own limit, 256 KB, is checked separately.
	maxPacketSize = 512 * 1024
	// MaxTelemetrySize is IoT Hub's device-to-cloud message limit: body, system property values,
	// and application property names and values.
	MaxTelemetrySize = 256 * 1024
	// MaxSubscriptions is how many filters a device may hold.
	MaxSubscriptions = 5
	// maxKeepAlive is the largest keep-alive IoT Hub honours: 1.5 × 1178 s ≈ its 1767 s cap.
	maxKeepAlive = 1178
)

// Config configures a Broker. HostName, Registry and TLS are required.
type Config struct {
	// HostName is the hub's host name (no port) that user names and tokens must name.
	HostName string
	// Addr is the TCP address to listen on; ":0" picks a free port. Default 127.0.0.1:8883.
	Addr string
	// TLS carries the server certificate. The broker clones it and requests (without verifying)
	// client certificates; authentication verifies them.
	TLS *tls.Config
	// Registry holds the identities the broker authenticates.
	Registry *registry.Registry
	// ConnectTimeout bounds the TLS handshake and the CONNECT packet. Default 30 s.
	ConnectTimeout time.Duration
	// TokenGrace is added to a SAS token's expiry before the connection is closed. Default 0.
	TokenGrace time.Duration
	// TelemetryPerDevice is how many device-to-cloud messages are kept per device. Default 1000;
	// negative keeps none.
	TelemetryPerDevice int
	// TelemetryBytes bounds the memory of the recorded telemetry of all devices together; past
	// it the oldest messages, of any device, are dropped first. Default DefaultTelemetryBytes.
	TelemetryBytes int64
	// Twins answers twin requests; nil answers GET with an empty twin and PATCH with 500.
	Twins TwinHandler
	// Methods receives direct-method responses; nil logs and drops them.
	Methods MethodResponseHandler
	// MaximumClientWritesPending sizes mochi's per-client outbound queue. Default 128.
	MaximumClientWritesPending int32
	// OutboundBytes bounds the hub-to-device packets waiting to be written to one connection;
	// past it the device is disconnected as not reading. Default DefaultOutboundBytes.
	OutboundBytes int
	// WriteTimeout bounds each write to a device's connection; a write that does not complete
	// in time disconnects the device. Default DefaultWriteTimeout.
	WriteTimeout time.Duration
	// OnEvent, if set, is called for every Event, synchronously on the goroutine where it
	// happens; it must not block.
	OnEvent func(Event)
	// OnTelemetry, if set, is given every recorded device-to-cloud message (the Event Hubs-
	// compatible endpoint's feed), synchronously before the PUBACK; it must not block.
	OnTelemetry func(deviceID string, m Message)
	// Faults, if set, acts on AzIoTHub_Fault* telemetry (IoT Hub's fault injection); the
	// caller owns and closes it.
	Faults *faults.Injector
	// DPS, if set, takes over connections whose CONNECT user name has the DPS shape
	// ({idScope}/registrations/{registrationId}/...): DPS shares the hub's TLS listener.
	DPS DPSHandler
	// HostNames are further hub host names this endpoint answers to (hubsim can stand in for
	// several linked hubs; they share one registry).
	HostNames []string
	// HubOf, if set, names the hub a device (of this generation) was assigned to among
	// HostName and HostNames; a CONNECT naming another of them is refused, as the other hub
	// would not know the device. ok false: no restriction.
	HubOf func(deviceID, generationID string) (hub string, ok bool)
	// Throttle applies an IoT Hub tier's rates to CONNECTs, telemetry and twin requests
	// (throttle.go); nil throttles nothing.
	Throttle *throttle.Limiter
}

// DPSHandler serves a DPS MQTT connection handed over after its CONNECT was read and checked.
// It runs on the connection's goroutine, owns conn until it returns, and must return when conn
// is closed.
type DPSHandler interface {
	ServeDPSMQTT(conn net.Conn, state tls.ConnectionState, connect []byte, ci mqttpkt.ConnectInfo)
}

// hostOK reports whether a host named by a device is one of this endpoint's hub names.
func (b *Broker) hostOK(h string) bool {
	if hostMatches(h, b.cfg.HostName) {
		return true
	}
	return slices.ContainsFunc(b.cfg.HostNames, func(n string) bool { return hostMatches(h, n) })
}

// Broker is the running MQTT endpoint.
type Broker struct {
	cfg     Config
	log     *zap.Logger
	reg     *registry.Registry
	mqtt    *mqtt.Server
	ln      net.Listener
	tlsConf *tls.Config
	twins   TwinHandler
	methods MethodResponseHandler

	cancel context.CancelFunc
	grp    group

	throttleLog *zap.Logger // sampled (throttle.go)

	connsMu sync.Mutex
	conns   map[*devConn]struct{}
	closing bool

	devMu   sync.Mutex
	devices map[string]*deviceState

	tel telemetryBudget

	// subCh is closed (and replaced) whenever a device's subscriptions change.
	subMu sync.Mutex
	subCh chan struct{}

	closeOnce sync.Once
}

// Start listens on cfg.Addr and serves until Close.
func Start(cfg Config, log *zap.Logger) (*Broker, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.Registry == nil || cfg.TLS == nil || cfg.HostName == "" {
		return nil, errors.New("broker: HostName, TLS and Registry are required")
	}
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:8883"
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 30 * time.Second
	}
	if cfg.TelemetryBytes <= 0 {
		cfg.TelemetryBytes = DefaultTelemetryBytes
	}
	if cfg.TelemetryPerDevice == 0 {
		cfg.TelemetryPerDevice = 1000
	}
	if cfg.MaximumClientWritesPending <= 0 {
		cfg.MaximumClientWritesPending = 128
	}
	if cfg.OutboundBytes <= 0 {
		cfg.OutboundBytes = DefaultOutboundBytes
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	b := &Broker{
		cfg: cfg, log: log, reg: cfg.Registry,
		twins: cfg.Twins, methods: cfg.Methods,
		conns:   map[*devConn]struct{}{},
		devices: map[string]*deviceState{},
	}
	b.throttleLog = newThrottleLog(log)
	if b.twins == nil {
		b.twins = stubTwins{}
	}
	if b.methods == nil {
		b.methods = logMethods{log: log}
	}
	b.tlsConf = cfg.TLS.Clone()
	b.tlsConf.ClientAuth = tls.RequestClientCert
	if b.tlsConf.MinVersion < tls.VersionTLS12 {
		b.tlsConf.MinVersion = tls.VersionTLS12
	}

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumClientWritesPending = cfg.MaximumClientWritesPending
	caps.MaximumQos = 1 // a SUBSCRIBE asking QoS 2 is granted 1, as IoT Hub does
	caps.MinimumProtocolVersion = 4
	caps.MaximumPacketSize = maxPacketSize
	caps.SharedSubAvailable = 0
	caps.SubIDAvailable = 0
	caps.TopicAliasMaximum = 0
	b.mqtt = mqtt.New(&mqtt.Options{
		Capabilities: caps,
		Logger:       newSlog(log.Named("mochi")),
		// No $SYS topics (see Start): no device may subscribe to them.
		SysTopicResendInterval: 365 * 24 * 3600,
	})
	if err := b.mqtt.AddHook(&hook{b: b}, nil); err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("broker: listen %s: %w", cfg.Addr, err)
	}
	b.ln = ln
	// mochi's Serve is not called: it only starts listeners (the broker runs its own accept loop
	// and hands connections to EstablishConnection) and an event loop that publishes $SYS
	// topics and expires retained messages, inflight messages, sessions and delayed MQTT 5 wills,
	// none of which hubsim has. Without it no mochi goroutine outlives a connection, so Close
	// can wait for everything.
	b.reg.Watch(b.onRegistryChange)
	ctx, cancel := context.WithCancel(context.Background())
	b.cancel = cancel
	b.grp.Go(func() { b.acceptLoop(ctx) })
	log.Info("MQTT listener ready", zap.String("addr", ln.Addr().String()), zap.String("host", cfg.HostName))
	return b, nil
}

// Addr is the listener's address.
func (b *Broker) Addr() net.Addr { return b.ln.Addr() }

// Close stops accepting, closes every device connection, waits for every goroutine the broker
// started, and stops mochi.
func (b *Broker) Close() error {
	b.closeOnce.Do(func() {
		b.cancel()
		_ = b.ln.Close()
		b.connsMu.Lock()
		b.closing = true
		conns := make([]*devConn, 0, len(b.conns))
		for c := range b.conns {
			conns = append(conns, c)
		}
		b.connsMu.Unlock()
		for _, c := range conns {
			if s := c.sess.Load(); s != nil {
				s.stopTimer()
			}
			_ = c.Close()
		}
		b.grp.closeAndWait()
		_ = b.mqtt.Close()
	})
	return nil
}

// deviceState is the broker's per-device state: the current connection, the cloud-to-device
// queue and the telemetry record. It is dropped when the device is deleted.
type deviceState struct {
	id, generationID string

	mu        sync.Mutex
	current   *session
	queue     []*c2dEntry
	pumping   bool
	telemetry ring
}

func (b *Broker) state(id, generationID string) *deviceState {
	b.devMu.Lock()
	defer b.devMu.Unlock()
	ds, ok := b.devices[id]
	if !ok || ds.generationID != generationID {
		ds = &deviceState{id: id, generationID: generationID}
		ds.telemetry.limit = b.cfg.TelemetryPerDevice
		b.devices[id] = ds
	}
	return ds
}

func (b *Broker) existingState(id string) *deviceState {
	b.devMu.Lock()
	defer b.devMu.Unlock()
	return b.devices[id]
}

func (b *Broker) onRegistryChange(c registry.Change) {
	switch {
	case c.New == nil:
		b.devMu.Lock()
		ds := b.devices[c.DeviceID]
		delete(b.devices, c.DeviceID)
		b.devMu.Unlock()
		if ds != nil {
			ds.mu.Lock()
			s := ds.current
			freed, n := ds.telemetry.clear()
			ds.mu.Unlock()
			b.tel.release(freed, n)
			if s != nil {
				s.close(ReasonDeviceDeleted)
			}
		}
	case c.New.Status == registry.StatusDisabled:
		if ds := b.existingState(c.DeviceID); ds != nil {
			ds.mu.Lock()
			s := ds.current
			ds.mu.Unlock()
			if s != nil {
				s.close(ReasonDeviceDisabled)
			}
		}
	}
}

// Disconnect closes a device's current connection, if any, and reports whether there was one.
func (b *Broker) Disconnect(deviceID string) bool {
	ds := b.existingState(deviceID)
	if ds == nil {
		return false
	}
	ds.mu.Lock()
	s := ds.current
	ds.mu.Unlock()
	if s == nil {
		return false
	}
	s.close(ReasonClosedByHubsim)
	return true
}

// ConnectionInfo describes one connected device.
type ConnectionInfo struct {
	DeviceID   string `json:"deviceId"`
	ModuleID   string `json:"moduleId,omitempty"`
	ClientID   string `json:"clientId"`
	RemoteAddr string `json:"remoteAddr"`
	AuthType   string `json:"authType"`
	// Transport is "mqtt" (the TLS listener) or "mqtt-ws" (WebSocket on the HTTPS listener).
	Transport     string    `json:"transport"`
	ModelID       string    `json:"modelId,omitempty"`
	ConnectedAt   time.Time `json:"connectedAt"`
	Subscriptions []string  `json:"subscriptions"`
}

// Connections lists the current device connections, ordered by device ID.
func (b *Broker) Connections() []ConnectionInfo {
	b.devMu.Lock()
	states := make([]*deviceState, 0, len(b.devices))
	for _, ds := range b.devices {
		states = append(states, ds)
	}
	b.devMu.Unlock()
	var out []ConnectionInfo
	for _, ds := range states {
		ds.mu.Lock()
		s := ds.current
		ds.mu.Unlock()
		if s == nil {
			continue
		}
		subs := make([]string, 0, MaxSubscriptions)
		for f := range s.cl.State.Subscriptions.GetAll() {
			subs = append(subs, f)
		}
		slices.Sort(subs)
		clientID := s.deviceID
		if s.moduleID != "" {
			clientID += "/" + s.moduleID
		}
		out = append(out, ConnectionInfo{
			DeviceID: s.deviceID, ModuleID: s.moduleID, ClientID: clientID, RemoteAddr: s.remote,
			AuthType: s.authType, Transport: s.transport(), ModelID: s.modelID, ConnectedAt: s.connectedAt.UTC(), Subscriptions: subs,
		})
	}
	slices.SortFunc(out, func(a, b ConnectionInfo) int { return strings.Compare(a.DeviceID, b.DeviceID) })
	return out
}

// Telemetry returns the device's recorded device-to-cloud messages, oldest first.
func (b *Broker) Telemetry(deviceID string) ([]Message, error) {
	id, ok := b.reg.Identity(deviceID)
	if !ok {
		return nil, wire.ErrDeviceNotFound.WithText("Device %s not registered", deviceID)
	}
	ds := b.existingState(deviceID)
	if ds == nil || ds.generationID != id.GenerationID {
		return []Message{}, nil
	}
	ds.mu.Lock()
	defer ds.mu.Unlock()
	return ds.telemetry.all(), nil
}

// nextPacketID picks a packet ID for a hub-to-device QoS 1 publish on s that no queued message
// uses. Call with ds.mu held.
func (ds *deviceState) nextPacketID(s *session) uint16 {
	for {
		s.pid++
		if s.pid == 0 || s.pid == math.MaxUint16 {
			s.pid = 1
		}
		if !slices.ContainsFunc(ds.queue, func(e *c2dEntry) bool { return e.sess == s && e.pid == s.pid }) {
			return s.pid
		}
	}
}
