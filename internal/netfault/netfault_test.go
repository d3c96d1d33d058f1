package netfault_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/internal/netfault"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// deadline bounds every blocking read or write in these tests.
const deadline = 20 * time.Second

// echoServer echoes every connection until closed; it records how many bytes it read.
type echoServer struct {
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns []net.Conn
}

func startEcho(t *testing.T) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &echoServer{ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

// closeAll closes the server side of every connection so far.
func (s *echoServer) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, deadline)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip writes msg and reads the echo back, returning the elapsed time.
func roundTrip(t *testing.T, c net.Conn, msg []byte) time.Duration {
	t.Helper()
	start := time.Now()
	_ = c.SetDeadline(time.Now().Add(deadline))
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo %q, want %q", got, msg)
	}
	return time.Since(start)
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte('a' + i%26)
	}
	return b
}

func TestPassThroughAndAddresses(t *testing.T) {
	e := startEcho(t)
	p := netfault.Start(t, e.ln.Addr().String())
	if p.Upstream() != e.ln.Addr().String() {
		t.Fatalf("Upstream %s", p.Upstream())
	}
	host, port, err := net.SplitHostPort(p.Addr())
	if err != nil || host != "127.0.0.1" || port == "0" {
		t.Fatalf("Addr %q is not a bound loopback address (%v)", p.Addr(), err)
	}
	c := dial(t, p.Addr())
	roundTrip(t, c, []byte("hello through the proxy"))
	roundTrip(t, c, pattern(100_000))
}

// Latency is a lower bound on the round trip (it is added each way); an upper bound would be a
// timed assertion on speed, so there is none.
func TestLatencyDelaysBothWaysAndLifts(t *testing.T) {
	e := startEcho(t)
	p := netfault.Start(t, e.ln.Addr().String())
	c := dial(t, p.Addr())
	roundTrip(t, c, []byte("warm"))
	f, err := p.Latency(150*time.Millisecond, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Faults(); len(got) != 1 || got[0] != "latency" || f.Kind() != "latency" {
		t.Fatalf("Faults() = %v", got)
	}
	if d := roundTrip(t, c, []byte("slow")); d < 300*time.Millisecond {
		t.Fatalf("round trip %v with 150ms latency each way", d)
	}
	// Only one direction: still at least the one delay.
	if err := f.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := f.Remove(); err != nil {
		t.Fatalf("second Remove: %v", err)
	}
	if _, err := p.Latency(150*time.Millisecond, 0, netfault.Downstream); err != nil {
		t.Fatal(err)
	}
	if d := roundTrip(t, c, []byte("one way")); d < 150*time.Millisecond {
		t.Fatalf("round trip %v with 150ms downstream latency", d)
	}
	if err := p.Clear(); err != nil {
		t.Fatal(err)
	}
	if got := p.Faults(); len(got) != 0 {
		t.Fatalf("faults after Clear: %v", got)
	}
	roundTrip(t, c, []byte("fast again"))
}

func TestBandwidthLimitsThenDrains(t *testing.T) {
	e := startEcho(t)
	p := netfault.Start(t, e.ln.Addr().String())
	c := dial(t, p.Addr())
	if _, err := p.Bandwidth(10, netfault.Upstream); err != nil {
		t.Fatal(err)
	}
	// 4000 bytes at 10 KB/s take at least 400 ms upstream.
	msg := pattern(4000)
	if d := roundTrip(t, c, msg); d < 400*time.Millisecond {
		t.Fatalf("4000 bytes at 10 KB/s in %v", d)
	}
	// Lifted while data is held back: nothing is lost, in order.
	f, err := p.Bandwidth(1, netfault.Downstream)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(deadline))
	big := pattern(20_000)
	if _, err := c.Write(big); err != nil {
		t.Fatal(err)
	}
	first := make([]byte, 10)
	if _, err := io.ReadFull(c, first); err != nil {
		t.Fatal(err)
	}
	if err := p.Clear(); err != nil {
		t.Fatal(err)
	}
	_ = f
	rest := make([]byte, len(big)-len(first))
	if _, err := io.ReadFull(c, rest); err != nil {
		t.Fatalf("after lifting the limit: %v", err)
	}
	if !bytes.Equal(append(first, rest...), big) {
		t.Fatal("data changed or reordered through the bandwidth limit")
	}
}

func TestSlicerKeepsTheStreamIntact(t *testing.T) {
	e := startEcho(t)
	p := netfault.Start(t, e.ln.Addr().String())
	if _, err := p.Slicer(7, 3, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	c := dial(t, p.Addr())
	for range 3 {
		roundTrip(t, c, pattern(500))
	}
}

func TestResetEndsConnectionsWithRST(t *testing.T) {
	e := startEcho(t)
	p := netfault.Start(t, e.ln.Addr().String())
	f, err := p.Reset()
	if err != nil {
		t.Fatal(err)
	}
	c := dial(t, p.Addr())
	_ = c.SetDeadline(time.Now().Add(deadline))
	if _, err := c.Write([]byte("first byte resets")); err != nil {
		t.Fatal(err)
	}
	_, err = c.Read(make([]byte, 10))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read after reset: %v, want connection reset by peer", err)
	}
	if err := f.Remove(); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, dial(t, p.Addr()), []byte("after the reset"))
}

