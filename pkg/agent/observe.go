package agent

import (
	"context"
	"time"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// TwinObserver is an optional extension of Observer (pkg/metrics implements it): the device
// reports each twin request's round trip. op is "get" (the full twin GET after each connect) or
// "patch" (a reported-properties patch); err is the request's error, nil when answered 2xx.
type TwinObserver interface {
	TwinRequest(device, op string, d time.Duration, err error)
}

// ConnectObserver is an optional extension of Observer (pkg/metrics implements it): the device
// reports the start of each hub connection attempt (after Shared.BeforeConnect, so after any
// fleet rate limiter), and the next Connected status ends it.
type ConnectObserver interface {
	ConnectAttempt(device string, at time.Time)
}

// noteStatus keeps what Ready needs from a status change.
func (d *Device) noteStatus(st hub.Status) {
	d.connected.Store(st.State == hub.Connected)
	if st.State != hub.Connected {
		d.synced.Store(false) // a new connection syncs the twin again
	}
}

// watchDelivery marks the session's deliveries as work of the supervisor loop (Liveness) and
// reports connection attempts to a ConnectObserver.
func (d *Device) watchDelivery(hc *hub.Config) {
	if f := hc.OnC2D; f != nil {
		hc.OnC2D = func(ctx context.Context, m *hub.C2DMessage) {
			defer d.live.Enter(LoopSupervisor)()
			d.wedgeIfArmed(LoopSupervisor)
			f(ctx, m)
		}
	}
	if f := hc.OnDesired; f != nil {
		hc.OnDesired = func(ctx context.Context, p *hub.DesiredPatch) {
			defer d.live.Enter(LoopSupervisor)()
			d.wedgeIfArmed(LoopSupervisor)
			f(ctx, p)
		}
	}
	if f := hc.OnMethod; f != nil {
		hc.OnMethod = func(ctx context.Context, r *hub.MethodRequest) {
			defer d.live.Enter(LoopSupervisor)()
			d.wedgeIfArmed(LoopSupervisor)
			f(ctx, r)
		}
	}
	if co, ok := d.observer().(ConnectObserver); ok {
		before := hc.BeforeConnect
		hc.BeforeConnect = func(ctx context.Context) error {
			if before != nil {
				if err := before(ctx); err != nil {
					return err
				}
			}
			co.ConnectAttempt(d.id.deviceID, time.Now())
			return nil
		}
	}
}

// observedSession wraps the twin sync's session: its requests are work of the twin loop
// (Liveness), a successful GET marks the twin synced (Ready), and round trips go to a
// TwinObserver.
func (d *Device) observedSession(s twinsync.Session) twinsync.Session {
	to, _ := d.observer().(TwinObserver)
	return observedSession{s: s, d: d, to: to}
}

type observedSession struct {
	s  twinsync.Session
	d  *Device
	to TwinObserver
}

func (o observedSession) TwinGet(ctx context.Context) (hub.Response, error) {
	defer o.d.live.Enter(LoopTwin)()
	o.d.wedgeIfArmed(LoopTwin)
	start := time.Now()
	r, err := o.s.TwinGet(ctx)
	if err == nil && r.Status/100 == 2 && o.d.connected.Load() {
		o.d.synced.Store(true)
	}
	o.observe("get", start, r, err)
	return r, err
}

func (o observedSession) TwinPatchReported(ctx context.Context, patch []byte) (hub.Response, error) {
	defer o.d.live.Enter(LoopTwin)()
	o.d.wedgeIfArmed(LoopTwin)
	start := time.Now()
	r, err := o.s.TwinPatchReported(ctx, patch)
	o.observe("patch", start, r, err)
	return r, err
}

func (o observedSession) observe(op string, start time.Time, r hub.Response, err error) {
	if o.to == nil {
		return
	}
	if err == nil && r.Status/100 != 2 {
		err = &hub.StatusError{Status: r.Status}
	}
	o.to.TwinRequest(o.d.id.deviceID, op, time.Since(start), err)
}

// watchHandler marks a desired-property handler's run as work of the twin loop.
func (d *Device) watchHandler(h twinsync.Handler) twinsync.Handler {
	return func(ctx context.Context, c twinsync.Change) twinsync.Ack {
		defer d.live.Enter(LoopTwin)()
		d.wedgeIfArmed(LoopTwin)
		return h(ctx, c)
	}
}
