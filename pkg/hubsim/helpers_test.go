package hubsim_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/mqttpkt"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// waitTimeout bounds every wait for an event; it is a deadline, not a timing assertion.
const waitTimeout = 20 * time.Second

// events records broker events and lets a test wait for one.
type events struct {
	mu      sync.Mutex
	list    []broker.Event
	changed chan struct{}
}

func newEvents() *events { return &events{changed: make(chan struct{})} }

func (e *events) add(ev broker.Event) {
	e.mu.Lock()
	e.list = append(e.list, ev)
	close(e.changed)
	e.changed = make(chan struct{})
	e.mu.Unlock()
}

// mark returns a position; waitFrom only considers events recorded after it.
func (e *events) mark() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.list)
}

func (e *events) waitFrom(t *testing.T, from int, what string, pred func(broker.Event) bool) broker.Event {
	t.Helper()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	for {
		e.mu.Lock()
		for _, ev := range e.list[from:] {
			if pred(ev) {
				e.mu.Unlock()
				return ev
			}
		}
		ch := e.changed
		e.mu.Unlock()
		select {
		case <-ch:
		case <-timer.C:
			t.Fatalf("no %s event within %v", what, waitTimeout)
		}
	}
}

type env struct {
	t      *testing.T
	srv    *hubsim.Server
	ev     *events
	host   string
	dir    string
	client *http.Client
	base   string
}

func newEnv(t *testing.T, mutate ...func(*hubsim.Config)) *env {
	t.Helper()
	return newEnvIn(t, t.TempDir(), mutate...)
}

