// Package netfault puts network faults between a client and a server in tests: an in-process TCP
// proxy (Shopify's toxiproxy used as a library) listening on a loopback port in front of one
// upstream address (hubsim's MQTT or HTTPS listener), with helpers for latency, bandwidth limits,
// slicing, resets, blackholes and taking the proxy down and up again. A client dials Addr() and
// keeps the upstream's TLS server name (the agent's `address` setting does exactly that), so TLS
// and authentication are the real ones end to end.
//
// It is test support: the e2e tests and the soak use it; nothing shipped links it.
package netfault

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
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

func (s Stream) names() []string {
	switch s {
	case Upstream:
		return []string{"upstream"}
	case Downstream:
		return []string{"downstream"}
	default:
		return []string{"upstream", "downstream"}
	}
}

// Proxy is a running fault proxy in front of one upstream address.
type Proxy struct {
	log      *zap.Logger
	upstream string
	proxy    *toxiproxy.Proxy
	addr     string

	mu     sync.Mutex
	seq    int
	faults map[*Fault]struct{}
	closed bool
	down   bool // between Down and Up
}

// Fault is one active fault (one toxic per direction it covers). Remove lifts it.
type Fault struct {
	p     *Proxy
	kind  string
	names []string
}

// Kind is the fault's kind (latency, bandwidth, slicer, reset_peer, netfault_blackhole).
func (f *Fault) Kind() string { return f.kind }

