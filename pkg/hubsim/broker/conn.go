package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/mqttpkt"
	"github.com/iothubby/iothubby/pkg/wire"
)

// devConn is one device's network connection as mochi sees it: TLS over the accepted TCP
// connection (or a WebSocket over the HTTPS listener's TLS, see ws.go), with the first packet
// read and checked by mqttpkt.Screen before mochi may read it. mochi reads from a single goroutine,
// so the sniff state needs no lock.
//
// mochi keeps a client with CleanSession 0 after it disconnects (its session lives on), and with
// it this connection; release drops the stream then, so a disconnected device costs a few
// kilobytes rather than a TLS connection's buffers. Every method is safe after release.
type devConn struct {
	tc     atomic.Pointer[streamRef]
	raw    net.Conn
	local  net.Addr
	remote net.Addr
	b      *Broker

	ws bool // over a WebSocket

	sniffed   bool
	replay    []byte
	connectCI mqttpkt.ConnectInfo

	sess   atomic.Pointer[session]
	closed atomic.Bool
	done   chan struct{} // closed by Close

	// stall, when set, holds reads and writes until the channel it points to is closed (the
	// stall fault).
	stall atomic.Pointer[<-chan struct{}]
	// readWindow is the length of the last read deadline set (0: none).
	readWindow atomic.Int64
}

// stream is what a device's MQTT bytes travel over: a *tls.Conn, or a wsStream.
type stream interface {
	net.Conn
	ConnectionState() tls.ConnectionState
	// CloseWrite ends the stream's sending side (TLS close_notify, WebSocket close frame).
	CloseWrite() error
}

// streamRef lets a devConn swap its stream atomically.
type streamRef struct{ stream }

// handshaker is a stream with a handshake still to run (TLS).
type handshaker interface{ Handshake() error }

func newDevConn(b *Broker, raw net.Conn) *devConn {
	return newDevConnOver(b, raw, tls.Server(raw, b.tlsConf))
}

// newDevConnOver wraps st, carried by the TCP connection raw (closed and given deadlines
// directly).
func newDevConnOver(b *Broker, raw net.Conn, st stream) *devConn {
	_, ws := st.(*wsStream)
	c := &devConn{raw: raw, local: raw.LocalAddr(), remote: raw.RemoteAddr(), b: b, ws: ws, done: make(chan struct{})}
	c.tc.Store(&streamRef{st})
	return c
}

func (c *devConn) stream() stream {
	if r := c.tc.Load(); r != nil {
		return r.stream
	}
	return nil
}

var errRefused = errors.New("connection refused before MQTT")

// errDPSDone ends mochi's view of a connection that a DPS session has served.
var errDPSDone = errors.New("DPS session ended")

// Read runs the CONNECT check on the first call, then replays the checked packet, then reads
// the connection.
func (c *devConn) Read(p []byte) (int, error) {
	tc := c.stream()
	if tc == nil {
		return 0, net.ErrClosed
	}
	if !c.sniffed {
		c.sniffed = true
		if err := c.sniff(tc); err != nil {
			_ = c.Close()
			return 0, errRefused
		}
		if c.b.cfg.DPS != nil && wire.IsDPSUsername(c.connectCI.Username) {
			// DPS shares the listener: its session runs here, on this connection's goroutine,
			// and mochi sees the connection end before any CONNECT.
			c.b.cfg.DPS.ServeDPSMQTT(tc, tc.ConnectionState(), c.replay, c.connectCI)
			c.replay = nil
			_ = c.Close()
			return 0, errDPSDone
		}
	}
	if len(c.replay) > 0 {
		n := copy(p, c.replay)
		c.replay = c.replay[n:]
		if len(c.replay) == 0 {
			c.replay = nil
		}
		return n, nil
	}
	for {
		if !c.waitStall() {
			return 0, net.ErrClosed
		}
		n, err := tc.Read(p)
		var ne net.Error
		if n > 0 || err == nil || c.stall.Load() == nil || !errors.As(err, &ne) || !ne.Timeout() {
			return n, err
		}
		// A stall began while this read waited, and mochi's keep-alive deadline passed
		// meanwhile: the peer's silence is the stall's doing (hubsim is the half-dead side), so
		// hold the read until the stall ends and give it its window again.
		if !c.waitStall() {
			return 0, net.ErrClosed
		}
		if w := c.readWindow.Load(); w > 0 {
			_ = c.raw.SetReadDeadline(time.Now().Add(time.Duration(w)))
		}
	}
}

// Write writes with a deadline of WriteTimeout, so that no writer (mochi's or the outbound
// queue's) waits forever on a device that does not read.
func (c *devConn) Write(p []byte) (int, error) {
	if !c.waitStall() {
		return 0, net.ErrClosed
	}
	tc := c.stream()
	if tc == nil {
		return 0, net.ErrClosed
	}
	if err := c.raw.SetWriteDeadline(time.Now().Add(c.b.cfg.WriteTimeout)); err != nil {
		return 0, err
	}
	return tc.Write(p)
}

