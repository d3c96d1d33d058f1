// Package netfault puts network faults between a client and a server in tests: an in-process TCP
// proxy (Shopify's toxiproxy used as a library) listening on a loopback port in front of one
// upstream address (hubsim's MQTT or HTTPS listener), with helpers for latency, bandwidth limits,
// slicing, resets, blackholes and taking the proxy down and up again. A client dials Addr() and
// keeps the upstream's TLS server name (the agent's `address` setting does exactly that), so TLS
// and authentication are the real ones end to end.
//
// How it uses toxiproxy: every connection's chain of toxics is fixed when the proxy is made,
// before it listens: per direction one stage of ours for each fault kind (latency, bandwidth,
// slicer, reset, blackhole), each passing data through untouched while its kind is off. Faults
// are switched on and off in this package's own state, which the stages read for each chunk and
// wait on while they hold one. Nothing adds, updates or removes a toxic on a live proxy, because
// toxiproxy v2.5.0 cannot do that safely while connections come and go: a toxic lifted from a
// link that is being torn down leaves the link's stubs out of step with the chain, and the next
// toxic added panics (index out of range in ToxicLink.AddToxic; seen in the soak), and a change
// that interrupts a stub whose link's writer has gone waits for ever holding the collection's
// lock, which the accept loop needs.
//
// It is test support: the e2e tests and the soak use it; nothing shipped links it.
package netfault

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/Shopify/toxiproxy/v2/stream"
	"github.com/Shopify/toxiproxy/v2/toxics"
	"github.com/rs/zerolog"
	"go.uber.org/zap"
)

// Stream selects which direction of a connection a fault applies to.
type Stream int

const (
	// Both directions (the default of every helper).
	Both Stream = iota
	// Upstream is client to server (the agent's publishes, PINGREQ, TLS ClientHello).
	Upstream
	// Downstream is server to client (PUBACK, CONNACK, twin responses, PINGRESP).
	Downstream
)

// String is the direction's name as the fault log gives it (upstream, downstream, both).
func (s Stream) String() string {
	switch s {
	case Upstream:
		return "upstream"
	case Downstream:
		return "downstream"
	default:
		return "both"
	}
}

func (s Stream) directions() []stream.Direction {
	switch s {
	case Upstream:
		return []stream.Direction{stream.Upstream}
	case Downstream:
		return []stream.Direction{stream.Downstream}
	default:
		return []stream.Direction{stream.Upstream, stream.Downstream}
	}
}

// kind is a fault kind; each has one stage in each direction of every connection, in this order.
type kind int

const (
	latency kind = iota
	bandwidth
	slicer
	reset
	blackhole
	numKinds
)

// String is the kind's name as Fault.Kind and Faults report it (toxiproxy's toxic names where
// one exists).
func (k kind) String() string {
	switch k {
	case latency:
		return "latency"
	case bandwidth:
		return "bandwidth"
	case slicer:
		return "slicer"
	case reset:
		return "reset_peer"
	default:
		return "netfault_blackhole"
	}
}

// Proxy is a running fault proxy in front of one upstream address.
type Proxy struct {
	log      *zap.Logger
	upstream string
	proxy    *toxiproxy.Proxy
	addr     string
	done     chan struct{} // closed by Close: stages stop waiting for links' writers

	life sync.Mutex // serialises Down, Up and Close (stopping and starting the listener)

	mu      sync.Mutex
	active  [stream.NumDirections][numKinds][]*Fault // per direction and kind, newest last
	changed chan struct{}                            // closed and replaced when active changes
	faults  map[*Fault]struct{}
	closed  bool
}

// Fault is one active fault. Remove lifts it.
type Fault struct {
	p    *Proxy
	kind kind
	dirs []stream.Direction

	latency, jitter time.Duration // latency
	rate            int           // bandwidth, in KB/s = bytes per millisecond
	avg, variation  int           // slicer, bytes
	delay           time.Duration // slicer, between pieces
}

// Kind is the fault's kind (latency, bandwidth, slicer, reset_peer, netfault_blackhole).
func (f *Fault) Kind() string { return f.kind.String() }

// Names under which the stages are registered in toxiproxy's toxic registry; the latency stage is
// buffered (as toxiproxy's latency toxic) so chunks queue behind a delayed one with their arrival
// times.
const (
	stageType    = "netfault_stage"
	bufferedType = "netfault_buffered_stage"
)

