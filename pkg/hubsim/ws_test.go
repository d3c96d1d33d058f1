package hubsim_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/wire"
)

// wsClient is the client side of MQTT over a WebSocket, as a net.Conn for rawConn.
type wsClient struct {
	*websocket.Conn
	r   io.Reader
	wmu sync.Mutex
}

func (c *wsClient) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			typ, r, err := c.NextReader()
			if err != nil {
				return 0, err
			}
			if typ != websocket.BinaryMessage {
				return 0, errors.New("text message from the server")
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (c *wsClient) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return len(p), c.WriteMessage(websocket.BinaryMessage, p)
}

func (c *wsClient) SetDeadline(t time.Time) error { return c.NetConn().SetDeadline(t) }

// dialWS opens wss://<https address><path> offering the subprotocols; it returns the HTTP
// response (status, negotiated subprotocol) and, when the upgrade succeeded, a rawConn.
func (e *env) dialWS(path string, protos []string, cert ...tls.Certificate) (*rawConn, *http.Response, error) {
	e.t.Helper()
	tc := e.srv.ClientTLSConfig()
	tc.Certificates = cert
	d := websocket.Dialer{TLSClientConfig: tc, Subprotocols: protos, HandshakeTimeout: waitTimeout}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	c, resp, err := d.DialContext(ctx, "wss://"+e.srv.Endpoints().HTTPSAddress+path, nil)
	if err != nil {
		return nil, resp, err
	}
	e.t.Cleanup(func() { _ = c.Close() })
	wc := &wsClient{Conn: c}
	return &rawConn{t: e.t, c: wc, r: bufio.NewReader(wc)}, resp, nil
}

func (e *env) mustDialWS(path string, protos []string, cert ...tls.Certificate) (*rawConn, *http.Response) {
	e.t.Helper()
	rc, resp, err := e.dialWS(path, protos, cert...)
	if err != nil {
		e.t.Fatalf("WebSocket dial %s: %v", path, err)
	}
	return rc, resp
}

func TestWebSocketTelemetryAndC2D(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-ws")
	rc, resp := e.mustDialWS("/$iothub/websocket", []string{"mqtt"})
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != "mqtt" {
		t.Fatalf("negotiated subprotocol %q, want mqtt", got)
	}
	mark := e.ev.mark()
	if code := rc.connect(d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", e.token(d)); code != 0 {
		t.Fatalf("CONNACK %d", code)
	}
	e.ev.waitFrom(t, mark, "connected", func(ev broker.Event) bool {
		return ev.Kind == broker.EventConnected && ev.DeviceID == d.DeviceID
	})
	conns := e.srv.Broker().Connections()
	if len(conns) != 1 || conns[0].DeviceID != d.DeviceID || conns[0].AuthType != "sas" || conns[0].Transport != "mqtt-ws" {
		t.Fatalf("connections: %+v", conns)
	}

	rc.subscribe(1, wire.C2DFilter(d.DeviceID))
	mark = e.ev.mark()
	rc.send(publishPkt("devices/dev-ws/messages/events/%24.ct=application%2Fjson&k=v", []byte(`{"t":1}`), 1, 7, false))
	if p := rc.mustRead(); p.typ != 4 || string(p.body) != "\x00\x07" {
		t.Fatalf("expected PUBACK 7, got type %d %x", p.typ, p.body)
	}
	e.ev.waitFrom(t, mark, "telemetry", func(ev broker.Event) bool { return ev.Kind == broker.EventTelemetry })
	msgs, err := e.srv.Broker().Telemetry(d.DeviceID)
	if err != nil || len(msgs) != 1 || string(msgs[0].Body) != `{"t":1}` ||
		msgs[0].SystemProperties["content-type"] != "application/json" ||
		msgs[0].SystemProperties["iothub-connection-device-id"] != d.DeviceID {
		t.Fatalf("telemetry: %+v %v", msgs, err)
	}

	if r := e.do("POST", "/hubsim/devices/dev-ws/messages/devicebound", []byte(`{"body":"over ws"}`), ""); r.status != 202 {
		t.Fatalf("send: %d %s", r.status, r.body)
	}
	pub := parsePublish(t, rc.mustRead())
	if string(pub.payload) != "over ws" || !strings.HasPrefix(pub.topic, "devices/dev-ws/messages/devicebound/") {
		t.Fatalf("c2d: %+v", pub)
	}
	mark = e.ev.mark()
	rc.send(pubackPkt(pub.pid))
	e.ev.waitFrom(t, mark, "c2d completed", func(ev broker.Event) bool { return ev.Kind == broker.EventC2DCompleted })

	// The same rules as the TLS listener: an unknown topic closes the connection.
	rc.send(publishPkt("devices/dev-ws/unknown", nil, 0, 0, false))
	rc.expectClosed()
}