func TestBlackholeSilenceThenCloseOnLift(t *testing.T) {
	e := startEcho(t)
	p := netfault.Start(t, e.ln.Addr().String())
	c := dial(t, p.Addr())
	roundTrip(t, c, []byte("before"))
	f, err := p.Blackhole()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("into the void")); err != nil {
		t.Fatal(err)
	}
	// Nothing comes back: the read ends at its own deadline, not with data or EOF.
	_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	n, err := c.Read(make([]byte, 10))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read through a blackhole: %d bytes, %v; want a deadline error", n, err)
	}
	// A new connection is accepted and hears nothing either.
	c2 := dial(t, p.Addr())
	_, _ = c2.Write([]byte("hello?"))
	_ = c2.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := c2.Read(make([]byte, 10)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("new connection through a blackhole: %v", err)
	}
	// The server closing its side does not get through either: no EOF, only silence.
	e.closeAll()
	_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := c.Read(make([]byte, 10)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("server close through a blackhole: %d bytes, %v; want a deadline error", n, err)
	}
	if err := f.Remove(); err != nil {
		t.Fatal(err)
	}
	// Lifting closes the blackholed connections.
	_ = c.SetReadDeadline(time.Now().Add(deadline))
	if _, err := c.Read(make([]byte, 10)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("blackholed connection after the lift: %v, want closed", err)
	}
	roundTrip(t, dial(t, p.Addr()), []byte("after"))
}

func TestDownClosesAndRefusesThenUp(t *testing.T) {
	e := startEcho(t)
	p := netfault.Start(t, e.ln.Addr().String())
	c := dial(t, p.Addr())
	roundTrip(t, c, []byte("before"))
	p.Down()
	_ = c.SetReadDeadline(time.Now().Add(deadline))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection after Down: %v, want closed", err)
	}
	if c2, err := net.DialTimeout("tcp", p.Addr(), deadline); err == nil {
		c2.Close()
		t.Fatal("dial succeeded while the proxy is down")
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial while down: %v, want connection refused", err)
	}
	if err := p.Up(); err != nil {
		t.Fatal(err)
	}
	if err := p.Up(); err != nil {
		t.Fatalf("Up twice: %v", err)
	}
	roundTrip(t, dial(t, p.Addr()), []byte("after"))
}

func TestBadArguments(t *testing.T) {
	if _, err := netfault.New("127.0.0.1:0", "no-port", nil); err == nil {
		t.Fatal("upstream without a port accepted")
	}
	if _, err := netfault.New("256.0.0.1:1", "127.0.0.1:1", nil); err == nil {
		t.Fatal("unlistenable address accepted")
	}
	e := startEcho(t)
	p := netfault.Start(t, e.ln.Addr().String())
	if _, err := p.Bandwidth(0); err == nil {
		t.Error("bandwidth 0 accepted")
	}
	if _, err := p.Slicer(5, 5, 0); err == nil {
		t.Error("slicer variation >= average accepted")
	}
	if _, err := p.Latency(time.Second, 0, netfault.Upstream, netfault.Downstream); err == nil {
		t.Error("two streams accepted")
	}
	if len(p.Faults()) != 0 {
		t.Fatalf("a refused fault is listed: %v", p.Faults())
	}
	p.Close()
	p.Close()
	if _, err := p.Latency(time.Second, 0); err == nil {
		t.Error("fault added to a closed proxy")
	}
}

// churnClients runs n background clients until the test ends (they stop before the proxy
// closes): each connects to addr, sends, reads the echo every other time and hangs up, over and
// over. Their errors are expected (resets, blackholes, the proxy down or between a lift's
// restart of the listener and its return) and ignored: they are the connections that come and
// go while the tests change faults.
func churnClients(t *testing.T, addr string, n int) {
	stop := make(chan struct{})
	var clients sync.WaitGroup
	for w := range n {
		clients.Add(1)
		go func() {
			defer clients.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", addr, time.Second)
				if err != nil {
					continue
				}
				_ = c.SetDeadline(time.Now().Add(200 * time.Millisecond))
				_, _ = c.Write(pattern(64 + 100*w))
				if i%2 == 0 {
					_, _ = c.Read(make([]byte, 32))
				}
				_ = c.Close()
			}
		}()
	}
	t.Cleanup(func() { close(stop); clients.Wait() })
}