// New starts a proxy listening on listen (use "127.0.0.1:0" for a free port) that forwards every
// accepted connection to upstream. log receives one line per fault added or lifted; nil discards.
// Close stops it.
//
// Every proxied connection is closed with a TCP reset (SO_LINGER 0) whichever side ends it, as
// toxiproxy does for connections on a proxy with a reset toxic: that is what lets Reset reset.
// Data written before the close is delivered first.
func New(listen, upstream string, log *zap.Logger) (*Proxy, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if _, _, err := net.SplitHostPort(upstream); err != nil {
		return nil, fmt.Errorf("netfault: upstream %q: %w", upstream, err)
	}
	// Idempotent: the registry maps each name to the same type on every call.
	toxics.Register(stageType, new(plainStage))
	toxics.Register(bufferedType, new(bufferedStage))
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	tp := toxiproxy.NewProxy(srv, "netfault-"+upstream, listen, upstream)
	p := &Proxy{
		log:      log.With(zap.String("upstream", upstream)),
		upstream: upstream,
		proxy:    tp,
		done:     make(chan struct{}),
		changed:  make(chan struct{}),
		faults:   map[*Fault]struct{}{},
	}
	if err := p.buildChain(); err != nil {
		return nil, err
	}
	if err := tp.Start(); err != nil {
		return nil, fmt.Errorf("netfault: listen %s: %w", listen, err)
	}
	p.addr = tp.Listen // the bound address once started
	p.log = p.log.With(zap.String("proxy", p.addr))
	return p, nil
}

// buildChain adds the toxics every link will have, before the proxy listens (so before any link
// exists): in the upstream direction toxiproxy's reset_peer with toxicity 0 (it only ever passes
// data on; its presence makes toxiproxy set SO_LINGER 0 on both sockets of each connection, so a
// close is a reset), then in each direction one stage per fault kind.
func (p *Proxy) buildChain() error {
	addJSON := func(v map[string]any) (*toxics.ToxicWrapper, error) {
		body, err := json.Marshal(v)
		if err != nil {
			return nil, err
		}
		w, err := p.proxy.Toxics.AddToxicJson(bytes.NewReader(body))
		if err != nil {
			return nil, fmt.Errorf("netfault: build %v: %w", v["name"], err)
		}
		return w, nil
	}
	if _, err := addJSON(map[string]any{"name": "linger-upstream", "type": "reset_peer", "stream": "upstream",
		"toxicity": 0.0, "attributes": map[string]any{"timeout": 0}}); err != nil {
		return err
	}
	for _, dir := range []stream.Direction{stream.Upstream, stream.Downstream} {
		for k := range numKinds {
			typ := stageType
			if k == latency {
				typ = bufferedType
			}
			w, err := addJSON(map[string]any{"name": k.String() + "-" + dir.String(), "type": typ,
				"stream": dir.String(), "toxicity": 1.0, "attributes": map[string]any{}})
			if err != nil {
				return err
			}
			var st *stage
			switch t := w.Toxic.(type) {
			case *plainStage:
				st = &t.stage
			case *bufferedStage:
				st = &t.stage
			default:
				return fmt.Errorf("netfault: build %s: toxic of type %T", k, w.Toxic)
			}
			// No link exists yet, so no Pipe reads these: the links started later see them.
			st.p, st.dir, st.kind = p, dir, k
		}
	}
	return nil
}

