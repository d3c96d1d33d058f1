package tpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeTPM is a TCP server that reads TPM commands and lets the test decide what to answer.
type fakeTPM struct {
	ln      net.Listener
	accepts atomic.Int32
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   []net.Conn
}

// newFakeTPM serves every connection with handle, which gets each command read in full and
// may write anything back; returning false closes the connection.
func newFakeTPM(t *testing.T, handle func(c net.Conn, cmd []byte) bool) *fakeTPM {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeTPM{ln: ln}
	f.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.accepts.Add(1)
			f.mu.Lock()
			f.conns = append(f.conns, c)
			f.mu.Unlock()
			f.wg.Go(func() {
				defer c.Close()
				for {
					var hdr [tpmHeaderSize]byte
					if _, err := io.ReadFull(c, hdr[:]); err != nil {
						return
					}
					cmd := make([]byte, binary.BigEndian.Uint32(hdr[2:6]))
					copy(cmd, hdr[:])
					if _, err := io.ReadFull(c, cmd[tpmHeaderSize:]); err != nil {
						return
					}
					if !handle(c, cmd) {
						return
					}
				}
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		f.mu.Lock()
		for _, c := range f.conns {
			c.Close()
		}
		f.mu.Unlock()
		f.wg.Wait()
	})
	return f
}

func (f *fakeTPM) addr() string { return f.ln.Addr().String() }

// testCommand is TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES, TPM_PT_INPUT_BUFFER, 1).
var testCommand = []byte{0x80, 0x01, 0, 0, 0, 0x16, 0, 0, 0x01, 0x7a, 0, 0, 0, 6, 0, 0, 0x01, 0x0d, 0, 0, 0, 1}

// response makes a TPM response of n bytes (header included) with recognisable contents.
func response(n int) []byte {
	b := make([]byte, n)
	binary.BigEndian.PutUint16(b, 0x8001)
	binary.BigEndian.PutUint32(b[2:], uint32(n))
	for i := tpmHeaderSize; i < n; i++ {
		b[i] = byte(i)
	}
	return b
}

func TestStreamFragmentedResponse(t *testing.T) {
	want := response(300)
	f := newFakeTPM(t, func(c net.Conn, _ []byte) bool {
		for i := range want { // one byte per write: the reader must not assume one read
			if _, err := c.Write(want[i : i+1]); err != nil {
				return false
			}
		}
		return true
	})
	s := newStreamTPM("tcp", f.addr(), 10*time.Second)
	defer s.Close()
	for range 3 {
		got, err := s.SendContext(t.Context(), testCommand)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("got %d bytes, want %d", len(got), len(want))
		}
	}
	if n := f.accepts.Load(); n != 1 {
		t.Errorf("%d connections for three commands, want 1", n)
	}
}

func TestStreamBadResponseSize(t *testing.T) {
	for _, size := range []uint32{0, 9, maxResponse + 1} {
		f := newFakeTPM(t, func(c net.Conn, _ []byte) bool {
			hdr := response(tpmHeaderSize)
			binary.BigEndian.PutUint32(hdr[2:], size)
			c.Write(hdr)
			return true
		})
		s := newStreamTPM("tcp", f.addr(), 10*time.Second)
		_, err := s.SendContext(t.Context(), testCommand)
		if err == nil || !strings.Contains(err.Error(), "announces") {
			t.Errorf("size %d: %v", size, err)
		}
		// The connection was dropped: the next command dials again.
		s.SendContext(t.Context(), testCommand)
		if n := f.accepts.Load(); n != 2 {
			t.Errorf("size %d: %d connections, want 2", size, n)
		}
		s.Close()
	}
}

// A connection the server closed while idle is replaced without failing the command.
func TestStreamReconnectsAfterIdleClose(t *testing.T) {
	var served atomic.Int32
	f := newFakeTPM(t, func(c net.Conn, _ []byte) bool {
		c.Write(response(20))
		return served.Add(1)%2 != 1 // close after the 1st, 3rd, … command
	})
	s := newStreamTPM("tcp", f.addr(), 10*time.Second)
	defer s.Close()
	for i := range 4 {
		if _, err := s.SendContext(t.Context(), testCommand); err != nil {
			t.Fatalf("command %d: %v", i, err)
		}
	}
	if n := f.accepts.Load(); n < 2 {
		t.Errorf("%d connections, want a reconnect", n)
	}
}

func TestStreamCancel(t *testing.T) {
	got := make(chan struct{}, 1)
	f := newFakeTPM(t, func(net.Conn, []byte) bool { got <- struct{}{}; return true }) // never answers
	s := newStreamTPM("tcp", f.addr(), time.Minute)
	defer s.Close()
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() {
		_, err := s.SendContext(ctx, testCommand)
		errc <- err
	}()
	<-got
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled command: %v, want context.Canceled", err)
	}
}

func TestStreamCommandTimeout(t *testing.T) {
	f := newFakeTPM(t, func(net.Conn, []byte) bool { return true }) // never answers
	s := newStreamTPM("tcp", f.addr(), 50*time.Millisecond)
	defer s.Close()
	_, err := s.SendContext(t.Context(), testCommand)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no answer within 50ms") {
		t.Errorf("silent server: %v", err)
	}
}

func TestStreamErrors(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	s := newStreamTPM("tcp", addr, time.Second)
	if _, err := s.SendContext(t.Context(), testCommand); err == nil || !strings.Contains(err.Error(), "connecting to swtpm at tcp://"+addr) {
		t.Errorf("nothing listening: %v", err)
	}
	if _, err := s.Send(testCommand[:9]); err == nil {
		t.Error("a 9-byte command was sent")
	}
	s.Close()
	if _, err := s.Send(testCommand); !errors.Is(err, errTransportClosed) {
		t.Errorf("after Close: %v", err)
	}
}

// Open against a server that never answers ends at the context's deadline.
func TestOpenDeadline(t *testing.T) {
	f := newFakeTPM(t, func(net.Conn, []byte) bool { return true })
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	_, err := Open(ctx, Config{Backend: BackendSwtpm, Path: "tcp://" + f.addr()}, nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Open against a silent server: %v, want context.DeadlineExceeded", err)
	}
}
