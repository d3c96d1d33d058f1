// Package hubtest is an in-process TLS MQTT broker (mochi-mqtt) that acts enough like IoT Hub
// for tests of device-side code: SAS checking, twin answers to the requesting client only,
// CONNACK refusals, connection drops and disconnects when a token expires. It is test support;
// production code must not import it.
package hubtest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Host is the hub name the broker's certificate is issued for; tests dial 127.0.0.1.
const Host = "hub.test"

// TwinMode says how the broker answers twin requests.
type TwinMode int

const (
	TwinEcho   TwinMode = iota // answer at once, to the requesting client only
	TwinHold                   // keep requests; the test answers them
	TwinSilent                 // never answer
)

// ConnectRecord is one CONNECT the broker saw.
type ConnectRecord struct {
	ClientID  string
	Username  string
	Password  string
	Clean     bool
	Keepalive uint16
	Token     *sas.Token // parsed password, nil if none or unparsable
	At        time.Time
	Refused   byte // CONNACK code sent when refused, 0 if accepted
}

// HeldRequest is a twin request kept unanswered (TwinHold).
type HeldRequest struct {
	Client *mqtt.Client
	Topic  wire.Topic
}

// Broker is an in-process TLS MQTT broker (mochi-mqtt) with a hook that acts enough like
// IoT Hub for the session's tests: SAS checking, twin answers to the requester only, refusals,
// connection drops and token-expiry disconnects.
type Broker struct {
	t      testing.TB
	srv    *mqtt.Server
	Addr   string
	CAPool *x509.CertPool
	// CAPEM is the CA certificate in PEM, for code that takes a CA file.
	CAPEM []byte
	Key   sas.Key
	Hook  *Hook
}

// Hook is the broker's IoT Hub behaviour. Its exported fields are its state and knobs; change
// them only inside Broker.With.
type Hook struct {
	mqtt.HookBase
	b *Broker

	mu              sync.Mutex
	Connects        []ConnectRecord
	Refuse          []byte              // CONNACK codes for the next attempts (consumed in order)
	RefuseAll       byte                // refuse every attempt with this code
	Log             map[string][]string // per client id: "sub:<filter>", "pub:<topic>"
	Telemetry       []wire.Topic
	MethodResponses []wire.Topic
	MethodBodies    []string // the bodies of MethodResponses, in the same order
	Clients         map[string]*mqtt.Client
	Timers          map[*mqtt.Client]*time.Timer
	ExpiredDrops    int // connections closed because their token expired while connected
	CleanDisconnect int
	// TakenOver counts connections closed because the same client id connected again: a
	// DISCONNECT still unread when the next CONNECT is handled ends up here, not in
	// CleanDisconnect.
	TakenOver       int
	Twin            TwinMode
	Held            []HeldRequest
	DropOnMID       map[string]bool // drop the connection (no PUBACK) when this $.mid first arrives
	ReportedVersion int64
	// MethodBeforeSuback, when set, is a method request (name) written to a client that
	// subscribes to direct methods before its SUBACK, as IoT Hub may: the subscription is live
	// on the hub before the client has read the SUBACK. Its $rid is "early".
	MethodBeforeSuback string
	Events             chan string // non-blocking notifications for tests
}

// NewBroker starts a broker on 127.0.0.1:0 with a TLS listener whose certificate is issued for
// Host, localhost and 127.0.0.1; it is closed when the test ends. Devices authenticate with
// SAS tokens signed by Key.
func NewBroker(t testing.TB) *Broker {
	t.Helper()
	caCert, caKey := NewCA(t, "test CA")
	serverCert := NewLeaf(t, caCert, caKey, []string{Host, "localhost"}, []net.IP{net.ParseIP("127.0.0.1")})
	pool := x509.NewCertPool()
	pool.AddCert(caCert)

	key := sas.Key(bytes.Repeat([]byte{7}, 32))
	b := &Broker{t: t, CAPool: pool, Key: key,
		CAPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caCert.Raw})}
	b.Hook = &Hook{b: b, Log: map[string][]string{}, Clients: map[string]*mqtt.Client{},
		Timers: map[*mqtt.Client]*time.Timer{}, DropOnMID: map[string]bool{}, Events: make(chan string, 1024)}
	b.srv = mqtt.New(&mqtt.Options{
		InlineClient: true,
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err := b.srv.AddHook(b.Hook, nil); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &trackedListener{ln: tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{serverCert},
		MinVersion: tls.VersionTLS12, ClientAuth: tls.RequestClientCert})}
	if err := b.srv.AddListener(l); err != nil {
		t.Fatal(err)
	}
	b.Addr = ln.Addr().String()
	go func() { _ = b.srv.Serve() }()
	t.Cleanup(func() {
		b.Hook.mu.Lock()
		for cl, tm := range b.Hook.Timers {
			tm.Stop()
			delete(b.Hook.Timers, cl)
		}
		b.Hook.mu.Unlock()
		// mochi v2.7.9's Server.Close races with a connection it is still establishing, so stop
		// accepting, close every connection and wait for their goroutines before closing it.
		l.stop()
		_ = b.srv.Close()
	})
	return b
}

