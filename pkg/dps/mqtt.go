package dps

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/iothubby/iothubby/pkg/wire"
)

// mqttTransport is one DPS MQTT connection. Replies arrive on paho's goroutine and are handed
// over without blocking to the request waiting for their $rid.
type mqttTransport struct {
	cfg    *Config
	client paho.Client
	rid    atomic.Uint64

	mu      sync.Mutex
	waiting map[string]chan exchange
	lost    chan struct{}
	once    sync.Once
}

func dialMQTT(ctx context.Context, cfg *Config) (*mqttTransport, error) {
	_, addr := cfg.endpointHostPort()
	tok, err := cfg.token(ctx)
	if err != nil {
		return nil, err
	}
	t := &mqttTransport{cfg: cfg, waiting: map[string]chan exchange{}, lost: make(chan struct{})}
	opts := paho.NewClientOptions().
		AddBroker("tls://" + addr).
		SetClientID(cfg.RegistrationID).
		SetUsername(wire.DPSUsernameString(cfg.IDScope, cfg.RegistrationID, cfg.ClientVersion)).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetProtocolVersion(4).
		SetTLSConfig(cfg.tlsConfig()).
		SetConnectTimeout(cfg.RequestTimeout).
		SetOrderMatters(false).
		SetConnectionLostHandler(func(paho.Client, error) { t.once.Do(func() { close(t.lost) }) })
	if tok != "" {
		opts.SetPassword(tok)
	}
	t.client = paho.NewClient(opts)
	ct := t.client.Connect()
	if err := waitToken(ctx, ct); err != nil {
		var code byte
		if cr, ok := ct.(*paho.ConnectToken); ok {
			code = cr.ReturnCode()
		}
		if code == 5 || code == 4 {
			return nil, fmt.Errorf("%w: DPS refused the connection (CONNACK %d: not authorized)", ErrRefused, code)
		}
		return nil, fmt.Errorf("connect %s: %w", addr, err)
	}
	st := t.client.Subscribe(wire.DPSResponseFilter, 1, t.onMessage)
	if err := waitToken(ctx, st); err != nil {
		t.close()
		return nil, fmt.Errorf("subscribe: %w", err)
	}
	return t, nil
}

func waitToken(ctx context.Context, tok paho.Token) error {
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// onMessage runs on paho's goroutine: it never blocks.
func (t *mqttTransport) onMessage(_ paho.Client, m paho.Message) {
	tp, err := wire.ParseDPSTopic(m.Topic())
	if err != nil || tp.Kind != wire.DPSResponse {
		return
	}
	t.mu.Lock()
	ch := t.waiting[tp.RequestID]
	delete(t.waiting, tp.RequestID)
	t.mu.Unlock()
	if ch == nil {
		return
	}
	ch <- exchange{status: tp.Status, retryAfter: tp.RetryAfter, hasRA: tp.HasRetryAfter, body: append([]byte(nil), m.Payload()...)}
}

func (t *mqttTransport) do(ctx context.Context, topicFor func(rid string) string, body []byte) (exchange, error) {
	rid := strconv.FormatUint(t.rid.Add(1), 10)
	ch := make(chan exchange, 1)
	t.mu.Lock()
	t.waiting[rid] = ch
	t.mu.Unlock()
	defer func() {
		t.mu.Lock()
		delete(t.waiting, rid)
		t.mu.Unlock()
	}()
	ctx, cancel := context.WithTimeout(ctx, t.cfg.RequestTimeout)
	defer cancel()
	if err := waitToken(ctx, t.client.Publish(topicFor(rid), 1, false, body)); err != nil {
		return exchange{}, fmt.Errorf("publish: %w", err)
	}
	select {
	case ex := <-ch:
		return ex, nil
	case <-t.lost:
		return exchange{}, errors.New("connection lost")
	case <-ctx.Done():
		return exchange{}, fmt.Errorf("waiting for the reply: %w", ctx.Err())
	}
}

func (t *mqttTransport) register(ctx context.Context, body []byte) (exchange, error) {
	return t.do(ctx, wire.DPSRegisterTopic, body)
}

func (t *mqttTransport) poll(ctx context.Context, op string) (exchange, error) {
	return t.do(ctx, func(rid string) string { return wire.DPSPollTopic(rid, op) }, []byte(" "))
}

// close sends DISCONNECT (DPS sessions are clean: no UNSUBSCRIBE round trip is needed).
func (t *mqttTransport) close() { t.client.Disconnect(250) }
