package fleet

import (
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/hub"
)

// Summary is what `agent fleet --summary FILE` writes at exit.
type Summary struct {
	Devices        int               `json:"devices"`
	Connected      int               `json:"connected"`
	EverConnected  int               `json:"everConnected"`
	Provisioning   map[string]uint64 `json:"provisioning"`
	Connects       uint64            `json:"connects"`
	Reconnects     uint64            `json:"reconnects"`
	ConnectFailed  uint64            `json:"connectFailures"`
	Telemetry      TelemetrySummary  `json:"telemetry"`
	C2DReceived    uint64            `json:"c2dReceived"`
	DesiredPatches uint64            `json:"desiredPatches"`
	// Methods counts answered direct-method calls by status ("200", "501", ...).
	Methods map[string]uint64 `json:"methods"`
	// DeviceErrors counts devices whose Run ended with an error, by error text.
	DeviceErrors map[string]int `json:"deviceErrors,omitempty"`
}

// TelemetrySummary accounts for every telemetry message: Sent = Acknowledged + Failed +
// Pending (Pending is 0 after a clean drain).
type TelemetrySummary struct {
	Sent         uint64            `json:"sent"`
	Acknowledged uint64            `json:"acknowledged"`
	Failed       uint64            `json:"failed"`
	Pending      uint64            `json:"pending"`
	FailedBy     map[string]uint64 `json:"failedByReason"`
}

// counters counts the devices' events (an agent.Observer) and forwards them to next.
type counters struct {
	agent.NopObserver
	next  agent.Observer
	index map[string]int // device id -> slot; read-only after start

	connected []atomic.Bool
	ever      []atomic.Bool
	// everN counts the devices connected at least once; allEver is closed when it reaches
	// every device.
	everN   atomic.Int64
	allEver chan struct{}

	connects, reconnects, connFailed atomic.Uint64
	sent, acked, failed              atomic.Uint64
	c2d, desired                     atomic.Uint64

	// slots bound the hub connection attempts in flight; a device's status or DPS result gives
	// its slot back. provisioned (DPS identities only, else nil) marks the devices that have a
	// DPS result, whose next connection is to the hub.
	slots       *connectSlots
	provisioned []atomic.Bool

	mu       sync.Mutex
	prov     map[string]uint64
	failedBy map[string]uint64
	methods  map[string]uint64
	devErrs  map[string]int
}

func newCounters(ids []string, next agent.Observer, slots *connectSlots, dps bool) *counters {
	if next == nil {
		next = agent.NopObserver{}
	}
	c := &counters{
		next: next, index: make(map[string]int, len(ids)),
		connected: make([]atomic.Bool, len(ids)), ever: make([]atomic.Bool, len(ids)), allEver: make(chan struct{}),
		prov: map[string]uint64{}, failedBy: map[string]uint64{}, methods: map[string]uint64{},
	}
	for i, id := range ids {
		c.index[id] = i
	}
	c.slots = slots
	if dps {
		c.provisioned = make([]atomic.Bool, len(ids))
	}
	return c
}

func (c *counters) Provisioned(device, outcome string, err error) {
	if i, ok := c.index[device]; ok {
		c.slots.release(i)
		if c.provisioned != nil && outcome != agent.ProvisionFailed {
			c.provisioned[i].Store(true)
		}
	}
	c.mu.Lock()
	c.prov[outcome]++
	c.mu.Unlock()
	c.next.Provisioned(device, outcome, err)
}

func (c *counters) ConnectionStatus(device string, st hub.Status) {
	if i, ok := c.index[device]; ok {
		c.slots.release(i)
		switch st.State {
		case hub.Connected:
			c.connected[i].Store(true)
			c.connects.Add(1)
			if c.ever[i].Swap(true) {
				c.reconnects.Add(1)
			} else if c.everN.Add(1) == int64(len(c.ever)) {
				close(c.allEver)
			}
		default:
			c.connected[i].Store(false)
			if st.Err != nil && st.Attempt > 0 && st.State == hub.DisconnectedRetrying {
				c.connFailed.Add(1)
			}
		}
	}
	c.next.ConnectionStatus(device, st)
}