// ID names the hook for mochi.
func (h *Hook) ID() string { return "hubtest" }

// Provides tells mochi which hook methods are implemented.
func (h *Hook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnSubscribed,
		mqtt.OnPublish, mqtt.OnDisconnect:
		return true
	}
	return false
}

func (h *Hook) notify(ev string) {
	select {
	case h.Events <- ev:
	default:
	}
}

// OnConnect records the CONNECT and refuses it when told to (CONNACK 3 here; bad credentials
// are refused in OnConnectAuthenticate, which mochi answers with CONNACK 5 to MQTT 3.1.1).
func (h *Hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	rec := ConnectRecord{ClientID: pk.Connect.ClientIdentifier, Username: string(pk.Connect.Username),
		Password: string(pk.Connect.Password), Clean: pk.Connect.Clean, Keepalive: pk.Connect.Keepalive, At: time.Now()}
	if tok, err := sas.Parse(rec.Password); err == nil {
		rec.Token = tok
	}
	h.mu.Lock()
	code := h.RefuseAll
	if code == 0 && len(h.Refuse) > 0 {
		code = h.Refuse[0]
		h.Refuse = h.Refuse[1:]
	}
	if code == 3 {
		rec.Refused = 3
		h.Connects = append(h.Connects, rec)
		h.mu.Unlock()
		h.notify("refused")
		_ = h.b.srv.SendConnack(cl, packets.ErrServerUnavailable, false, nil)
		return packets.ErrServerUnavailable
	}
	h.Connects = append(h.Connects, rec)
	h.mu.Unlock()
	return nil
}

// OnConnectAuthenticate checks the SAS token (signature, expiry, resource) or the refusal code.
func (h *Hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	rec := &h.Connects[len(h.Connects)-1]
	if h.RefuseAll == 5 || h.RefuseAll == 4 {
		rec.Refused = 5
		h.notify("refused")
		return false
	}
	if rec.Password == "" {
		// X.509: accept a client certificate whose CN is the device id.
		tc, ok := cl.Net.Conn.(*tls.Conn)
		if !ok || len(tc.ConnectionState().PeerCertificates) == 0 ||
			tc.ConnectionState().PeerCertificates[0].Subject.CommonName != strings.SplitN(rec.ClientID, "/", 2)[0] {
			rec.Refused = 5
			h.notify("refused")
			return false
		}
		h.Clients[cl.ID] = cl
		h.Log[cl.ID] = append(h.Log[cl.ID], "connect")
		h.notify("connected")
		return true
	}
	tok := rec.Token
	// A module identity's client ID is {deviceId}/{moduleId}, and its token names the module.
	resource := sas.DeviceResource(Host, rec.ClientID)
	if dev, mod, ok := strings.Cut(rec.ClientID, "/"); ok {
		resource = sas.ModuleResource(Host, dev, mod)
	}
	if tok == nil || tok.Verify(h.b.Key, time.Now()) != nil || !tok.Authorizes(resource) {
		rec.Refused = 5
		h.notify("refused")
		return false
	}
	// Like IoT Hub, close the connection when the token expires.
	h.Timers[cl] = time.AfterFunc(time.Until(tok.Expiry), func() {
		h.mu.Lock()
		_, live := h.Timers[cl]
		if live {
			h.ExpiredDrops++
			delete(h.Timers, cl)
		}
		h.mu.Unlock()
		if live {
			cl.Stop(errors.New("sas token expired"))
		}
	})
	h.Clients[cl.ID] = cl
	h.Log[cl.ID] = append(h.Log[cl.ID], "connect")
	h.notify("connected")
	return true
}

