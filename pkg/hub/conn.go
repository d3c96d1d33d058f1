package hub

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/iothubby/iothubby/internal/mqttc"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// cleanQuiesce is how long a clean disconnect waits for DISCONNECT to be written (paho returns
// as soon as it is).
const cleanQuiesce = 1000

// errConnClosed is a connection's Err after it was closed on purpose.
var errConnClosed = errors.New("hub: connection closed")

// conn is one MQTT connection and nothing more: it owns its net.Conn and a fresh paho client (so
// nothing, message ids, tokens or stored publishes, leaks from one connection into the next),
// reports its end through Done and Err, and keeps the direct-method requests it delivered, since
// a method is answered only on the connection that received it. It knows nothing of the session
// that uses it: inbound messages go to the handler it was dialled with.
type conn struct {
	client    mqttClient
	onMessage func(*conn, paho.Message)
	onEnd     func() // called once the connection has ended (after done is closed); may be nil

	// SAS token expiry and the time to renew it; zero for X.509. Set before dial returns.
	expiry  time.Time
	renewAt time.Time

	// draining is set by the supervisor when the connection is being retired for a token
	// renewal: new twin requests wait for the next connection.
	draining atomic.Bool

	done     chan struct{}
	doneOnce sync.Once
	err      error // written before done is closed

	netMu   sync.Mutex
	netConn net.Conn
	dialErr error

	mu sync.Mutex
	// methods are the $rids of method requests delivered and not yet answered; nil once the
	// connection has ended.
	methods map[string]struct{}
	// answered remembers the last maxPendingMethods $rids answered on this connection, so a
	// request delivered again after its answer is not answered twice.
	answered    map[string]struct{}
	answeredFIF []string
	// responses are method answers waiting for the supervisor to publish them.
	responses []*methodResponse
}

// methodResponse is one direct-method answer handed to the supervisor, which publishes it on
// the connection that received the request.
type methodResponse struct {
	topic   string
	payload []byte
	// tok, when not nil (cap 1), receives the publish token, so a waiting RespondMethod can
	// see the write complete; RespondMethodAsync leaves it nil.
	tok chan paho.Token
}

// mqttClient is what a connection uses of its MQTT client: paho's, or the lean one
// (internal/mqttc, Config.LeanMQTT) that costs one goroutine per connection instead of ten.
type mqttClient interface {
	Publish(topic string, qos byte, retained bool, payload interface{}) paho.Token
	SubscribeMultiple(filters map[string]byte, callback paho.MessageHandler) paho.Token
	Disconnect(quiesce uint)
}

// dialParams is what dial needs; the session fills it in.
type dialParams struct {
	cfg     *Config
	tlsConf *tls.Config
	now     time.Time // the clock's time, for the SAS token's expiry and renewal
	// onMessage handles every inbound publish on paho's router goroutine; it must not block.
	onMessage func(*conn, paho.Message)
	// onEnd is called when the connection has ended; it must not block.
	onEnd func()
}

// dial opens one connection: SAS token, TCP, TLS and CONNECT/CONNACK. Cancelling ctx abandons
// the attempt. It does not subscribe.
func dial(ctx context.Context, p dialParams) (*conn, error) {
	cfg := p.cfg
	c := &conn{done: make(chan struct{}), methods: make(map[string]struct{}), onMessage: p.onMessage, onEnd: p.onEnd}
	var password string
	if cfg.Signer != nil {
		now := p.now
		// Round the expiry up to a whole second (se has second precision), so the token lives at
		// least TokenTTL, and plan the renewal on the lifetime actually granted.
		expiry := now.Add(cfg.TokenTTL).Truncate(time.Second)
		if expiry.Before(now.Add(cfg.TokenTTL)) {
			expiry = expiry.Add(time.Second)
		}
		sctx, cancel := context.WithTimeout(ctx, cfg.OperationTimeout)
		token, err := sas.Build(sctx, cfg.Signer, sas.Params{Resource: cfg.Resource(), KeyName: cfg.KeyName, Expiry: expiry})
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return nil, errAborted
			}
			return nil, fmt.Errorf("hub: build SAS token: %w", err)
		}
		password = token
		c.expiry = expiry
		c.renewAt = now.Add(time.Duration(cfg.RenewAt * float64(expiry.Sub(now))))
	}
	if cfg.LeanMQTT {
		return c.dialLean(ctx, cfg, p.tlsConf, password)
	}
	opts := paho.NewClientOptions()
	opts.AddBroker("ssl://" + cfg.Address)
	opts.SetClientID(cfg.ClientID())
	opts.SetUsername(cfg.Username())
	if password != "" {
		opts.SetPassword(password)
	}
	opts.SetCleanSession(false)
	opts.SetAutoReconnect(false)
	opts.SetConnectRetry(false)
	opts.SetResumeSubs(false)
	opts.SetProtocolVersion(4) // explicit: no silent fallback to MQTT 3.1 after a refusal
	opts.SetKeepAlive(cfg.KeepAlive)
	opts.SetPingTimeout(cfg.pingTimeout())
	opts.SetConnectTimeout(cfg.OperationTimeout)
	opts.SetWriteTimeout(cfg.OperationTimeout)
	opts.SetOrderMatters(true) // handlers run inline in paho's router; ours never block
	opts.SetAutoAckDisabled(true)
	opts.SetDefaultPublishHandler(c.deliver)
	opts.SetConnectionLostHandler(c.lost)
	dialCtx, dialCancel := context.WithTimeout(ctx, cfg.OperationTimeout)
	defer dialCancel()
	// paho keeps this function for the client's life; openCtx is cleared once the connect is
	// over, so the dial's contexts are not kept with it.
	openCtx, tlsConf := dialCtx, p.tlsConf
	opts.SetCustomOpenConnectionFn(func(*url.URL, paho.ClientOptions) (net.Conn, error) {
		return c.open(openCtx, cfg, tlsConf)
	})
	pc := paho.NewClient(opts)
	c.client = pc

	tok := pc.Connect()
	defer func() {
		<-tok.Done()
		openCtx = nil
	}()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		// Abandon the attempt: unblock a dial or handshake in progress, then wait for paho.
		dialCancel()
		c.closeNet()
		<-tok.Done()
		if tok.Error() == nil {
			c.client.Disconnect(0)
		}
		return nil, errAborted
	}
	if err := tok.Error(); err != nil {
		var code byte
		if ct, _ := tok.(*paho.ConnectToken); ct != nil {
			code = ct.ReturnCode()
		}
		return nil, c.connectError(code, err)
	}
	return c, nil
}

