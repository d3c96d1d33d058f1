package hub

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/gorilla/websocket"
	"golang.org/x/net/http/httpproxy"

	"github.com/iothubby/iothubby/internal/wsstream"
)

// Transports (Config.Transport).
const (
	// TransportMQTT is MQTT over TLS, port 8883.
	TransportMQTT = "mqtt"
	// TransportMQTTWS is MQTT over a WebSocket (wss://host/$iothub/websocket, subprotocol mqtt)
	// on port 443, for networks that only let HTTPS out; it may go through an HTTP CONNECT proxy.
	TransportMQTTWS = "mqtt-ws"
)

// DefaultWSPort is the port of TransportMQTTWS.
const DefaultWSPort = 443

// wsPath is where IoT Hub serves MQTT over WebSockets.
const wsPath = "/$iothub/websocket"

// ProxyFromEnvironment picks the proxy for a mqtt-ws connection from HTTPS_PROXY and NO_PROXY
// (and their lower-case forms), read when it is called, with the usual rules: NO_PROXY lists
// hosts, domains (".example.com" or "example.com" cover subdomains), IP addresses and CIDR ranges,
// or "*"; localhost and loopback addresses are never proxied.
func ProxyFromEnvironment() func(*url.URL) (*url.URL, error) {
	return httpproxy.FromEnvironment().ProxyFunc()
}

// dialTunnel opens a TCP connection to addr, through the HTTP CONNECT proxy that c.Proxy names
// for https://addr, if any. A proxy answering anything but 2xx fails the dial with its status.
func (c *Config) dialTunnel(ctx context.Context, addr string) (net.Conn, error) {
	var proxy *url.URL
	if c.Proxy != nil {
		p, err := c.Proxy(&url.URL{Scheme: "https", Host: addr})
		if err != nil {
			return nil, fmt.Errorf("proxy: %w", err)
		}
		proxy = p
	}
	if proxy == nil {
		return c.Dial(ctx, "tcp", addr)
	}
	if proxy.Scheme != "http" && proxy.Scheme != "" {
		return nil, fmt.Errorf("proxy %s: only http:// proxies (HTTP CONNECT) are supported", proxy.Redacted())
	}
	paddr := proxy.Host
	if proxy.Port() == "" {
		paddr = net.JoinHostPort(proxy.Hostname(), "80")
	}
	conn, err := c.Dial(ctx, "tcp", paddr)
	if err != nil {
		return nil, fmt.Errorf("proxy %s: %w", paddr, err)
	}
	if err := connectTunnel(ctx, conn, proxy, addr); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("proxy %s: %w", paddr, err)
	}
	return conn, nil
}

// maxProxyResponse bounds the proxy's CONNECT response headers.
const maxProxyResponse = 64 * 1024

// connectTunnel asks the proxy on conn for a tunnel to addr and reads its answer, within ctx.
func connectTunnel(ctx context.Context, conn net.Conn, proxy *url.URL, addr string) error {
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if d, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(d)
	}
	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Opaque: addr},
		Host:   addr,
		Header: http.Header{},
	}
	if u := proxy.User; u != nil {
		pw, _ := u.Password()
		req.Header.Set("Proxy-Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(u.Username()+":"+pw)))
	}
	if err := req.Write(conn); err != nil {
		return fmt.Errorf("CONNECT %s: %w", addr, ctxErr(ctx, err))
	}
	// The answer is read a byte at a time, so nothing of the tunnelled stream is buffered away.
	br := bufio.NewReaderSize(&byteReader{r: io.LimitReader(conn, maxProxyResponse)}, 16)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return fmt.Errorf("CONNECT %s: reading the answer: %w", addr, ctxErr(ctx, err))
	}
	// resp.Body is left alone: for a 2xx it would be the tunnel itself (a CONNECT answer has no
	// length), and a refused connection is closed.
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("CONNECT %s refused: %s", addr, resp.Status)
	}
	if br.Buffered() > 0 {
		return fmt.Errorf("CONNECT %s: proxy sent data before the tunnel opened", addr)
	}
	return conn.SetDeadline(time.Time{})
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// byteReader reads one byte per call, so a bufio.Reader over it never reads ahead.
type byteReader struct{ r io.Reader }

func (b *byteReader) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1]
	}
	return b.r.Read(p)
}

// wsURL is the WebSocket URL of the hub: its host name, and the port of Address unless 443.
func (c *Config) wsURL() string {
	host := c.ServerName
	if _, port, err := net.SplitHostPort(c.Address); err == nil && port != fmt.Sprint(DefaultWSPort) {
		host = net.JoinHostPort(host, port)
	}
	return (&url.URL{Scheme: "wss", Host: host, Path: wsPath}).String()
}

// upgradeWS runs the WebSocket handshake over tc (TLS done) and returns the MQTT byte stream.
func (c *Config) upgradeWS(ctx context.Context, tc *tls.Conn) (net.Conn, error) {
	d := websocket.Dialer{
		NetDialTLSContext: func(context.Context, string, string) (net.Conn, error) { return tc, nil },
		Subprotocols:      []string{"mqtt"},
		ReadBufferSize:    4096,
		WriteBufferSize:   4096,
	}
	u := c.wsURL()
	ws, resp, err := d.DialContext(ctx, u, nil)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("WebSocket upgrade at %s: %s", u, resp.Status)
		}
		return nil, fmt.Errorf("WebSocket upgrade at %s: %w", u, err)
	}
	if ws.Subprotocol() != "mqtt" {
		_ = ws.Close()
		return nil, fmt.Errorf("WebSocket upgrade at %s: server chose subprotocol %q, not mqtt", u, ws.Subprotocol())
	}
	return &wsConn{Stream: wsstream.New(ws), ws: ws}, nil
}

// wsConn is an MQTT byte stream over binary WebSocket messages (internal/wsstream), as a
// net.Conn for paho.
type wsConn struct {
	*wsstream.Stream
	ws *websocket.Conn
}

func (c *wsConn) Close() error                       { return c.ws.Close() }
func (c *wsConn) LocalAddr() net.Addr                { return c.ws.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr               { return c.ws.RemoteAddr() }
func (c *wsConn) SetDeadline(t time.Time) error      { return c.ws.NetConn().SetDeadline(t) }
func (c *wsConn) SetReadDeadline(t time.Time) error  { return c.ws.NetConn().SetReadDeadline(t) }
func (c *wsConn) SetWriteDeadline(t time.Time) error { return c.ws.NetConn().SetWriteDeadline(t) }
