// Package methods is hubsim's direct-method service: it delivers a call to the device's
// connection as $iothub/methods/POST/{name}/?$rid=, waits for the device's answer within the
// response timeout, and gives IoT Hub's results and errors: the device's status and payload,
// 404103 when the device is not connected (and subscribed) within the connect timeout, 504101
// when it does not answer in time. The first answer to a request completes it; later ones, and
// answers to requests that already timed out, are ignored and counted.
package methods

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Limits, as IoT Hub documents them.
const (
	MaxPayload             = 128 * 1024
	DefaultResponseTimeout = 30
	MinResponseTimeout     = 5
	MaxResponseTimeout     = 300
	MaxConnectTimeout      = 300
)

// Sender delivers requests to devices (the broker).
type Sender interface {
	SendMethodRequest(deviceID, method, rid string, payload []byte) error
	SubscriptionSignal() <-chan struct{}
}

// Request is the body of POST /twins/{id}/methods.
type Request struct {
	MethodName               string          `json:"methodName"`
	Payload                  json.RawMessage `json:"payload"`
	ResponseTimeoutInSeconds *int            `json:"responseTimeoutInSeconds"`
	ConnectTimeoutInSeconds  *int            `json:"connectTimeoutInSeconds"`
}

// Result is a completed call: the device's status and payload.
type Result struct {
	Status  int             `json:"status"`
	Payload json.RawMessage `json:"payload"`
}

// CallError is a call that did not complete; the REST layer renders it as IoT Hub does (a JSON
// document inside the error body's Message).
type CallError struct {
	Status  int
	Code    int
	Message string
	Timeout time.Duration
}

func (e *CallError) Error() string {
	return fmt.Sprintf("methods: %d %d: %s", e.Status, e.Code, e.Message)
}

// Validate checks a request and fills the defaults; errors are wire.ServiceError (400).
func (r *Request) Validate() error {
	if err := wire.ValidateMethodName(r.MethodName); err != nil {
		return wire.ErrArgumentInvalid.WithText("methodName: %v", err)
	}
	if r.ResponseTimeoutInSeconds == nil {
		v := DefaultResponseTimeout
		r.ResponseTimeoutInSeconds = &v
	}
	if v := *r.ResponseTimeoutInSeconds; v < MinResponseTimeout || v > MaxResponseTimeout {
		return wire.ErrArgumentInvalid.WithText("responseTimeoutInSeconds %d is outside %d to %d", v, MinResponseTimeout, MaxResponseTimeout)
	}
	if r.ConnectTimeoutInSeconds == nil {
		v := 0
		r.ConnectTimeoutInSeconds = &v
	}
	if v := *r.ConnectTimeoutInSeconds; v < 0 || v > MaxConnectTimeout {
		return wire.ErrArgumentInvalid.WithText("connectTimeoutInSeconds %d is outside 0 to %d", v, MaxConnectTimeout)
	}
	if len(r.Payload) > MaxPayload {
		return wire.ErrMessageTooLarge.WithText("method payload is %d bytes; the limit is %d", len(r.Payload), MaxPayload)
	}
	return nil
}

type pending struct {
	deviceID string
	answered bool        // guarded by Service.mu
	ch       chan Result // buffered 1: the first answer
}

// Service runs direct-method calls.
type Service struct {
	log    *zap.Logger
	sender atomic.Pointer[Sender]
	seq    atomic.Uint64

	mu      sync.Mutex
	pending map[string]*pending

	ignored atomic.Uint64
}

// New makes a Service; SetSender must be called before the first call.
func New(log *zap.Logger) *Service {
	if log == nil {
		log = zap.NewNop()
	}
	return &Service{log: log, pending: map[string]*pending{}}
}

// SetSender sets the broker that delivers requests.
func (s *Service) SetSender(snd Sender) { s.sender.Store(&snd) }

// Ignored is how many device answers were ignored: duplicates, late ones and unknown $rids.
func (s *Service) Ignored() uint64 { return s.ignored.Load() }

// Invoke calls method on the device and waits for its answer. req must be validated.
func (s *Service) Invoke(ctx context.Context, deviceID string, req Request) (Result, error) {
	sp := s.sender.Load()
	if sp == nil {
		return Result{}, errors.New("methods: no sender")
	}
	snd := *sp
	rid := strconv.FormatUint(s.seq.Add(1), 36)
	p := &pending{deviceID: deviceID, ch: make(chan Result, 1)}
	s.mu.Lock()
	s.pending[rid] = p
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.pending, rid)
		s.mu.Unlock()
	}()
	payload := []byte(req.Payload)
	if len(payload) == 0 {
		payload = []byte("null")
	}
	log := s.log.With(zap.String("device", deviceID), zap.String("method", req.MethodName), zap.String("rid", rid))

	connectTimeout := time.Duration(*req.ConnectTimeoutInSeconds) * time.Second
	connectDeadline := time.NewTimer(connectTimeout)
	defer connectDeadline.Stop()
	for {
		signal := snd.SubscriptionSignal()
		err := snd.SendMethodRequest(deviceID, req.MethodName, rid, payload)
		if err == nil {
			break
		}
		if !errors.Is(err, broker.ErrNotSubscribed) {
			return Result{}, fmt.Errorf("methods: deliver: %w", err)
		}
		select {
		case <-signal:
			continue
		case <-connectDeadline.C:
		case <-ctx.Done():
			return Result{}, ctx.Err()
		}
		log.Info("direct method: device not online", zap.Duration("connect_timeout", connectTimeout))
		return Result{}, &CallError{Status: 404, Code: 404103, Message: "Timed out waiting for device to connect.", Timeout: connectTimeout}
	}
	responseTimeout := time.Duration(*req.ResponseTimeoutInSeconds) * time.Second
	t := time.NewTimer(responseTimeout)
	defer t.Stop()
	select {
	case r := <-p.ch:
		log.Info("direct method answered", zap.Int("status", r.Status))
		return r, nil
	case <-t.C:
		log.Info("direct method timed out", zap.Duration("response_timeout", responseTimeout))
		return Result{}, &CallError{Status: 504, Code: 504101, Message: "Timed out waiting for the response from device."}
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

// MethodResponse takes a device's answer (broker.MethodResponseHandler).
func (s *Service) MethodResponse(c broker.Caller, rid string, status int, body []byte) {
	s.mu.Lock()
	p, ok := s.pending[rid]
	ok = ok && p.deviceID == c.DeviceID
	first := ok && !p.answered
	if first {
		p.answered = true
	}
	s.mu.Unlock()
	if !ok {
		s.ignored.Add(1)
		s.log.Debug("direct method answer ignored: no such call", zap.String("device", c.DeviceID), zap.String("rid", rid))
		return
	}
	payload := json.RawMessage("null")
	if len(body) > 0 {
		if json.Valid(body) {
			payload = append(json.RawMessage(nil), body...)
		} else {
			payload, _ = json.Marshal(string(body)) // not JSON: passed on as a string
		}
	}
	if !first {
		s.ignored.Add(1) // a second answer to the same call
		s.log.Debug("direct method answer ignored: already answered", zap.String("device", c.DeviceID), zap.String("rid", rid))
		return
	}
	p.ch <- Result{Status: status, Payload: payload} // buffered 1; only the first answer gets here
}