// connectError is the error of a failed connect: a CONNACK refusal (code 1-5) as a
// *ConnackError, else the dial's or TLS handshake's own error when there was one, else err.
func (c *conn) connectError(code byte, err error) error {
	if code >= 1 && code <= 5 {
		return &ConnackError{Code: code}
	}
	if derr := c.dialError(); derr != nil {
		return derr
	}
	return fmt.Errorf("hub: connect: %w", err)
}

// dialLean opens the connection with the lean client (internal/mqttc): TCP, TLS and
// CONNECT/CONNACK within the operation timeout, with the same errors as paho's path.
func (c *conn) dialLean(ctx context.Context, cfg *Config, tlsConf *tls.Config, password string) (*conn, error) {
	dialCtx, cancel := context.WithTimeout(ctx, cfg.OperationTimeout)
	defer cancel()
	client, err := mqttc.Connect(dialCtx, mqttc.Options{
		Dial:         func(ctx context.Context) (net.Conn, error) { return c.open(ctx, cfg, tlsConf) },
		ClientID:     cfg.ClientID(),
		Username:     cfg.Username(),
		Password:     password,
		KeepAlive:    cfg.KeepAlive,
		PingTimeout:  cfg.pingTimeout(),
		WriteTimeout: cfg.OperationTimeout,
		OnMessage:    func(m paho.Message) { c.onMessage(c, m) },
		OnLost:       c.connLost,
	})
	if err != nil {
		var refused *mqttc.RefusedError
		switch {
		case errors.As(err, &refused):
			return nil, c.connectError(refused.Code, err)
		case ctx.Err() != nil:
			return nil, errAborted
		}
		return nil, c.connectError(0, err)
	}
	c.client = client
	return c, nil
}

// deliver is paho's handler for every inbound publish (on paho's router goroutine).
func (c *conn) deliver(_ paho.Client, m paho.Message) { c.onMessage(c, m) }

// lost is paho's connection-lost callback.
func (c *conn) lost(_ paho.Client, err error) { c.connLost(err) }

// connLost ends the connection lost for err (either client's callback).
func (c *conn) connLost(err error) { c.end(fmt.Errorf("hub: connection lost: %w", err)) }

// subscribe sends one SUBSCRIBE for every topic the session needs: twin responses, desired
// properties, methods and, for a device, cloud-to-device messages.
func (c *conn) subscribe(cfg *Config) paho.Token {
	filters := map[string]byte{
		wire.TwinResponseFilter: 0,
		wire.TwinDesiredFilter:  0,
		wire.MethodsFilter:      0,
	}
	if cfg.ModuleID == "" {
		filters[wire.C2DFilter(cfg.DeviceID)] = 1
	}
	return c.client.SubscribeMultiple(filters, nil)
}

// subackError returns the SUBSCRIBE's failure, including a refused filter.
func subackError(st paho.Token) error {
	if err := st.Error(); err != nil {
		return err
	}
	var result map[string]byte
	switch stok := st.(type) {
	case *paho.SubscribeToken:
		result = stok.Result()
	case *mqttc.SubscribeToken:
		result = stok.Result()
	}
	for f, code := range result {
		if code == 0x80 {
			return fmt.Errorf("hub: subscription to %s refused", f)
		}
	}
	return nil
}

// Done is closed when the connection has ended: lost, or closed by close.
func (c *conn) Done() <-chan struct{} { return c.done }