// OnACLCheck allows everything.
func (h *Hook) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

// OnSubscribed records subscriptions in the client's log.
func (h *Hook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, _ []byte) {
	h.mu.Lock()
	early := ""
	for _, f := range pk.Filters {
		h.Log[cl.ID] = append(h.Log[cl.ID], "sub:"+f.Filter)
		if f.Filter == wire.MethodsFilter {
			early = h.MethodBeforeSuback
		}
	}
	h.mu.Unlock()
	if early != "" {
		// mochi writes the SUBACK after this hook returns.
		h.b.SendTo(cl, wire.MethodRequest(early, "early"), []byte("{}"))
	}
	h.notify("subscribed")
}

// OnDisconnect records the disconnect and whether it was a clean MQTT DISCONNECT.
func (h *Hook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	h.mu.Lock()
	if tm, ok := h.Timers[cl]; ok {
		tm.Stop()
		delete(h.Timers, cl)
	}
	if h.Clients[cl.ID] == cl {
		delete(h.Clients, cl.ID)
	}
	switch cause := cl.StopCause(); {
	case errors.Is(cause, packets.CodeDisconnect):
		h.CleanDisconnect++
	case errors.Is(cause, packets.ErrSessionTakenOver):
		h.TakenOver++
	}
	h.Log[cl.ID] = append(h.Log[cl.ID], "disconnect")
	h.mu.Unlock()
	h.notify("disconnected")
}

// OnPublish records device publishes, answers twin requests and drops connections on request.
func (h *Hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	t, err := wire.Parse(pk.TopicName)
	h.mu.Lock()
	h.Log[cl.ID] = append(h.Log[cl.ID], "pub:"+pk.TopicName)
	if err != nil {
		h.mu.Unlock()
		return pk, nil
	}
	switch t.Kind {
	case wire.KindTelemetry:
		mid, _ := t.Properties.Get(wire.PropMessageID)
		if h.DropOnMID[mid] {
			delete(h.DropOnMID, mid)
			h.mu.Unlock()
			cl.Stop(errors.New("test: drop before PUBACK"))
			h.notify("dropped")
			return pk, packets.ErrRejectPacket
		}
		h.Telemetry = append(h.Telemetry, t)
		h.mu.Unlock()
		h.notify("telemetry")
		return pk, nil
	case wire.KindMethodResponse:
		h.MethodResponses = append(h.MethodResponses, t)
		h.MethodBodies = append(h.MethodBodies, string(pk.Payload))
		h.mu.Unlock()
		h.notify("method-response")
		return pk, packets.ErrRejectPacket
	case wire.KindTwinGet, wire.KindTwinPatchReported:
		mode := h.Twin
		if mode == TwinHold {
			h.Held = append(h.Held, HeldRequest{Client: cl, Topic: t})
		}
		var resp string
		var body []byte
		if t.Kind == wire.KindTwinGet {
			resp = wire.TwinResponse(200, t.RequestID, -1)
			body = []byte(`{"desired":{"$version":1},"reported":{"$version":1},"rid":"` + t.RequestID + `"}`)
		} else {
			h.ReportedVersion++
			resp = wire.TwinResponse(204, t.RequestID, h.ReportedVersion+1)
		}
		h.mu.Unlock()
		h.notify("twin-request")
		if mode == TwinEcho {
			h.b.SendTo(cl, resp, body)
		}
		return pk, packets.ErrRejectPacket
	}
	h.mu.Unlock()
	return pk, nil
}

// SendTo writes a QoS 0 publish to one client only.
func (b *Broker) SendTo(cl *mqtt.Client, topic string, body []byte) {
	_ = cl.WritePacket(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish},
		TopicName:   topic,
		Payload:     body,
	})
}

// AnswerHeld answers every held twin request, in reverse order, on the connection each came
// on; it returns the $rids answered.
func (b *Broker) AnswerHeld() []string {
	b.Hook.mu.Lock()
	held := b.Hook.Held
	b.Hook.Held = nil
	b.Hook.mu.Unlock()
	var rids []string
	for i := len(held) - 1; i >= 0; i-- {
		r := held[i]
		rids = append(rids, r.Topic.RequestID)
		b.SendTo(r.Client, wire.TwinResponse(200, r.Topic.RequestID, -1), []byte(`{"rid":"`+r.Topic.RequestID+`"}`))
	}
	return rids
}