// Node's MqttWs with HostName=host:port asks for /:port/$iothub/websocket; the C SDK offers the
// subprotocol in upper case and gets it back as it offered it.
func TestWebSocketPathAndSubprotocolForms(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-ws-forms")
	rc, resp := e.mustDialWS("/:8443/$iothub/websocket", []string{"MQTT"})
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != "MQTT" {
		t.Fatalf("negotiated subprotocol %q, want MQTT as offered", got)
	}
	if code := rc.connect(d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", e.token(d)); code != 0 {
		t.Fatalf("CONNACK %d", code)
	}

	// No mqtt subprotocol: refused before the upgrade.
	_, resp, err := e.dialWS("/$iothub/websocket", []string{"AMQPWSB10x"})
	if err == nil || resp == nil || resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("without mqtt subprotocol: %v %+v", err, resp)
	}
	// A plain GET on the path is not an upgrade.
	if r := e.do("GET", "/$iothub/websocket", nil, "none"); r.status != http.StatusBadRequest {
		t.Fatalf("plain GET: %d %s", r.status, r.body)
	}
}

func TestWebSocketRefusals(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-ws-bad")
	rc, _ := e.mustDialWS("/$iothub/websocket", []string{"mqtt"})
	mark := e.ev.mark()
	bad := deviceToken(t, e.host, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey, time.Now().Add(-time.Minute))
	if code := rc.connect(d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", bad); code != 5 {
		t.Fatalf("expired token: CONNACK %d, want 5", code)
	}
	ev := e.ev.waitFrom(t, mark, "refused", func(ev broker.Event) bool { return ev.Kind == broker.EventRefused })
	if !strings.Contains(ev.Reason, "expired") {
		t.Fatalf("refusal reason %q does not name the expiry", ev.Reason)
	}

	// MQTT 5: CONNACK 1 written over the WebSocket before it closes.
	rc, _ = e.mustDialWS("/$iothub/websocket", []string{"mqtt"})
	rc.send(connectPkt(5, d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", e.token(d), false))
	if p := rc.mustRead(); p.typ != 2 || len(p.body) < 2 || p.body[1] != 1 {
		t.Fatalf("MQTT 5: got type %d %x, want CONNACK 1", p.typ, p.body)
	}
	rc.expectClosed()

	// A text message is not MQTT: the connection closes and nothing is recorded.
	rc, _ = e.mustDialWS("/$iothub/websocket", []string{"mqtt"})
	if code := rc.connect(d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", e.token(d)); code != 0 {
		t.Fatalf("CONNACK %d", code)
	}
	mark = e.ev.mark()
	if err := rc.c.(*wsClient).WriteMessage(websocket.TextMessage, publishPkt("devices/dev-ws-bad/messages/events/", []byte("x"), 0, 0, false)); err != nil {
		t.Fatal(err)
	}
	rc.expectClosed()
	e.ev.waitFrom(t, mark, "disconnected", func(ev broker.Event) bool { return ev.Kind == broker.EventDisconnected })
	if msgs, _ := e.srv.Broker().Telemetry(d.DeviceID); len(msgs) != 0 {
		t.Fatalf("text message recorded as telemetry: %+v", msgs)
	}
}

// X.509 over WebSockets: the client certificate of the HTTPS connection authenticates.
func TestWebSocketX509(t *testing.T) {
	e := newEnv(t)
	cert, err := pki.SelfSigned(pki.LeafOptions{CommonName: "dev-ws-x509", Client: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.srv.Registry().Create(registry.Device{DeviceID: "dev-ws-x509", Authentication: registry.Authentication{
		Type: registry.AuthSelfSigned, X509Thumbprint: registry.X509Thumbprint{PrimaryThumbprint: pki.ThumbprintSHA256(cert.Leaf)}}}); err != nil {
		t.Fatal(err)
	}
	rc, _ := e.mustDialWS("/$iothub/websocket", []string{"mqtt"}, cert)
	if code := rc.connect("dev-ws-x509", e.host+"/dev-ws-x509/?api-version=2021-04-12", ""); code != 0 {
		t.Fatalf("CONNACK %d", code)
	}
	other, _ := pki.SelfSigned(pki.LeafOptions{CommonName: "dev-ws-x509", Client: true})
	rc2, _ := e.mustDialWS("/$iothub/websocket", []string{"mqtt"}, other)
	if code := rc2.connect("dev-ws-x509", e.host+"/dev-ws-x509/?api-version=2021-04-12", ""); code != 5 {
		t.Fatalf("unregistered certificate: CONNACK %d, want 5", code)
	}
	rc3, _ := e.mustDialWS("/$iothub/websocket", []string{"mqtt"})
	if code := rc3.connect("dev-ws-x509", e.host+"/dev-ws-x509/?api-version=2021-04-12", ""); code != 5 {
		t.Fatalf("no certificate: CONNACK %d, want 5", code)
	}
}

// A server closed with WebSocket devices connected closes them and leaks nothing (goleak in
// TestMain).
func TestWebSocketCloseWithDevices(t *testing.T) {
	e := newEnv(t)
	d := e.createSAS("dev-ws-close")
	rc, _ := e.mustDialWS("/$iothub/websocket", []string{"mqtt"})
	if code := rc.connect(d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", e.token(d)); code != 0 {
		t.Fatalf("CONNACK %d", code)
	}
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := rc.read()
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection not closed by Close: %v", err)
	}
}
