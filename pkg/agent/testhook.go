package agent

import (
	"fmt"

	"go.uber.org/zap"
)

// Log messages of the wedge test hook (field "loop").
const (
	// MsgTestWedgeArmed: WedgeForTest armed the hook; the loop's next piece of work wedges.
	MsgTestWedgeArmed = "test hook: wedge armed"
	// MsgTestWedged: the armed hook has wedged the loop.
	MsgTestWedged = "test hook: loop wedged"
)

// WedgeForTest arms a test hook (agent run --test-wedge, refused unless the test hooks are
// enabled): the next piece of work the named loop (LoopSupervisor, LoopTwin, LoopTelemetry)
// starts, on that loop's own goroutine and after it entered Liveness, never finishes while
// the device runs: it blocks until Run's context ends. The loop is then wedged as far as
// Liveness can tell, so /healthz fails naming it and the systemd watchdog pings stop. It is
// for end-to-end tests of exactly that; a real device never calls it.
//
// The work that trips the hook is the loop's next one: a telemetry tick, a status change or
// a delivery (C2D, desired patch, method call) for the supervisor, a twin request or a
// desired-property handler for the twin.
func (d *Device) WedgeForTest(loop string) error {
	switch loop {
	case LoopSupervisor, LoopTwin, LoopTelemetry:
	default:
		return fmt.Errorf("%w: unknown loop %q (%s, %s, %s)", ErrConfig, loop, LoopSupervisor, LoopTwin, LoopTelemetry)
	}
	d.wedge.Store(&loop)
	d.log.Warn(MsgTestWedgeArmed, zap.String("loop", loop))
	return nil
}

// wedgeIfArmed blocks the calling loop's piece of work (already entered in Liveness) when
// WedgeForTest armed loop, until the device's Run ends (not the work's own context: a wedged
// loop does not honour its deadlines). It trips once.
func (d *Device) wedgeIfArmed(loop string) {
	p := d.wedge.Load()
	if p == nil || *p != loop || !d.wedge.CompareAndSwap(p, nil) {
		return
	}
	d.log.Warn(MsgTestWedged, zap.String("loop", loop))
	<-d.runDone()
}

// runDone is closed when the device's Run context ends (or, before any Run, when Run returns
// or at Close).
func (d *Device) runDone() <-chan struct{} {
	if p := d.runCtx.Load(); p != nil {
		return (*p).Done()
	}
	return d.done
}