// New starts a proxy listening on listen (use "127.0.0.1:0" for a free port) that forwards every
// accepted connection to upstream. log receives one line per fault added or lifted; nil discards.
// Close stops it.
func New(listen, upstream string, log *zap.Logger) (*Proxy, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if _, _, err := net.SplitHostPort(upstream); err != nil {
		return nil, fmt.Errorf("netfault: upstream %q: %w", upstream, err)
	}
	// Idempotent: the registry maps the name to the same type on every call.
	toxics.Register(blackholeType, new(holdToxic))
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	tp := toxiproxy.NewProxy(srv, "netfault-"+upstream, listen, upstream)
	if err := tp.Start(); err != nil {
		return nil, fmt.Errorf("netfault: listen %s: %w", listen, err)
	}
	p := &Proxy{
		log:      log.With(zap.String("upstream", upstream)),
		upstream: upstream,
		proxy:    tp,
		addr:     tp.Listen, // the bound address once started
		faults:   map[*Fault]struct{}{},
	}
	p.log = p.log.With(zap.String("proxy", p.addr))
	return p, nil
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

// Latency delays every chunk by d ± jitter (uniform) in the given directions (default both).
func (p *Proxy) Latency(d, jitter time.Duration, s ...Stream) (*Fault, error) {
	return p.add("latency", map[string]any{"latency": d.Milliseconds(), "jitter": jitter.Milliseconds()}, s)
}

// Bandwidth limits each direction (default both) of each connection to kbPerSecond KB/s
// (1 KB = 1000 bytes). Removing it delivers what it held back.
func (p *Proxy) Bandwidth(kbPerSecond int, s ...Stream) (*Fault, error) {
	if kbPerSecond <= 0 {
		return nil, fmt.Errorf("netfault: bandwidth %d KB/s: must be positive (use Blackhole to stop traffic)", kbPerSecond)
	}
	return p.add("bandwidth", map[string]any{"rate": kbPerSecond}, s)
}

// Slicer cuts each chunk into pieces of about avg bytes (± variation) sent delay apart: TCP
// segments arrive split where the protocol does not expect it.
func (p *Proxy) Slicer(avg, variation int, delay time.Duration, s ...Stream) (*Fault, error) {
	if avg <= 0 || variation < 0 || variation >= avg {
		return nil, fmt.Errorf("netfault: slicer avg %d variation %d: need 0 <= variation < avg", avg, variation)
	}
	return p.add("slicer", map[string]any{"average_size": avg, "size_variation": variation, "delay": delay.Microseconds()}, s)
}

// Reset makes every connection that carries data while it is active end with a TCP reset
// (toxiproxy's reset_peer with timeout 0): connections opened while it is active are reset at
// their first byte; an existing one is closed at its next byte. Remove lifts it.
func (p *Proxy) Reset(s ...Stream) (*Fault, error) {
	return p.add("reset_peer", map[string]any{"timeout": 0}, s)
}

// Blackhole drops all data silently in the given directions, the end of the stream included:
// the connection stays open and nothing arrives, not even the other side's close, as behind a
// dead NAT entry or a pulled cable; only the client's own keep-alive can tell. New connections
// are accepted and then hear nothing. Removing it closes the connections that were blackholed.
// (Toxiproxy's timeout toxic with timeout 0 drops data but passes the peer's close on, so a
// server's keep-alive timeout would reach the client: this is that toxic without the close.)
func (p *Proxy) Blackhole(s ...Stream) (*Fault, error) {
	return p.add(blackholeType, map[string]any{}, s)
}

// blackholeType is the name holdToxic is registered under in toxiproxy's toxic registry.
const blackholeType = "netfault_blackhole"

// holdToxic drops every chunk and holds the stream open when its input ends, until it is
// removed; Fault.Remove then closes the proxy's connections.
//
// It deliberately has no Cleanup method (toxiproxy's CleanupToxic): toxiproxy v2.5.0's
// ToxicLink.RemoveToxic returns early when a Cleanup closes the stub, leaving the removed stub in
// the link while the collection's chain no longer has it, and the next toxic added while that
// link is still registered panics with an index out of range (link.go:186; seen in the soak, which
// adds faults while agents reconnect). Without Cleanup the removal takes toxiproxy's normal path.
type holdToxic struct{}

// Pipe drops data until interrupted; after the input ends it only waits for the interrupt.
func (holdToxic) Pipe(stub *toxics.ToxicStub) {
	for {
		select {
		case <-stub.Interrupt:
			return
		case c := <-stub.Input:
			if c == nil {
				<-stub.Interrupt
				return
			}
		}
	}
}

// Down stops the listener and closes every proxied connection: clients see their connection
// closed and new dials refused. Up listens again on the same address.
func (p *Proxy) Down() {
	p.mu.Lock()
	p.down = true
	p.mu.Unlock()
	p.proxy.Stop()
	p.log.Info("netfault: proxy down")
}

// Up undoes Down: the proxy listens again on Addr (an error if the port was taken meanwhile).
func (p *Proxy) Up() error {
	p.mu.Lock()
	p.down = false
	p.mu.Unlock()
	return p.start()
}

// start listens again on Addr after a Stop.
func (p *Proxy) start() error {
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
		out = append(out, f.kind)
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

// Close lifts every fault, stops the listener and closes every proxied connection. It is safe
// to call more than once.
func (p *Proxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.mu.Unlock()
	// Stopping closes every connection, which ends every link; the toxics are left in place.
	// Lifting them now (toxiproxy's ResetToxics) deadlocks when a link whose destination just
	// closed still has data inside a toxic: RemoveToxic holds the collection's lock while it waits
	// for that toxic, which waits for the link's writer, which waits for the lock (seen in e2e).
	p.proxy.Stop()
	p.mu.Lock()
	clear(p.faults)
	p.mu.Unlock()
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
	p.mu.Unlock()
	var errs []error
	for _, n := range f.names {
		if err := p.proxy.Toxics.RemoveToxic(context.Background(), n); err != nil && !errors.Is(err, toxiproxy.ErrToxicNotFound) {
			errs = append(errs, fmt.Errorf("netfault: remove %s: %w", n, err))
		}
	}
	if f.kind == blackholeType {
		// The blackholed connections are held open with their ends swallowed: close them, as
		// lifting a blackhole promises, by restarting the listener (unless the proxy is down).
		p.mu.Lock()
		restart := !p.down && !p.closed
		p.mu.Unlock()
		if restart {
			p.proxy.Stop()
			if err := p.start(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	p.log.Info("netfault: fault lifted", zap.String("kind", f.kind))
	return errors.Join(errs...)
}

func (p *Proxy) add(kind string, attrs map[string]any, s []Stream) (*Fault, error) {
	stream := Both
	if len(s) > 1 {
		return nil, errors.New("netfault: give at most one Stream")
	}
	if len(s) == 1 {
		stream = s[0]
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, errors.New("netfault: proxy closed")
	}
	p.seq++
	seq := p.seq
	p.mu.Unlock()
	f := &Fault{p: p, kind: kind}
	for _, dir := range stream.names() {
		name := fmt.Sprintf("%s-%s-%d", kind, dir, seq)
		body, err := json.Marshal(map[string]any{"name": name, "type": kind, "stream": dir, "toxicity": 1.0, "attributes": attrs})
		if err != nil {
			return nil, err
		}
		if _, err := p.proxy.Toxics.AddToxicJson(bytes.NewReader(body)); err != nil {
			for _, n := range f.names {
				_ = p.proxy.Toxics.RemoveToxic(context.Background(), n)
			}
			return nil, fmt.Errorf("netfault: add %s %s: %w", kind, dir, err)
		}
		f.names = append(f.names, name)
	}
	p.mu.Lock()
	p.faults[f] = struct{}{}
	p.mu.Unlock()
	p.log.Info("netfault: fault added", zap.String("kind", kind), zap.Any("attributes", attrs), zap.Strings("toxics", f.names))
	return f, nil
}
