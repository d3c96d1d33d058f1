package agent

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/methods"
	"github.com/iothubby/iothubby/pkg/wire"
)

// checkMethods validates the method settings and builds the scripted handlers.
func (c *Config) checkMethods(dps bool) (map[string]methods.Handler, error) {
	if c.MethodTimeout < 0 || c.MaxConcurrentMethods < 0 {
		return nil, fmt.Errorf("%w: methodTimeout and maxConcurrentMethods must not be negative", ErrConfig)
	}
	out := make(map[string]methods.Handler, len(c.Methods))
	for name, s := range c.Methods {
		if err := wire.ValidateMethodName(name); err != nil {
			return nil, fmt.Errorf("%w: methods.%s: %w", ErrConfig, name, err)
		}
		if name == "reprovision" && dps {
			return nil, fmt.Errorf("%w: methods.reprovision: the name is the built-in DPS method", ErrConfig)
		}
		if name == "reboot" && c.Reboot.Mode != "" {
			return nil, fmt.Errorf("%w: methods.reboot: the name is the built-in reboot method (reboot.mode is set)", ErrConfig)
		}
		h, err := s.Handler(nil)
		if err != nil {
			return nil, fmt.Errorf("%w: methods.%s: %w", ErrConfig, name, err)
		}
		out[name] = h
	}
	return out, nil
}

// sessionResponder answers through the session that delivered each call
// (hub.Session.RespondMethod refuses a $rid from an earlier connection).
func sessionResponder(sess *atomic.Pointer[hub.Session]) methods.Responder {
	return func(ctx context.Context, rid string, status int, payload []byte) error {
		s := sess.Load()
		if s == nil {
			return hub.ErrClosed
		}
		return s.RespondMethod(ctx, rid, status, payload)
	}
}

// sessionRefuser sends refusals through the session without waiting
// (hub.Session.RespondMethodAsync): they are sent from the goroutine that delivers C2D messages
// and desired patches.
func sessionRefuser(sess *atomic.Pointer[hub.Session]) func(rid string, status int, payload []byte) error {
	return func(rid string, status int, payload []byte) error {
		s := sess.Load()
		if s == nil {
			return hub.ErrClosed
		}
		return s.RespondMethodAsync(rid, status, payload)
	}
}

// newDispatcher builds one session's method dispatcher: the scripted methods and the built-in
// ones, answering through respond, and refusing through refuseNow when it is set (it must not
// block) or else through respond on the dispatcher's sender goroutine.
func (d *Device) newDispatcher(respond methods.Responder, refuseNow func(string, int, []byte) error, requestReprovision, requestSimulatedReboot func()) *methods.Dispatcher {
	disp := methods.New(methods.Config{
		MaxConcurrent: d.cfg.MaxConcurrentMethods,
		Timeout:       d.cfg.MethodTimeout,
		Logger:        d.log.Named("methods"),
		RespondNow:    refuseNow,
	}, respond)
	d.behaviourMu.Lock() // a reload swaps the scripts in the running session's dispatcher
	for name, h := range d.scripts {
		disp.Register(name, h)
	}
	d.disp = disp
	d.behaviourMu.Unlock()
	if d.fw != nil {
		disp.Register("firmwareUpdate", d.firmwareMethod(d.fw))
	}
	if d.cfg.Reboot.Mode != "" {
		disp.Register("reboot", d.reboot.handler(requestSimulatedReboot))
	}
	if d.dpsEnabled() {
		disp.Register("reprovision", methods.HandlerFunc(func(_ context.Context, r *methods.Request) methods.Response {
			d.log.Info(MsgReprovisionRequested, zap.String("rid", r.RequestID))
			return methods.Response{Status: 200, Payload: []byte(`{"message":"provisioning again"}`),
				Then: func(error) { requestReprovision() }}
		}))
	}
	return disp
}

// builtinMethod reports whether name is one of the device's built-in methods (registered after
// the scripts, so it wins over a script of the same name).
func (d *Device) builtinMethod(name string) bool {
	switch name {
	case "firmwareUpdate":
		return d.fw != nil
	case "reboot":
		return d.cfg.Reboot.Mode != ""
	case "reprovision":
		return d.dpsEnabled()
	}
	return false
}

// methodObserver tells the Observer each direct-method call's name and the status it was
// answered with: the responders see only the request id, so the name is kept from delivery to
// answer (at most maxPendingMethods at once; a call the hub never gets an answer to is dropped
// with the session).
type methodObserver struct {
	device string
	obs    Observer
	mu     sync.Mutex
	calls  map[string]pendingCall
}

type pendingCall struct {
	name string
	at   time.Time
}

// maxPendingMethods bounds the calls remembered for the observer.
const maxPendingMethods = 256

func newMethodObserver(device string, obs Observer) *methodObserver {
	return &methodObserver{device: device, obs: obs}
}

func (m *methodObserver) called(rid, name string) {
	if _, nop := m.obs.(NopObserver); nop {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.calls == nil {
		m.calls = make(map[string]pendingCall)
	}
	if len(m.calls) < maxPendingMethods {
		m.calls[rid] = pendingCall{name, time.Now()}
	}
}

func (m *methodObserver) answered(rid string, status int) {
	m.mu.Lock()
	c, ok := m.calls[rid]
	delete(m.calls, rid)
	m.mu.Unlock()
	if ok {
		m.obs.MethodAnswered(m.device, c.name, status, time.Since(c.at))
	}
}

func (m *methodObserver) respond(next methods.Responder) methods.Responder {
	return func(ctx context.Context, rid string, status int, payload []byte) error {
		m.answered(rid, status)
		return next(ctx, rid, status, payload)
	}
}

func (m *methodObserver) refuse(next func(string, int, []byte) error) func(string, int, []byte) error {
	return func(rid string, status int, payload []byte) error {
		m.answered(rid, status)
		return next(rid, status, payload)
	}
}