// Start is New on 127.0.0.1:0 for a test: it fails the test if the proxy cannot start and closes
// the proxy in t.Cleanup.
func Start(t testing.TB, upstream string) *Proxy {
	t.Helper()
	p, err := New("127.0.0.1:0", upstream, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// Addr is the proxy's listening address (host:port): the address clients dial.
func (p *Proxy) Addr() string { return p.addr }

// Upstream is the address the proxy forwards to.
func (p *Proxy) Upstream() string { return p.upstream }

// Faults of one kind in one direction stack: the newest applies until it is lifted, then the one
// before it.

// Latency delays every chunk by d ± jitter (uniform) in the given directions (default both).
// Lifting it delivers what it holds at once.
func (p *Proxy) Latency(d, jitter time.Duration, s ...Stream) (*Fault, error) {
	if d < 0 || jitter < 0 {
		return nil, fmt.Errorf("netfault: latency %v ± %v: must not be negative", d, jitter)
	}
	return p.add(&Fault{kind: latency, latency: d, jitter: jitter}, s)
}

// Bandwidth limits each direction (default both) of each connection to kbPerSecond KB/s
// (1 KB = 1000 bytes). Removing it delivers what it held back.
func (p *Proxy) Bandwidth(kbPerSecond int, s ...Stream) (*Fault, error) {
	if kbPerSecond <= 0 {
		return nil, fmt.Errorf("netfault: bandwidth %d KB/s: must be positive (use Blackhole to stop traffic)", kbPerSecond)
	}
	return p.add(&Fault{kind: bandwidth, rate: kbPerSecond}, s)
}

// Slicer cuts each chunk into pieces of about avg bytes (± variation) sent delay apart: TCP
// segments arrive split where the protocol does not expect it.
func (p *Proxy) Slicer(avg, variation int, delay time.Duration, s ...Stream) (*Fault, error) {
	if avg <= 0 || variation < 0 || variation >= avg || delay < 0 {
		return nil, fmt.Errorf("netfault: slicer avg %d variation %d delay %v: need 0 <= variation < avg and delay >= 0", avg, variation, delay)
	}
	return p.add(&Fault{kind: slicer, avg: avg, variation: variation, delay: delay}, s)
}

// Reset makes every connection that carries data in the given directions while it is active end
// with a TCP reset: connections opened while it is active are reset at their first byte; an
// existing one at its next byte. Remove lifts it.
func (p *Proxy) Reset(s ...Stream) (*Fault, error) {
	return p.add(&Fault{kind: reset}, s)
}

// Blackhole drops all data silently in the given directions, the end of the stream included:
// the connection stays open and nothing arrives, not even the other side's close, as behind a
// dead NAT entry or a pulled cable; only the client's own keep-alive can tell. New connections
// are accepted and then hear nothing. Removing it closes (with a reset) the connections that
// were open while it was on; connections made afterwards are not touched. (Toxiproxy's timeout
// toxic with timeout 0 drops data but passes the peer's close on, so a server's keep-alive
// timeout would reach the client.)
func (p *Proxy) Blackhole(s ...Stream) (*Fault, error) {
	return p.add(&Fault{kind: blackhole}, s)
}

// Down stops the listener and closes every proxied connection: clients see their connection
// closed and new dials refused. Up listens again on the same address.
func (p *Proxy) Down() {
	p.life.Lock()
	defer p.life.Unlock()
	p.proxy.Stop()
	p.log.Info("netfault: proxy down")
}

// Up undoes Down: the proxy listens again on Addr (an error if the port was taken meanwhile, or
// if the proxy is closed). Up on a proxy that is up does nothing.
func (p *Proxy) Up() error {
	p.life.Lock()
	defer p.life.Unlock()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return errors.New("netfault: up: proxy closed")
	}
	p.mu.Unlock()
	p.proxy.Lock()
	listen := p.proxy.Listen
	p.proxy.Unlock()
	in := &toxiproxy.Proxy{Listen: listen, Upstream: p.upstream, Enabled: true}
	if err := p.proxy.Update(in); err != nil && !errors.Is(err, toxiproxy.ErrProxyAlreadyStarted) {
		return fmt.Errorf("netfault: up on %s: %w", listen, err)
	}
	p.log.Info("netfault: proxy up")
	return nil
}

// Faults lists the kinds of the active faults.
func (p *Proxy) Faults() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for f := range p.faults {
		out = append(out, f.Kind())
	}
	return out
}

// Clear lifts every active fault.
func (p *Proxy) Clear() error {
	p.mu.Lock()
	fs := make([]*Fault, 0, len(p.faults))
	for f := range p.faults {
		fs = append(fs, f)
	}
	p.mu.Unlock()
	var errs []error
	for _, f := range fs {
		errs = append(errs, f.Remove())
	}
	return errors.Join(errs...)
}

