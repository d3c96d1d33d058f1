// Package amqp is hubsim's AMQP 1.0 endpoint (amqps, port 5671 by default): what IoT Hub's
// service side speaks to Microsoft's service SDKs. It serves the protocol header and SASL
// (ANONYMOUS, PLAIN, MSSBCBS, or none at all as azure-iothub does), connections, sessions,
// links with credit-based flow control in both directions, multi-frame transfers and
// dispositions, claims-based security on the $cbs node, and IoT Hub's nodes:
// /messages/devicebound (cloud-to-device send) and /messages/serviceBound/feedback (delivery
// feedback). The codec is pkg/amqp; this package does the I/O.
//
// # Adding nodes (the seam for other endpoints)
//
// A node is registered by address pattern before or while the server runs:
//
//	srv.Handle("*/ConsumerGroups/*/Partitions/*", func(l *amqp.Link) error { ... })
//
// Addresses are normalised before matching: an "amqps://authority" prefix and leading slashes
// are dropped, and segments compare case-insensitively; "*" in a pattern matches one segment
// and the matched segments are in Link.Params. The attach function runs on the connection's
// reader goroutine and must not block. It refuses the link by returning an error (an
// *codec.Error keeps its condition; anything else becomes amqp:internal-error), and otherwise
// prepares the link:
//
//   - a link the client sends on (Link.ClientSends): set Link.OnMessage, called on the
//     reader goroutine for each complete message; settle each Delivery with Accept or Reject
//     (now or later, from any goroutine). Set Link.Credit to change the credit window (100).
//   - a link the client receives on: Link.Send (blocking, honours the client's credit and the
//     session window, waits for the client's outcome unless the link is pre-settled) or
//     Link.Post (non-blocking, with a callback); Link.WaitCredit waits until the client gives
//     credit (Event Hubs receivers add it by hand). Start long-running work with Link.Go, which
//     ties the goroutine to the link: its context ends when the link detaches or the
//     connection closes, and the connection waits for it.
//
// Authorisation: a client puts tokens on $cbs (put-token). Each connection keeps the latest
// Claim per audience; verifiers are registered with AddTokenVerifier (this package registers
// the IoT Hub one: service SAS over the hub host name, see VerifyHubToken). A node demands a
// claim with Link.Require(pred): the link is refused with amqp:unauthorized-access when no
// unexpired claim satisfies pred, and detached with that error if its claims expire without
// renewal. Request/response nodes (like $cbs and an Event Hubs $management) find the link to
// answer on with Link.ReplyLink(replyTo).
//
// Connection-level rules: a malformed frame or a protocol violation closes that connection
// (with amqp:decode-error, amqp:connection:framing-error, ...) and nothing else; unknown
// addresses and refused tokens only refuse the link; a client that stops reading is
// disconnected once its outbound queue is full or a write stalls (WriteTimeout), never stalling
// other connections.
package amqp

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	codec "github.com/iothubby/iothubby/pkg/amqp"
	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
)

// DefaultAddr is IoT Hub's amqps port on the loopback interface.
const DefaultAddr = "127.0.0.1:5671"

// Policies finds shared access policies and device identities (the hub's registry).
type Policies interface {
	Policy(name string) (*registry.Policy, bool)
	Identity(deviceID string) (*registry.Identity, bool)
}

// C2D queues cloud-to-device messages (the broker).
type C2D interface {
	SendC2D(deviceID string, m broker.C2DMessage) (string, error)
}

