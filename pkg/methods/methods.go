// Package methods dispatches IoT Hub direct-method calls to handlers registered by name, with
// bounded concurrency, payload validation before any handler runs, a deadline on every call, and
// exactly one answer per call: a handler's status and payload, 400 for an invalid payload, 501
// for an unknown method, 500 for a handler that panics, 429 when too many calls are running, and
// no answer at all for a handler that overruns its deadline (the caller has given up by then;
// IoT Hub answers it 504).
//
// The package does no I/O of its own: the device session delivers calls and sends the answers
// (hub.Session.RespondMethod), so it can be tested, and reused, without a connection.
package methods

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime/debug"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Status codes the dispatcher answers with on its own.
const (
	StatusBadRequest      = 400
	StatusNotImplemented  = 501 // no handler for the method
	StatusInternalError   = 500 // the handler panicked or returned an invalid payload
	StatusTooManyRequests = 429 // MaxConcurrent calls already running
)

// DefaultTimeout is the deadline a handler gets when none is configured: IoT Hub's default
// response timeout. The device cannot see the caller's own timeout (it is not on the wire).
const DefaultTimeout = 30 * time.Second

// The log messages about answers that were not sent, which tests wait for.
const (
	// MsgOverran: the handler returned after its deadline; the hub has answered 504 already.
	MsgOverran = "direct method handler overran its deadline: not answered"
	// MsgAnswerNotSent: the answer could not be published (field "status", error).
	MsgAnswerNotSent = "direct method answer not sent"
)

// Request is one call as a handler sees it.
type Request struct {
	// Name is the method name.
	Name string
	// RequestID is the call's $rid (for logs; answering is the dispatcher's job).
	RequestID string
	// Payload is the validated JSON payload; "null" when the caller sent none.
	Payload json.RawMessage
}

// Response is a handler's answer. Payload must be valid JSON or empty.
type Response struct {
	Status  int
	Payload []byte
	// Then, if set, runs after the answer was sent (sendErr nil) or could not be sent, on the
	// call's goroutine: for work that must follow the answer, such as a reboot. It does not run
	// when the handler overran its deadline (no answer is sent then).
	Then func(sendErr error)
}

// Handler runs a method. ctx ends at the call's deadline and when the dispatcher closes.
type Handler interface {
	Handle(ctx context.Context, req *Request) Response
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, req *Request) Response

// Handle calls f.
func (f HandlerFunc) Handle(ctx context.Context, req *Request) Response { return f(ctx, req) }

// Responder sends the one answer to call rid.
type Responder func(ctx context.Context, rid string, status int, payload []byte) error

// Config configures a Dispatcher. The zero value works.
type Config struct {
	// MaxConcurrent bounds the calls running at once (default 8).
	MaxConcurrent int
	// Timeout is each call's deadline (default DefaultTimeout); Timeouts overrides it per
	// method.
	Timeout  time.Duration
	Timeouts map[string]time.Duration
	// MaxPayload and MaxDepth bound request payloads (defaults MaxPayload, MaxDepth).
	MaxPayload int
	MaxDepth   int
	// Logger receives one line per call (nil: none).
	Logger *zap.Logger
	// RespondNow, when set, sends a refusal (501, 400, 429) without blocking: it only queues
	// the answer or fails at once (hub.Session.RespondMethodAsync). Dispatch then refuses
	// through it directly; without it, refusals go through the Responder on a sender goroutine.
	RespondNow func(rid string, status int, payload []byte) error
}

// Dispatcher runs calls. Register handlers before the first call; it is safe for concurrent use.
type Dispatcher struct {
	cfg      Config
	log      *zap.Logger
	respond  Responder
	mu       sync.RWMutex
	handlers map[string]Handler
	sem      chan struct{}
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	// refusals (501, 400, 429) waiting to be sent, guarded by mu, and whether a sender
	// goroutine is draining them: it exists only while there are refusals to send.
	refusals []refusal
	refusing bool
}