func (c *counters) TelemetrySent(device string) {
	c.sent.Add(1)
	c.next.TelemetrySent(device)
}

func (c *counters) TelemetryDone(device string, latency time.Duration, err error) {
	if err == nil {
		c.acked.Add(1)
	} else {
		c.failed.Add(1)
		c.mu.Lock()
		c.failedBy[FailureReason(err)]++
		c.mu.Unlock()
	}
	c.next.TelemetryDone(device, latency, err)
}

func (c *counters) C2DReceived(device string) {
	c.c2d.Add(1)
	c.next.C2DReceived(device)
}

func (c *counters) DesiredReceived(device string, version int64) {
	c.desired.Add(1)
	c.next.DesiredReceived(device, version)
}

func (c *counters) MethodAnswered(device, method string, status int, d time.Duration) {
	c.mu.Lock()
	c.methods[strconv.Itoa(status)]++
	c.mu.Unlock()
	c.next.MethodAnswered(device, method, status, d)
}

// TwinRequest forwards a twin round trip to next when it observes them (agent.TwinObserver),
// so the fleet's metrics carry the twin histogram as the single agent's do.
func (c *counters) TwinRequest(device, op string, d time.Duration, err error) {
	if to, ok := c.next.(agent.TwinObserver); ok {
		to.TwinRequest(device, op, d, err)
	}
}

// ConnectAttempt forwards the start of a connection attempt to next when it observes them
// (agent.ConnectObserver): the connect-time histogram.
func (c *counters) ConnectAttempt(device string, at time.Time) {
	if co, ok := c.next.(agent.ConnectObserver); ok {
		co.ConnectAttempt(device, at)
	}
}

// FailureReason names why a telemetry message failed, from the hub package's errors (a
// bounded set, fit for a summary key or a metric label).
func FailureReason(err error) string {
	for _, r := range []struct {
		err  error
		name string
	}{
		{hub.ErrQueueFull, "queue_full"},
		{hub.ErrMessageTooLarge, "too_large"},
		{hub.ErrInvalidMessage, "invalid"},
		{hub.ErrMessageExpired, "expired"},
		{hub.ErrCanceled, "canceled"},
		{hub.ErrClosed, "closed"},
		{hub.ErrNotAuthorized, "not_authorized"},
		{hub.ErrRetryExpired, "retry_expired"},
		{hub.ErrConnectionLost, "connection_lost"},
	} {
		if errors.Is(err, r.err) {
			return r.name
		}
	}
	return "other"
}

// connectedNow counts devices connected at this moment.
func (c *counters) connectedNow() (now, ever int) {
	for i := range c.connected {
		if c.connected[i].Load() {
			now++
		}
		if c.ever[i].Load() {
			ever++
		}
	}
	return now, ever
}

func copyMap[K comparable, V any](m map[K]V) map[K]V {
	out := make(map[K]V, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// summary snapshots the counters.
func (c *counters) summary() Summary {
	now, ever := c.connectedNow()
	sent, acked, failed := c.sent.Load(), c.acked.Load(), c.failed.Load()
	c.mu.Lock()
	defer c.mu.Unlock()
	s := Summary{
		Devices: len(c.connected), Connected: now, EverConnected: ever,
		Provisioning: copyMap(c.prov),
		Connects:     c.connects.Load(), Reconnects: c.reconnects.Load(), ConnectFailed: c.connFailed.Load(),
		Telemetry: TelemetrySummary{Sent: sent, Acknowledged: acked, Failed: failed,
			FailedBy: copyMap(c.failedBy)},
		C2DReceived: c.c2d.Load(), DesiredPatches: c.desired.Load(),
		Methods: copyMap(c.methods), DeviceErrors: copyMap(c.devErrs),
	}
	if done := acked + failed; sent > done {
		s.Telemetry.Pending = sent - done
	}
	return s
}