// Client returns the live connection of a client id.
func (b *Broker) Client(id string) *mqtt.Client {
	b.Hook.mu.Lock()
	defer b.Hook.mu.Unlock()
	return b.Hook.Clients[id]
}

// Drop closes a client's connection abruptly, as a network failure would.
func (b *Broker) Drop(id string) {
	if cl := b.Client(id); cl != nil {
		cl.Stop(errors.New("test: dropped"))
	}
}

// ConnectRecords returns every CONNECT seen so far.
func (b *Broker) ConnectRecords() []ConnectRecord {
	b.Hook.mu.Lock()
	defer b.Hook.mu.Unlock()
	return append([]ConnectRecord(nil), b.Hook.Connects...)
}

// ClientLog returns a client's event log (connect, sub:FILTER, pub:TOPIC, disconnect).
func (b *Broker) ClientLog(id string) []string {
	b.Hook.mu.Lock()
	defer b.Hook.mu.Unlock()
	return append([]string(nil), b.Hook.Log[id]...)
}

// TelemetryMIDs returns the $.mid of every telemetry message accepted, in arrival order.
func (b *Broker) TelemetryMIDs() []string {
	b.Hook.mu.Lock()
	defer b.Hook.mu.Unlock()
	var mids []string
	for _, t := range b.Hook.Telemetry {
		mid, _ := t.Properties.Get(wire.PropMessageID)
		mids = append(mids, mid)
	}
	return mids
}

// With runs f with the hook's state locked.
func (b *Broker) With(f func(h *Hook)) {
	b.Hook.mu.Lock()
	defer b.Hook.mu.Unlock()
	f(b.Hook)
}

// WaitEvent waits for a broker event by name.
func (b *Broker) WaitEvent(t testing.TB, name string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case ev := <-b.Hook.Events:
			if ev == name {
				return
			}
		case <-deadline:
			t.Fatalf("broker event %q did not happen", name)
		}
	}
}

// Publish delivers a message to subscribers of the topic (QoS 1).
func (b *Broker) Publish(topic string, body []byte, qos byte) {
	if err := b.srv.Publish(topic, body, false, qos); err != nil {
		b.t.Fatalf("publish %s: %v", topic, err)
	}
}

// NewCA makes a self-signed ECDSA CA certificate.
func NewCA(t testing.TB, name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// NewClientCert issues a client certificate with common name cn from ca.
func NewClientCert(t testing.TB, ca *x509.Certificate, caKey *ecdsa.PrivateKey, cn string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(3),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// NewLeaf issues a server certificate from ca for names and ips.
func NewLeaf(t testing.TB, ca *x509.Certificate, caKey *ecdsa.PrivateKey, names []string, ips []net.IP) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: names[0]},
		DNSNames:     names,
		IPAddresses:  ips,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// trackedListener is a mochi listener that keeps its connections and their goroutines, so the
// broker can end all of them, and wait, before it closes the server.
type trackedListener struct {
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	done  bool
}

func (l *trackedListener) ID() string              { return "tls" }
func (l *trackedListener) Address() string         { return l.ln.Addr().String() }
func (l *trackedListener) Protocol() string        { return "tcp" }
func (l *trackedListener) Init(*slog.Logger) error { return nil }
func (l *trackedListener) Close(listeners.CloseFn) { l.stop() }

func (l *trackedListener) Serve(establish listeners.EstablishFn) {
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			return
		}
		l.mu.Lock()
		if l.done {
			l.mu.Unlock()
			_ = conn.Close()
			return
		}
		if l.conns == nil {
			l.conns = map[net.Conn]struct{}{}
		}
		l.conns[conn] = struct{}{}
		l.wg.Add(1)
		l.mu.Unlock()
		go func() {
			defer l.wg.Done()
			_ = establish(l.ID(), conn)
			l.mu.Lock()
			delete(l.conns, conn)
			l.mu.Unlock()
		}()
	}
}

// stop closes the listener and every connection, and waits for the connection goroutines.
func (l *trackedListener) stop() {
	l.mu.Lock()
	l.done = true
	_ = l.ln.Close()
	for c := range l.conns {
		_ = c.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
}