// refusal is an answer the dispatcher gives on its own, without running a handler.
type refusal struct {
	log     *zap.Logger
	rid     string
	status  int
	payload []byte
}

// MaxQueuedRefusals bounds the refusals waiting to be sent. Beyond it a refusal is dropped
// (logged): the caller gets IoT Hub's 504 at its timeout instead, and a flood of bad calls
// cannot grow the device's memory.
const MaxQueuedRefusals = 64

// New makes a dispatcher that answers through respond.
func New(cfg Config, respond Responder) *Dispatcher {
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = 8
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	log := cfg.Logger
	if log == nil {
		log = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Dispatcher{cfg: cfg, log: log, respond: respond, handlers: map[string]Handler{},
		sem: make(chan struct{}, cfg.MaxConcurrent), ctx: ctx, cancel: cancel}
}

// Register sets the handler for a method name, replacing any earlier one.
func (d *Dispatcher) Register(name string, h Handler) {
	d.mu.Lock()
	d.handlers[name] = h
	d.mu.Unlock()
}

// Replace swaps part of the handler table in one step: the handlers named in remove go, those
// in add are registered (replacing any of the same name). A call dispatched after Replace sees
// only the new table; calls already running finish with the handler they started with.
func (d *Dispatcher) Replace(remove []string, add map[string]Handler) {
	d.mu.Lock()
	for _, n := range remove {
		delete(d.handlers, n)
	}
	for n, h := range add {
		d.handlers[n] = h
	}
	d.mu.Unlock()
}

// Dispatch starts a call and returns at once; the answer is sent from a goroutine the
// dispatcher owns. It never blocks on a handler or on sending an answer (refusals included), so
// it may be called from the session's delivery goroutine: a slow or lost connection never holds
// up the cloud-to-device messages and desired patches delivered after the call.
func (d *Dispatcher) Dispatch(name, rid string, payload []byte) {
	d.mu.RLock()
	h, ok := d.handlers[name]
	d.mu.RUnlock()
	log := d.log.With(zap.String("method", name), zap.String("rid", rid))
	if d.ctx.Err() != nil {
		log.Info("direct method dropped: dispatcher closed")
		return
	}
	if !ok {
		log.Info("direct method not implemented")
		d.refuse(log, rid, StatusNotImplemented, errorBody("method %q is not implemented", name))
		return
	}
	if err := ValidatePayload(payload, d.cfg.MaxPayload, d.cfg.MaxDepth); err != nil {
		log.Info("direct method payload refused", zap.Error(err))
		d.refuse(log, rid, StatusBadRequest, errorBody("%v", err))
		return
	}
	select {
	case d.sem <- struct{}{}:
	default:
		log.Warn("direct method refused: too many calls running", zap.Int("limit", cap(d.sem)))
		d.refuse(log, rid, StatusTooManyRequests, errorBody("too many method calls running"))
		return
	}
	timeout := d.cfg.Timeout
	if t, ok := d.cfg.Timeouts[name]; ok && t > 0 {
		timeout = t
	}
	if len(payload) == 0 {
		payload = []byte("null")
	}
	req := &Request{Name: name, RequestID: rid, Payload: json.RawMessage(payload)}
	d.mu.Lock() // orders Add against Close's Wait
	if d.ctx.Err() != nil {
		d.mu.Unlock()
		<-d.sem
		return
	}
	d.wg.Add(1)
	d.mu.Unlock()
	go func() {
		defer d.wg.Done()
		defer func() { <-d.sem }()
		ctx, cancel := context.WithTimeout(d.ctx, timeout)
		defer cancel()
		start := time.Now()
		resp, panicked := run(ctx, h, req)
		switch {
		case panicked != nil:
			log.Error("direct method handler panicked", zap.Any("panic", panicked), zap.ByteString("stack", debug.Stack()))
			resp = Response{Status: StatusInternalError, Payload: errorBody("the handler failed")}
		case ctx.Err() != nil:
			// Past the deadline the caller has its 504 already; an answer now would be ignored
			// by the hub at best.
			log.Warn(MsgOverran, zap.Duration("timeout", timeout),
				zap.Duration("took", time.Since(start)))
			return
		case len(resp.Payload) > 0 && !json.Valid(resp.Payload):
			log.Error("direct method handler returned invalid JSON")
			resp = Response{Status: StatusInternalError, Payload: errorBody("the handler returned an invalid payload")}
		}
		log.Info("direct method answered", zap.Int("status", resp.Status), zap.Duration("took", time.Since(start)))
		err := d.answer(log, rid, resp.Status, resp.Payload)
		if resp.Then != nil {
			resp.Then(err)
		}
	}()
}

func run(ctx context.Context, h Handler, req *Request) (resp Response, panicked any) {
	defer func() {
		if p := recover(); p != nil {
			panicked = p
		}
	}()
	return h.Handle(ctx, req), nil
}

// refuse sends a refusal through RespondNow, or queues it for the sender goroutine, starting
// it when none is running.
func (d *Dispatcher) refuse(log *zap.Logger, rid string, status int, payload []byte) {
	if d.cfg.RespondNow != nil {
		if err := d.cfg.RespondNow(rid, status, payload); err != nil {
			log.Warn(MsgAnswerNotSent, zap.Int("status", status), zap.Error(err))
		}
		return
	}
	d.mu.Lock()
	switch {
	case d.ctx.Err() != nil:
		d.mu.Unlock()
		log.Info("direct method refusal dropped: dispatcher closed", zap.Int("status", status))
		return
	case len(d.refusals) >= MaxQueuedRefusals:
		d.mu.Unlock()
		log.Warn("direct method refusal dropped: too many refusals waiting to be sent",
			zap.Int("status", status), zap.Int("limit", MaxQueuedRefusals))
		return
	}
	d.refusals = append(d.refusals, refusal{log: log, rid: rid, status: status, payload: payload})
	start := !d.refusing
	if start {
		d.refusing = true
		d.wg.Add(1) // under mu: ordered against Close's Wait
	}
	d.mu.Unlock()
	if start {
		go d.sendRefusals()
	}
}

// sendRefusals sends the queued refusals in order and exits when none is left (or the
// dispatcher closes), so an idle dispatcher runs no goroutine.
func (d *Dispatcher) sendRefusals() {
	defer d.wg.Done()
	for {
		d.mu.Lock()
		if len(d.refusals) == 0 || d.ctx.Err() != nil {
			n := len(d.refusals)
			d.refusals, d.refusing = nil, false
			d.mu.Unlock()
			if n > 0 {
				d.log.Info("direct method refusals dropped: dispatcher closed", zap.Int("count", n))
			}
			return
		}
		r := d.refusals[0]
		d.refusals[0] = refusal{}
		d.refusals = d.refusals[1:]
		d.mu.Unlock()
		_ = d.answer(r.log, r.rid, r.status, r.payload) // logged by answer
	}
}

func (d *Dispatcher) answer(log *zap.Logger, rid string, status int, payload []byte) error {
	ctx, cancel := context.WithTimeout(d.ctx, 30*time.Second)
	defer cancel()
	err := d.respond(ctx, rid, status, payload)
	if err != nil {
		log.Warn(MsgAnswerNotSent, zap.Error(err))
	}
	return err
}

// Close cancels running handlers' contexts and waits for them to return.
func (d *Dispatcher) Close() {
	d.mu.Lock()
	d.cancel()
	d.mu.Unlock()
	d.wg.Wait()
}

func errorBody(format string, args ...any) []byte {
	b, _ := json.Marshal(map[string]string{"message": fmt.Sprintf(format, args...)})
	return b
}
