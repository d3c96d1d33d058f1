package broker

import (
	"crypto/tls"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/internal/wsstream"
)

// WebSocketPath is the path IoT Hub serves MQTT over WebSockets on. Clients that put a port in
// the host name (Node's MqttWs builds wss://host:port:443/...) end up asking for
// "/:port/$iothub/websocket", so IsWebSocketPath accepts any path ending in it.
const WebSocketPath = "/$iothub/websocket"

// WebSocketSubprotocol is the subprotocol MQTT clients offer (the C SDK offers "MQTT").
const WebSocketSubprotocol = "mqtt"

// maxWSMessage bounds one WebSocket message from a device. MQTT clients send one packet per
// message; a message may also carry several packets, each within maxPacketSize.
const maxWSMessage = 2 * maxPacketSize

// IsWebSocketPath reports whether an HTTPS request path is the device WebSocket endpoint.
func IsWebSocketPath(path string) bool { return strings.HasSuffix(path, WebSocketPath) }

// ServeWebSocket upgrades an HTTPS request on the WebSocket path to a WebSocket carrying MQTT
// and serves it exactly as a connection to the TLS listener: the same CONNECT check,
// authentication (SAS or the client certificate of the HTTPS connection), topic rules and
// limits. It returns once the connection is handed over; the broker owns it from then on.
func (b *Broker) ServeWebSocket(w http.ResponseWriter, r *http.Request) {
	proto := ""
	for _, p := range websocket.Subprotocols(r) {
		if strings.EqualFold(p, WebSocketSubprotocol) {
			proto = p // echoed as the client offered it
			break
		}
	}
	if !websocket.IsWebSocketUpgrade(r) {
		http.Error(w, "this endpoint serves MQTT over WebSockets only", http.StatusBadRequest)
		return
	}
	if proto == "" {
		b.log.Info("WebSocket refused: no mqtt subprotocol offered", zap.String("remote", r.RemoteAddr),
			zap.Strings("offered", websocket.Subprotocols(r)))
		http.Error(w, `WebSocket subprotocol "mqtt" required`, http.StatusBadRequest)
		return
	}
	var cs tls.ConnectionState
	if r.TLS != nil {
		cs = *r.TLS
	}
	up := websocket.Upgrader{
		HandshakeTimeout: b.cfg.ConnectTimeout,
		CheckOrigin:      func(*http.Request) bool { return true }, // devices, not browsers
		ReadBufferSize:   4096,
		WriteBufferSize:  4096,
	}
	c, err := up.Upgrade(w, r, http.Header{"Sec-WebSocket-Protocol": {proto}})
	if err != nil {
		b.log.Debug("WebSocket upgrade failed", zap.String("remote", r.RemoteAddr), zap.Error(err))
		return // Upgrade has answered
	}
	c.SetReadLimit(maxWSMessage)
	raw := c.NetConn()
	if tc, ok := raw.(*tls.Conn); ok {
		// Close the TCP connection, not TLS (no close_notify to a peer that may not read).
		raw = tc.NetConn()
	}
	_ = raw.SetDeadline(time.Now().Add(b.cfg.ConnectTimeout))
	b.serve(newDevConnOver(b, raw, &wsStream{Stream: wsstream.New(c), c: c, raw: raw, cs: cs}))
}

// wsStream carries an MQTT byte stream in binary WebSocket messages (internal/wsstream) over the
// HTTPS connection raw.
type wsStream struct {
	*wsstream.Stream
	c   *websocket.Conn
	raw net.Conn
	cs  tls.ConnectionState
}

// CloseWrite sends a WebSocket close frame.
func (s *wsStream) CloseWrite() error {
	return s.c.WriteControl(websocket.CloseMessage,
		websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
}

// Close closes the TCP connection.
func (s *wsStream) Close() error                       { return s.raw.Close() }
func (s *wsStream) LocalAddr() net.Addr                { return s.raw.LocalAddr() }
func (s *wsStream) RemoteAddr() net.Addr               { return s.raw.RemoteAddr() }
func (s *wsStream) SetDeadline(t time.Time) error      { return s.raw.SetDeadline(t) }
func (s *wsStream) SetReadDeadline(t time.Time) error  { return s.raw.SetReadDeadline(t) }
func (s *wsStream) SetWriteDeadline(t time.Time) error { return s.raw.SetWriteDeadline(t) }

// ConnectionState is the TLS state of the HTTPS connection the WebSocket runs over.
func (s *wsStream) ConnectionState() tls.ConnectionState { return s.cs }

// transport names how the session's device is connected (ConnectionInfo.Transport).
func (s *session) transport() string {
	if s.dc.ws {
		return "mqtt-ws"
	}
	return "mqtt"
}