func (c *devConn) LocalAddr() net.Addr  { return c.local }
func (c *devConn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline and SetReadDeadline remember the read window they set (mochi's keep-alive), so
// that a read held by a stall gets it again afterwards.
func (c *devConn) SetDeadline(t time.Time) error {
	c.noteWindow(t)
	return c.raw.SetDeadline(t)
}

func (c *devConn) SetReadDeadline(t time.Time) error {
	c.noteWindow(t)
	return c.raw.SetReadDeadline(t)
}

func (c *devConn) noteWindow(t time.Time) {
	if t.IsZero() {
		c.readWindow.Store(0)
		return
	}
	c.readWindow.Store(int64(time.Until(t)))
}

func (c *devConn) SetWriteDeadline(t time.Time) error { return c.raw.SetWriteDeadline(t) }

// ConnectionState is the TLS state (peer certificates); zero after release.
func (c *devConn) ConnectionState() tls.ConnectionState {
	if tc := c.stream(); tc != nil {
		return tc.ConnectionState()
	}
	return tls.ConnectionState{}
}

// release drops the stream (TLS state) of a finished connection.
func (c *devConn) release() {
	_ = c.Close()
	c.tc.Store(nil)
}

func (c *devConn) sniff(tc stream) error {
	log := c.b.log.With(zap.String("remote", c.remote.String()))
	if h, ok := tc.(handshaker); ok {
		if err := h.Handshake(); err != nil {
			log.Debug("TLS handshake failed", zap.Error(err))
			return err
		}
	}
	pkt, ci, remaining, err := mqttpkt.Screen(tc, maxPacketSize)
	var ve *mqttpkt.VersionError
	if errors.As(err, &ve) {
		log.Info("connection refused: CONNACK 1 (unacceptable protocol version)", zap.String("reason", ve.Error()))
		lingerAfter(tc, mqttpkt.ConnackUnacceptableVersion, remaining)
		c.b.emit(Event{Kind: EventRejected, Remote: c.remote.String(), Reason: ve.Error()})
		return err
	}
	if err != nil {
		log.Info("connection closed: first packet is not an acceptable CONNECT", zap.Error(err))
		c.b.emit(Event{Kind: EventRejected, Remote: c.remote.String(), Reason: err.Error()})
		return err
	}
	c.replay = pkt
	c.connectCI = ci
	return nil
}

// lingerAfter writes msg, half-closes, and reads what the peer still sends (up to the rest of its
// packet and a bounded time) so that closing does not reset the connection before the peer has
// read msg.
func lingerAfter(tc stream, msg string, remaining int) {
	_ = tc.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(tc, msg); err != nil {
		return
	}
	_ = tc.CloseWrite()
	_, _ = io.Copy(io.Discard, io.LimitReader(tc, int64(remaining)+64*1024))
}

// Close closes the TCP connection without a TLS close_notify (which could block on a peer that
// does not read), as the hub does when it drops a device.
func (c *devConn) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	close(c.done)
	return c.raw.Close()
}

// group runs goroutines that its owner waits for: Go refuses new work once Close has begun.
type group struct {
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

func (g *group) Go(f func()) bool {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return false
	}
	g.wg.Add(1)
	g.mu.Unlock()
	go func() {
		defer g.wg.Done()
		f()
	}()
	return true
}

func (g *group) closeAndWait() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	g.wg.Wait()
}

// acceptLoop accepts TCP connections and hands each, wrapped, to mochi in its own goroutine.
func (b *Broker) acceptLoop(ctx context.Context) {
	delay := time.Duration(0)
	for {
		raw, err := b.ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Transient (e.g. too many open files): back off as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			b.log.Warn("accept failed", zap.Error(err), zap.Duration("retry_in", delay))
			t := time.NewTimer(delay)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		delay = 0
		_ = raw.SetDeadline(time.Now().Add(b.cfg.ConnectTimeout))
		b.serve(newDevConn(b, raw))
	}
}

// serve hands dc to mochi on a goroutine of the broker's group; it returns at once. dc is closed
// if the broker is closing.
func (b *Broker) serve(dc *devConn) {
	if !b.track(dc) {
		_ = dc.raw.Close()
		return
	}
	if !b.grp.Go(func() {
		defer b.untrack(dc)
		err := b.mqtt.EstablishConnection(listenerID, dc)
		if s := dc.sess.Load(); s != nil {
			// mochi skips OnDisconnect when it fails between authentication and the
			// read loop (e.g. the CONNACK cannot be written); end is idempotent.
			s.end(err)
		}
		dc.release()
		if err != nil {
			b.log.Debug("connection ended", zap.String("remote", dc.remote.String()), zap.Error(err))
		}
	}) {
		b.untrack(dc)
		_ = dc.raw.Close()
	}
}

func (b *Broker) track(dc *devConn) bool {
	b.connsMu.Lock()
	defer b.connsMu.Unlock()
	if b.closing {
		return false
	}
	b.conns[dc] = struct{}{}
	return true
}

func (b *Broker) untrack(dc *devConn) {
	b.connsMu.Lock()
	delete(b.conns, dc)
	b.connsMu.Unlock()
}