// TestFaultsChangeWhileConnectionsComeAndGo adds and lifts faults (a blackhole among them)
// while clients connect and hang up, as the soak does while agents reconnect. With toxiproxy's
// Cleanup path for the blackhole, a toxic added after a lift while a blackholed link was still
// registered panicked the process (index out of range in ToxicLink.AddToxic).
func TestFaultsChangeWhileConnectionsComeAndGo(t *testing.T) {
	e := startEcho(t)
	p := netfault.Start(t, e.ln.Addr().String())
	churnClients(t, p.Addr(), 1)
	for range 40 {
		var held []net.Conn
		for range 4 {
			if c, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
				held = append(held, c)
			}
		}
		bh, err := p.Blackhole()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range held[:len(held)/2] {
			_ = c.Close()
		}
		if err := bh.Remove(); err != nil {
			t.Fatal(err)
		}
		lat, err := p.Latency(time.Millisecond, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := lat.Remove(); err != nil {
			t.Fatal(err)
		}
		for _, c := range held {
			_ = c.Close()
		}
	}
	roundTrip(t, dial(t, p.Addr()), []byte("still proxying"))
}

// TestFaultChurnKeepsTheProxyWorking puts faults on and lifts them while clients connect, talk
// and hang up, in the orders the soak produces. A connection that ends while a latency fault and
// a blackhole added after it are on (the blackhole holds the ended stream open) used to leave
// toxiproxy v2.5.0's link out of step with its toxic chain when those were lifted: the next fault
// added then panicked the process (index out of range in ToxicLink.AddToxic, link.go:186, as in
// two 10-minute soaks). Every fault change must also return (a change that waits on a link whose
// writer has gone would hold the proxy's lock and stop it accepting), and afterwards the proxy
// must still proxy and still apply faults.
func TestFaultChurnKeepsTheProxyWorking(t *testing.T) {
	e := startEcho(t)
	p := netfault.Start(t, e.ln.Addr().String())
	churnClients(t, p.Addr(), 3)

	// step runs one fault change and fails the test if it does not return within the deadline.
	step := func(what string, fn func() error) {
		t.Helper()
		errc := make(chan error, 1)
		go func() { errc <- fn() }()
		select {
		case err := <-errc:
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		case <-time.After(deadline):
			t.Fatalf("%s did not return in %v: the proxy is stuck", what, deadline)
		}
	}
	add := func(what string, fn func() (*netfault.Fault, error)) *netfault.Fault {
		t.Helper()
		var f *netfault.Fault
		step("add "+what, func() (err error) { f, err = fn(); return err })
		return f
	}

	for round := range 60 {
		// Connections that exist while the faults go on, half of them ended while they are on.
		var held []net.Conn
		for range 4 {
			c, err := net.DialTimeout("tcp", p.Addr(), deadline)
			if err != nil {
				t.Fatalf("round %d: dial: %v", round, err)
			}
			held = append(held, c)
			roundTrip(t, c, []byte("up"))
		}
		lat := add("latency", func() (*netfault.Fault, error) { return p.Latency(time.Millisecond, 0) })
		sl := add("slicer", func() (*netfault.Fault, error) { return p.Slicer(8, 4, 0, netfault.Upstream) })
		bh := add("blackhole", func() (*netfault.Fault, error) { return p.Blackhole() })
		for _, c := range held[:2] {
			_, _ = c.Write([]byte("into the hole"))
			_ = c.Close()
		}
		step("lift latency", lat.Remove)
		step("lift slicer", sl.Remove)
		step("lift blackhole", bh.Remove)
		// The fault added after those lifts is the one that panicked.
		var next *netfault.Fault
		switch round % 4 {
		case 0:
			next = add("bandwidth", func() (*netfault.Fault, error) { return p.Bandwidth(50) })
		case 1:
			next = add("reset", func() (*netfault.Fault, error) { return p.Reset(netfault.Downstream) })
		case 2:
			next = add("latency", func() (*netfault.Fault, error) { return p.Latency(time.Millisecond, 0) })
		case 3:
			step("down", func() error { p.Down(); return nil })
			step("up", p.Up)
		}
		for _, c := range held[2:] {
			_ = c.Close()
		}
		if next != nil {
			step("lift "+next.Kind(), next.Remove)
		}
	}
	step("clear", p.Clear)
	if got := p.Faults(); len(got) != 0 {
		t.Fatalf("faults left after the churn: %v", got)
	}
	// Still a proxy: data passes, and a fault still applies.
	c := dial(t, p.Addr())
	roundTrip(t, c, pattern(10_000))
	f, err := p.Latency(100*time.Millisecond, 0, netfault.Upstream)
	if err != nil {
		t.Fatal(err)
	}
	if d := roundTrip(t, c, []byte("slow")); d < 100*time.Millisecond {
		t.Fatalf("round trip %v with 100ms upstream latency after the churn", d)
	}
	if err := f.Remove(); err != nil {
		t.Fatal(err)
	}
}