// Close lifts every fault, stops the listener and closes every proxied connection; then every
// goroutine of the proxy ends, including those of links whose writer had gone (toxiproxy's
// writer stops reading when its destination fails, and the data inside the link then waits for
// it until Close). It is safe to call more than once.
func (p *Proxy) Close() {
	p.life.Lock()
	defer p.life.Unlock()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	clear(p.faults)
	p.active = [stream.NumDirections][numKinds][]*Fault{}
	p.notifyLocked()
	p.mu.Unlock()
	p.proxy.Stop()
	close(p.done)
}

// Remove lifts the fault. Removing a fault twice is not an error.
func (f *Fault) Remove() error {
	p := f.p
	p.mu.Lock()
	if _, ok := p.faults[f]; !ok {
		p.mu.Unlock()
		return nil
	}
	delete(p.faults, f)
	for _, d := range f.dirs {
		list := p.active[d][f.kind]
		for i, g := range list {
			if g == f {
				p.active[d][f.kind] = append(list[:i:i], list[i+1:]...)
				break
			}
		}
	}
	p.notifyLocked()
	p.mu.Unlock()
	p.log.Info("netfault: fault lifted", zap.String("kind", f.Kind()))
	return nil
}

func (p *Proxy) add(f *Fault, s []Stream) (*Fault, error) {
	st := Both
	if len(s) > 1 {
		return nil, errors.New("netfault: give at most one Stream")
	}
	if len(s) == 1 {
		st = s[0]
	}
	f.p = p
	f.dirs = st.directions()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, errors.New("netfault: proxy closed")
	}
	p.faults[f] = struct{}{}
	for _, d := range f.dirs {
		p.active[d][f.kind] = append(p.active[d][f.kind], f)
	}
	p.notifyLocked()
	p.mu.Unlock()
	p.log.Info("netfault: fault added", zap.String("kind", f.Kind()), zap.Stringer("stream", st),
		zap.Duration("latency", f.latency), zap.Duration("jitter", f.jitter), zap.Int("rateKBps", f.rate),
		zap.Int("sliceAvg", f.avg), zap.Int("sliceVariation", f.variation), zap.Duration("sliceDelay", f.delay))
	return f, nil
}

// notifyLocked wakes every stage waiting on a change. p.mu is held.
func (p *Proxy) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// current is the fault of kind k in force in direction dir (nil: none) and a channel closed at
// the next change.
func (p *Proxy) current(dir stream.Direction, k kind) (*Fault, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var f *Fault
	if l := p.active[dir][k]; len(l) > 0 {
		f = l[len(l)-1]
	}
	return f, p.changed
}

// stage is one fault kind's place in one direction of every connection's chain. Toxiproxy runs
// its Pipe once per link (and would again after an interrupt, which this package never causes).
type stage struct {
	p    *Proxy
	dir  stream.Direction
	kind kind
}

// plainStage and bufferedStage are the two registered toxic types (the registry needs one Go
// type per buffer size).
type plainStage struct{ stage }

type bufferedStage struct{ stage }

// GetBufferSize is toxiproxy's BufferedToxic: the channel into the latency stage holds chunks.
func (*bufferedStage) GetBufferSize() int { return 1024 }

// Pipe passes chunks on, applying the fault of its kind in force when each arrives, until the
// stream ends, this stage ends it (a reset; a lifted blackhole) or the proxy closes.
func (s *stage) Pipe(stub *toxics.ToxicStub) {
	held := false // a blackhole was on while this connection was open: its lift closes it
	for {
		f, changed := s.p.current(s.dir, s.kind)
		if s.kind == blackhole {
			if f != nil {
				held = true
			} else if held {
				s.finish(stub)
				return
			}
		}
		select {
		case <-stub.Interrupt:
			return
		case <-s.p.done:
			s.finish(stub)
			return
		case <-changed:
		case c := <-stub.Input:
			if c == nil {
				s.end(stub)
				return
			}
			if !s.pass(stub, c) {
				s.finish(stub)
				return
			}
		}
	}
}

// end closes the stream after its input ended; a blackhole holds it open while it is on.
func (s *stage) end(stub *toxics.ToxicStub) {
	for s.kind == blackhole {
		f, changed := s.p.current(s.dir, blackhole)
		if f == nil {
			break
		}
		select {
		case <-changed:
		case <-s.p.done:
			stub.Close()
			return
		case <-stub.Interrupt:
			return
		}
	}
	stub.Close()
}