func newEnvIn(t *testing.T, dir string, mutate ...func(*hubsim.Config)) *env {
	t.Helper()
	ev := newEvents()
	cfg := hubsim.Config{
		StateDir: dir, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0",
		OnEvent: ev.add, ConnectTimeout: 10 * time.Second,
	}
	for _, m := range mutate {
		m(&cfg)
	}
	srv, err := hubsim.Start(context.Background(), cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	e := &env{t: t, srv: srv, ev: ev, host: srv.Endpoints().HubHostName, dir: dir}
	tr := &http.Transport{TLSClientConfig: srv.ClientTLSConfig()}
	e.client = &http.Client{Transport: tr, Timeout: waitTimeout}
	e.base = "https://" + srv.Endpoints().HTTPSAddress
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		if err := srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return e
}

func (e *env) createSAS(id string) registry.Device {
	e.t.Helper()
	d, err := e.srv.Registry().Create(registry.Device{DeviceID: id})
	if err != nil {
		e.t.Fatalf("create %s: %v", id, err)
	}
	return d
}

func deviceToken(t testing.TB, host, id, key string, expiry time.Time) string {
	t.Helper()
	k, err := sas.ParseKey(key)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := sas.Build(context.Background(), k, sas.Params{Resource: sas.DeviceResource(host, id), Expiry: expiry})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func (e *env) token(d registry.Device) string {
	return deviceToken(e.t, e.host, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey, time.Now().Add(time.Hour))
}

func (e *env) serviceToken(policy string, expiry time.Time) string {
	e.t.Helper()
	p, ok := e.srv.Registry().Policy(policy)
	if !ok {
		e.t.Fatalf("no policy %s", policy)
	}
	k, _ := sas.ParseKey(p.PrimaryKey)
	tok, err := sas.Build(context.Background(), k, sas.Params{Resource: e.host, KeyName: policy, Expiry: expiry, RawResource: true})
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) json(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("response %q: %v", r.body, err)
	}
}

// errorCode returns the ErrorCode name of an Azure error body.
func (r response) errorCode(t *testing.T) string {
	t.Helper()
	var b struct{ Message, ExceptionMessage string }
	r.json(t, &b)
	rest, ok := strings.CutPrefix(b.Message, "ErrorCode:")
	if !ok {
		t.Fatalf("error body %q has no ErrorCode", r.body)
	}
	code, _, _ := strings.Cut(rest, ";")
	return code
}

// do sends a request with an iothubowner token (auth == "") or the given Authorization value.
func (e *env) do(method, path string, body []byte, auth string, hdr ...string) response {
	e.t.Helper()
	req, err := http.NewRequest(method, e.base+path, bytes.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	if auth == "" {
		auth = e.serviceToken("iothubowner", time.Now().Add(time.Hour))
	}
	if auth != "none" {
		req.Header.Set("Authorization", auth)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json; charset=utf-8")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := e.client.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: b}
}

// --- raw MQTT over TLS ---

type rawConn struct {
	t *testing.T
	c net.Conn // TLS, or a WebSocket (ws_test.go)
	r *bufio.Reader
}

func (e *env) dial(cert ...tls.Certificate) *rawConn {
	e.t.Helper()
	cfg := e.srv.ClientTLSConfig()
	cfg.Certificates = cert
	c, err := tls.Dial("tcp", e.srv.Endpoints().MQTTAddress, cfg)
	if err != nil {
		e.t.Fatalf("dial: %v", err)
	}
	e.t.Cleanup(func() { _ = c.Close() })
	return &rawConn{t: e.t, c: c, r: bufio.NewReader(c)}
}

func (rc *rawConn) send(b []byte) {
	rc.t.Helper()
	if _, err := rc.c.Write(b); err != nil {
		rc.t.Fatalf("write: %v", err)
	}
}

type packet struct {
	typ   byte // high nibble of the first byte
	flags byte
	body  []byte
}

func (rc *rawConn) read() (packet, error) {
	_ = rc.c.SetReadDeadline(time.Now().Add(waitTimeout))
	return readPkt(rc.r)
}

func readPkt(r *bufio.Reader) (packet, error) {
	first, body, err := mqttpkt.ReadRaw(r, 1<<28)
	if err != nil {
		return packet{}, err
	}
	return packet{typ: first >> 4, flags: first & 0x0f, body: body}, nil
}

func (rc *rawConn) mustRead() packet {
	rc.t.Helper()
	p, err := rc.read()
	if err != nil {
		rc.t.Fatalf("read packet: %v", err)
	}
	return p
}

// expectClosed reads until the server closes the connection; a timeout fails the test.
func (rc *rawConn) expectClosed() {
	rc.t.Helper()
	for {
		p, err := rc.read()
		if err == nil {
			if p.typ == 3 || p.typ == 4 || p.typ == 9 || p.typ == 13 || p.typ == 2 || p.typ == 14 {
				continue // in-flight answers may precede the close
			}
			rc.t.Fatalf("expected the connection to close, got packet type %d", p.typ)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			rc.t.Fatalf("connection still open after %v", waitTimeout)
		}
		return
	}
}

// connect sends a 3.1.1 CONNECT and returns the CONNACK return code.
func (rc *rawConn) connect(clientID, username string, password string) byte {
	rc.t.Helper()
	rc.send(connectPkt(4, clientID, username, password, false))
	p := rc.mustRead()
	if p.typ != 2 || len(p.body) != 2 {
		rc.t.Fatalf("expected CONNACK, got type %d body %x", p.typ, p.body)
	}
	return p.body[1]
}

func (e *env) connectSAS(d registry.Device) *rawConn {
	e.t.Helper()
	rc := e.dial()
	if code := rc.connect(d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", e.token(d)); code != 0 {
		e.t.Fatalf("CONNACK %d for %s", code, d.DeviceID)
	}
	return rc
}

// encode is mqttpkt.Encode for packets a test builds on purpose; it cannot fail for them.
func encode(pk packets.Packet) []byte {
	b, err := mqttpkt.Encode(pk)
	if err != nil {
		panic(err)
	}
	return b
}

func connectPkt(level byte, clientID, username, password string, clean bool) []byte {
	return encode(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: level,
		Connect: packets.ConnectParams{Clean: clean, Keepalive: 60, ClientIdentifier: clientID,
			UsernameFlag: username != "", Username: []byte(username), PasswordFlag: password != "", Password: []byte(password)}})
}

func publishPkt(topic string, payload []byte, qos byte, pid uint16, retain bool) []byte {
	pk := mqttpkt.Publish(topic, qos, pid, payload)
	pk.FixedHeader.Retain = retain
	return encode(pk)
}

func subscribePkt(pid uint16, filters ...string) []byte {
	return encode(mqttpkt.Subscribe(pid, 1, filters...))
}

func pubackPkt(pid uint16) []byte { return encode(mqttpkt.Puback(pid)) }

// subscribe sends SUBSCRIBE and returns the SUBACK codes.
func (rc *rawConn) subscribe(pid uint16, filters ...string) []byte {
	rc.t.Helper()
	rc.send(subscribePkt(pid, filters...))
	for {
		p := rc.mustRead()
		if p.typ == 9 {
			if binary.BigEndian.Uint16(p.body) != pid {
				rc.t.Fatalf("SUBACK for packet %d, want %d", binary.BigEndian.Uint16(p.body), pid)
			}
			return p.body[2:]
		}
		if p.typ != 3 {
			rc.t.Fatalf("expected SUBACK, got type %d", p.typ)
		}
	}
}

// publish is a received PUBLISH.
type publish struct {
	topic   string
	qos     byte
	pid     uint16
	payload []byte
}

func parsePublish(t *testing.T, p packet) publish {
	t.Helper()
	pk, err := mqttpkt.Decode(mqttpkt.Frame(p.typ<<4|p.flags, p.body))
	if err != nil || pk.FixedHeader.Type != packets.Publish {
		t.Fatalf("expected PUBLISH, got type %d (%v)", p.typ, err)
	}
	return publish{topic: pk.TopicName, qos: pk.FixedHeader.Qos, pid: pk.PacketID, payload: pk.Payload}
}

func deviceTokenWithPolicy(t *testing.T, host, id string, p *registry.Policy) string {
	t.Helper()
	k, err := sas.ParseKey(p.PrimaryKey)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := sas.Build(context.Background(), k, sas.Params{Resource: sas.DeviceResource(host, id), KeyName: p.KeyName, Expiry: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}