// Err returns why the connection ended (nil while it is up).
func (c *conn) Err() error {
	select {
	case <-c.done:
		return c.err
	default:
		return nil
	}
}

// end records the connection's end once, forgets its method requests and calls onEnd.
func (c *conn) end(err error) {
	c.doneOnce.Do(func() {
		c.err = err
		c.mu.Lock()
		c.methods = nil
		c.mu.Unlock()
		close(c.done)
		if c.onEnd != nil {
			c.onEnd()
		}
	})
}

// close disconnects (waiting up to quiesce ms for DISCONNECT to be written; 0 for an abrupt
// close) unless the connection is already gone, and ends it.
func (c *conn) close(quiesce uint) {
	select {
	case <-c.done:
	default:
		c.client.Disconnect(quiesce)
	}
	c.end(errConnClosed)
}

// open dials TCP and completes the TLS handshake, and for mqtt-ws the WebSocket upgrade
// (paho's CustomOpenConnectionFn).
func (c *conn) open(ctx context.Context, cfg *Config, tlsConf *tls.Config) (net.Conn, error) {
	dial := cfg.Dial
	if cfg.Transport == TransportMQTTWS {
		dial = func(ctx context.Context, _, addr string) (net.Conn, error) { return cfg.dialTunnel(ctx, addr) }
	}
	raw, err := dial(ctx, "tcp", cfg.Address)
	if err != nil {
		err = &dialError{fmt.Errorf("hub: dial %s: %w", cfg.Address, err)}
		c.setDialErr(err)
		return nil, err
	}
	tc := tls.Client(raw, tlsConf)
	c.netMu.Lock()
	c.netConn = tc
	c.netMu.Unlock()
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		if isVerifyError(err) {
			err = fmt.Errorf("%w for %q (check the CA file and host name): %w", ErrTLSVerify, cfg.ServerName, err)
		} else {
			err = fmt.Errorf("hub: TLS handshake with %s: %w", cfg.Address, err)
		}
		c.setDialErr(err)
		return nil, err
	}
	if cfg.Transport == TransportMQTTWS {
		ws, err := cfg.upgradeWS(ctx, tc)
		if err != nil {
			_ = raw.Close()
			err = &dialError{fmt.Errorf("hub: %w", err)}
			c.setDialErr(err)
			return nil, err
		}
		return ws, nil
	}
	return tc, nil
}

func isVerifyError(err error) bool {
	var (
		cve *tls.CertificateVerificationError
		ua  x509.UnknownAuthorityError
		he  x509.HostnameError
		ci  x509.CertificateInvalidError
	)
	return errors.As(err, &cve) || errors.As(err, &ua) || errors.As(err, &he) || errors.As(err, &ci)
}

func (c *conn) setDialErr(err error) {
	c.netMu.Lock()
	c.dialErr = err
	c.netMu.Unlock()
}

func (c *conn) dialError() error {
	c.netMu.Lock()
	defer c.netMu.Unlock()
	return c.dialErr
}

func (c *conn) closeNet() {
	c.netMu.Lock()
	defer c.netMu.Unlock()
	if c.netConn != nil {
		_ = c.netConn.Close()
	}
}

// methodOutcome is what takeMethod decided about an inbound method request.
type methodOutcome uint8

const (
	methodTaken methodOutcome = iota
	methodConnEnded
	methodDuplicate
	methodTooMany
)

// takeMethod records a delivered method request as awaiting its answer.
func (c *conn) takeMethod(rid string) methodOutcome {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.methods == nil {
		return methodConnEnded
	}
	if _, dup := c.methods[rid]; dup {
		return methodDuplicate
	}
	if _, done := c.answered[rid]; done {
		return methodDuplicate
	}
	if len(c.methods) >= maxPendingMethods {
		return methodTooMany
	}
	c.methods[rid] = struct{}{}
	return methodTaken
}

// forgetMethod drops a method request that could not be handed to its handler.
func (c *conn) forgetMethod(rid string) {
	c.mu.Lock()
	delete(c.methods, rid)
	c.mu.Unlock()
}

// answerMethod claims request rid for r and queues r for publishing. It fails when rid is not
// awaiting an answer on this connection (never delivered, answered already, or the connection
// has ended).
func (c *conn) answerMethod(rid string, r *methodResponse) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.methods[rid]; !ok {
		return false
	}
	delete(c.methods, rid)
	if c.answered == nil {
		c.answered = make(map[string]struct{})
	}
	c.answered[rid] = struct{}{}
	c.answeredFIF = append(c.answeredFIF, rid)
	if len(c.answeredFIF) > maxPendingMethods {
		delete(c.answered, c.answeredFIF[0])
		c.answeredFIF = c.answeredFIF[1:]
	}
	c.responses = append(c.responses, r)
	return true
}

// takeResponses returns the method answers waiting to be published.
func (c *conn) takeResponses() []*methodResponse {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.responses
	c.responses = nil
	return r
}

// methodsPending reports whether a method request awaits its answer or its answer awaits
// publishing.
func (c *conn) methodsPending() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.methods) > 0 || len(c.responses) > 0
}