// Config configures a Server.
type Config struct {
	// Addr is the listen address (port 0: any free port). Empty: DefaultAddr.
	Addr string
	// TLS, when set, wraps every connection (amqps). Nil serves plain AMQP.
	TLS *tls.Config
	// HostName is the hub's host name; HostNames are further names it answers to.
	HostName  string
	HostNames []string
	// Policies verify service SAS tokens; C2D queues cloud-to-device messages. Either may be
	// nil, and then the IoT Hub nodes ($cbs for the hub audience, devicebound, feedback) are
	// not registered.
	Policies Policies
	C2D      C2D
	// Clock tells time for token expiry and feedback times (default clock.Real()).
	Clock clock.Clock
	// IdleTimeout is the idle time-out this side announces: a client silent for longer is
	// disconnected (default 4 minutes, as IoT Hub).
	IdleTimeout time.Duration
	// MaxFrameSize is the largest frame accepted (default 65536).
	MaxFrameSize uint32
	// MaxMessageSize bounds a message reassembled from transfers (default 1 MiB).
	MaxMessageSize uint64
	// ChannelMax is the highest channel number (default 255).
	ChannelMax uint16
	// HandshakeTimeout bounds the protocol header, SASL and open exchange (default 30 s).
	HandshakeTimeout time.Duration
	// WriteTimeout bounds every socket write (default 10 s).
	WriteTimeout time.Duration
	// MaxQueuedBytes bounds a connection's outbound queue (default 4 MiB).
	MaxQueuedBytes int
	// FeedbackDelay is how long feedback records wait for more before a batch is sent
	// (default 100 ms; IoT Hub waits up to 15 s or 64 records).
	FeedbackDelay time.Duration
	// ExpirySweep is how often expired undelivered cloud-to-device messages are looked for, so
	// that their Expired feedback goes out, when C2D can sweep (default 5 s).
	ExpirySweep time.Duration
	// OnEvent observes connections (opened, closed with the reason) and refused links, for
	// tests; it must not block.
	OnEvent func(Event)
}

// Event is an observation of the AMQP endpoint.
type Event struct {
	Kind    string // "open", "closed", "refused", "detached"
	Remote  string
	Address string
	Reason  string
}

// Claim is what a verified token grants on a connection.
type Claim struct {
	// Kind names the verifier ("iothub" for VerifyHubToken).
	Kind string
	// Audience is the put-token name, as sent.
	Audience string
	// Resource is the token's decoded resource (sr).
	Resource string
	KeyName  string
	Rights   registry.Rights
	Expiry   time.Time
}

// TokenVerifier checks a put-token. It returns ok=false when the audience is not its business
// (the next verifier is asked), else the claim or why the token is refused.
type TokenVerifier func(audience, tokenType, token string, now time.Time) (c Claim, ok bool, err error)

// AttachFunc prepares or refuses a link attached to a node (see the package doc).
type AttachFunc func(l *Link) error

type node struct {
	pattern []string
	fn      AttachFunc
}

// Server is a running AMQP endpoint.
type Server struct {
	cfg       Config
	log       *zap.Logger
	ln        net.Listener
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	feedback  *feedbackQueue
	mu        sync.Mutex
	nodes     []node
	verifiers []TokenVerifier
	conns     map[*Conn]struct{}
	closed    bool
	closeOnce sync.Once
}

// Start listens on cfg.Addr and serves until Close.
func Start(cfg Config, log *zap.Logger) (*Server, error) {
	if cfg.Addr == "" {
		cfg.Addr = DefaultAddr
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("hubsim amqp: %w", err)
	}
	s := New(cfg, log)
	s.ln = ln
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.serve(ln)
	}()
	return s, nil
}