// finish ends the stream here (the link's writer closes its destination, with a reset) and
// drops whatever still arrives until the input ends, so nothing before this stage blocks.
func (s *stage) finish(stub *toxics.ToxicStub) {
	stub.Close()
	for range stub.Input {
	}
}

// pass applies the fault in force to one chunk; false ends the stream.
func (s *stage) pass(stub *toxics.ToxicStub, c *stream.StreamChunk) bool {
	switch s.kind {
	case reset:
		if f, _ := s.p.current(s.dir, reset); f != nil {
			return false
		}
	case blackhole:
		if f, _ := s.p.current(s.dir, blackhole); f != nil {
			return true // dropped
		}
	case latency:
		if !s.delay(c) {
			return false
		}
	case bandwidth:
		return s.limit(stub, c)
	case slicer:
		return s.slice(stub, c)
	}
	return s.send(stub, c)
}

// send hands a chunk to the next stage; false if the proxy closed meanwhile.
func (s *stage) send(stub *toxics.ToxicStub, c *stream.StreamChunk) bool {
	select {
	case stub.Output <- c:
		return true
	case <-s.p.done:
		return false
	}
}

// hold waits until the time until while f stays the fault of the stage's kind in force. It
// returns the fault in force when it stops (f itself when the time came; another or nil when it
// changed), and false if the proxy closed.
func (s *stage) hold(until time.Time, f *Fault) (*Fault, bool) {
	for {
		g, changed := s.p.current(s.dir, s.kind)
		if g != f {
			return g, true
		}
		left := time.Until(until)
		if left <= 0 {
			return f, true
		}
		t := time.NewTimer(left)
		select {
		case <-t.C:
			return f, true
		case <-changed:
			t.Stop()
		case <-s.p.done:
			t.Stop()
			return nil, false
		}
	}
}

// delay holds a chunk until the latency in force has passed since it arrived; a change of
// latency (or its lift) takes effect at once.
func (s *stage) delay(c *stream.StreamChunk) bool {
	f, _ := s.p.current(s.dir, latency)
	for f != nil {
		d := f.latency
		if f.jitter > 0 {
			d += time.Duration(rand.Int64N(int64(2*f.jitter)+1)) - f.jitter
		}
		g, ok := s.hold(c.Timestamp.Add(d), f)
		if !ok {
			return false
		}
		if g == f {
			return true
		}
		f = g
	}
	return true
}

// limit passes a chunk on at the bandwidth in force, in pieces of at most 100 ms' worth; once
// the limit is lifted the rest goes at once.
func (s *stage) limit(stub *toxics.ToxicStub, c *stream.StreamChunk) bool {
	data := c.Data
	f, _ := s.p.current(s.dir, bandwidth)
	for len(data) > 0 && f != nil {
		n := min(len(data), f.rate*100)
		g, ok := s.hold(time.Now().Add(time.Duration(n)*time.Millisecond/time.Duration(f.rate)), f)
		if !ok {
			return false
		}
		if g != f {
			f = g // changed while waiting: the piece waits for the limit now in force, if any
			continue
		}
		if !s.send(stub, &stream.StreamChunk{Data: data[:n], Timestamp: c.Timestamp}) {
			return false
		}
		data = data[n:]
	}
	return len(data) == 0 || s.send(stub, &stream.StreamChunk{Data: data, Timestamp: c.Timestamp})
}

// slice passes a chunk on in pieces of the slicer in force, delay apart; once it is lifted the
// rest goes at once.
func (s *stage) slice(stub *toxics.ToxicStub, c *stream.StreamChunk) bool {
	data := c.Data
	f, _ := s.p.current(s.dir, slicer)
	for len(data) > 0 && f != nil {
		n := f.avg
		if f.variation > 0 {
			n += rand.IntN(2*f.variation+1) - f.variation
		}
		n = min(max(n, 1), len(data))
		if !s.send(stub, &stream.StreamChunk{Data: data[:n], Timestamp: c.Timestamp}) {
			return false
		}
		data = data[n:]
		if f.delay <= 0 {
			f, _ = s.p.current(s.dir, slicer)
			continue
		}
		var ok bool
		if f, ok = s.hold(time.Now().Add(f.delay), f); !ok {
			return false
		}
	}
	return len(data) == 0 || s.send(stub, &stream.StreamChunk{Data: data, Timestamp: c.Timestamp})
}