// New returns a server that serves connections given to ServeConn (Start also listens).
func New(cfg Config, log *zap.Logger) *Server {
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.Real()
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 4 * time.Minute
	}
	if cfg.MaxFrameSize < codec.MinMaxFrameSize {
		cfg.MaxFrameSize = 65536
	}
	if cfg.MaxMessageSize == 0 {
		cfg.MaxMessageSize = 1 << 20
	}
	if cfg.ChannelMax == 0 {
		cfg.ChannelMax = 255
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 30 * time.Second
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 10 * time.Second
	}
	if cfg.MaxQueuedBytes <= 0 {
		cfg.MaxQueuedBytes = 4 << 20
	}
	if cfg.FeedbackDelay <= 0 {
		cfg.FeedbackDelay = 100 * time.Millisecond
	}
	if cfg.ExpirySweep <= 0 {
		cfg.ExpirySweep = 5 * time.Second
	}
	s := &Server{cfg: cfg, log: log, conns: map[*Conn]struct{}{}}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.Handle("$cbs", s.attachCBS)
	if cfg.Policies != nil {
		s.AddTokenVerifier(s.VerifyHubToken)
		if cfg.C2D != nil {
			s.feedback = newFeedbackQueue(s)
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.feedback.run(s.ctx)
			}()
			if sw, ok := cfg.C2D.(interface{ SweepExpiredC2D() }); ok {
				s.wg.Add(1)
				go func() {
					defer s.wg.Done()
					sweep(s.ctx, cfg.ExpirySweep, sw.SweepExpiredC2D)
				}()
			}
			s.Handle("messages/devicebound", s.attachDeviceBound)
			s.Handle("messages/serviceBound/feedback", s.attachFeedback)
		}
	}
	return s
}

func sweep(ctx context.Context, every time.Duration, fn func()) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}

// Addr is the listen address (nil for a server made with New).
func (s *Server) Addr() net.Addr {
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Handle registers a node. Later registrations of the same pattern take precedence.
func (s *Server) Handle(pattern string, fn AttachFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nodes = append([]node{{pattern: segments(pattern), fn: fn}}, s.nodes...)
}

// AddTokenVerifier adds a put-token verifier, asked before the ones already added.
func (s *Server) AddTokenVerifier(v TokenVerifier) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.verifiers = append([]TokenVerifier{v}, s.verifiers...)
}

// NormalizeAddress drops an "amqp(s)://authority" prefix and leading slashes.
func NormalizeAddress(addr string) string {
	if i := strings.Index(addr, "://"); i >= 0 {
		rest := addr[i+3:]
		if j := strings.IndexByte(rest, '/'); j >= 0 {
			addr = rest[j:]
		} else {
			addr = ""
		}
	}
	return strings.TrimLeft(addr, "/")
}

func segments(addr string) []string {
	addr = strings.TrimRight(NormalizeAddress(addr), "/")
	if addr == "" {
		return nil
	}
	return strings.Split(addr, "/")
}

// route finds the node for an address and the segments its wildcards matched.
func (s *Server) route(addr string) (AttachFunc, []string) {
	seg := segments(addr)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.nodes {
		if len(n.pattern) != len(seg) || len(seg) == 0 {
			continue
		}
		var params []string
		ok := true
		for i, p := range n.pattern {
			if p == "*" {
				params = append(params, seg[i])
			} else if !strings.EqualFold(p, seg[i]) {
				ok = false
				break
			}
		}
		if ok {
			return n.fn, params
		}
	}
	return nil, nil
}

func (s *Server) serve(ln net.Listener) {
	for {
		nc, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.log.Warn("amqp accept failed", zap.Error(err))
			}
			return
		}
		s.ServeConn(nc)
	}
}

// ServeConn serves one connection (TLS is applied when configured) on a goroutine the server
// owns; Close ends it.
func (s *Server) ServeConn(nc net.Conn) {
	if s.cfg.TLS != nil {
		nc = tls.Server(nc, s.cfg.TLS)
	}
	c := newConn(s, nc)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = nc.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		c.serve()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
}

func (s *Server) emit(e Event) {
	if s.cfg.OnEvent != nil {
		s.cfg.OnEvent(e)
	}
}

// Close stops listening, closes every connection and waits for every goroutine.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		conns := make([]*Conn, 0, len(s.conns))
		for c := range s.conns {
			conns = append(conns, c)
		}
		s.mu.Unlock()
		if s.ln != nil {
			_ = s.ln.Close()
		}
		s.cancel()
		for _, c := range conns {
			c.abort()
		}
		s.wg.Wait()
	})
	return nil
}
