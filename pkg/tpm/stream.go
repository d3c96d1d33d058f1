package tpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// maxResponse bounds a TPM response read from a stream; real TPMs answer at most a few KiB.
const maxResponse = 64 << 10

// tpmHeaderSize is the size of a TPM command or response header: tag (2), size (4), code (4).
const tpmHeaderSize = 10

// errTransportClosed is returned by a transport used after Close.
var errTransportClosed = errors.New("tpm: transport closed")

// streamTPM speaks the raw TPM 2.0 command stream that swtpm's data channel serves
// (swtpm socket --server type=tcp or type=unixio): write a command, read the 10-byte response
// header, then exactly the rest of the size it announces. It keeps one connection open, drops
// it after any error, and dials again on the next command. Each command has a deadline.
type streamTPM struct {
	network, addr string
	timeout       time.Duration
	dialer        net.Dialer

	mu     sync.Mutex // one command at a time on the connection
	conn   net.Conn
	closed bool
}

func newStreamTPM(network, addr string, timeout time.Duration) *streamTPM {
	return &streamTPM{network: network, addr: addr, timeout: timeout}
}

func (s *streamTPM) String() string { return s.network + "://" + s.addr }

// Send implements transport.TPM with no deadline but the per-command timeout.
func (s *streamTPM) Send(cmd []byte) ([]byte, error) {
	return s.SendContext(context.Background(), cmd)
}

// SendContext sends one command and returns the whole response. The command gets the
// earlier of ctx's deadline and the per-command timeout; cancelling ctx aborts it.
//
// A connection that swtpm dropped while it was idle (swtpm restarted, or runs with
// --server …,disconnect) is noticed only when a command fails on it without a single
// response byte: that command is sent once more on a new connection.
func (s *streamTPM) SendContext(ctx context.Context, cmd []byte) ([]byte, error) {
	if len(cmd) < tpmHeaderSize {
		return nil, fmt.Errorf("tpm: %s: command of %d bytes is shorter than a TPM header", s, len(cmd))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errTransportClosed
	}
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	cc := binary.BigEndian.Uint32(cmd[6:10])
	// fail explains an error: a deadline or cancellation says so, whichever timer fired first.
	fail := func(err error) error {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			<-ctx.Done() // the connection's deadline is ctx's, or ctx was cancelled
		}
		if parent.Err() != nil {
			return fmt.Errorf("swtpm command 0x%x: %w", cc, context.Cause(parent))
		}
		if ctx.Err() != nil {
			return fmt.Errorf("swtpm command 0x%x: no answer within %v: %w", cc, s.timeout, context.DeadlineExceeded)
		}
		return fmt.Errorf("swtpm command 0x%x: %w", cc, err)
	}
	for attempt := 0; ; attempt++ {
		reused := s.conn != nil
		if !reused {
			conn, err := s.dialer.DialContext(ctx, s.network, s.addr)
			if err != nil {
				if ctx.Err() != nil {
					return nil, fail(err)
				}
				return nil, fmt.Errorf("connecting to swtpm at %s: %w", s, err)
			}
			s.conn = conn
		}
		rsp, got, keep, err := roundTrip(ctx, s.conn, cmd)
		if err == nil {
			if !keep {
				s.drop()
			}
			return rsp, nil
		}
		s.drop()
		if reused && got == 0 && attempt == 0 && ctx.Err() == nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		return nil, fail(err)
	}
}

// roundTrip writes cmd and reads one response. got is how many response bytes arrived; keep
// is false when the connection must not be reused (a cancellation may have touched it).
func roundTrip(ctx context.Context, conn net.Conn, cmd []byte) (rsp []byte, got int, keep bool, err error) {
	deadline, _ := ctx.Deadline() // always set: SendContext adds the per-command timeout
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, 0, false, err
	}
	// Cancellation before the deadline: a deadline in the past wakes the blocked Read/Write.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer func() {
		if !stop() {
			keep = false
		}
	}()
	if _, err := conn.Write(cmd); err != nil {
		return nil, 0, false, err
	}
	var hdr [tpmHeaderSize]byte
	n, err := io.ReadFull(conn, hdr[:])
	if err != nil {
		return nil, n, false, err
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < tpmHeaderSize || size > maxResponse {
		return nil, n, false, fmt.Errorf("response header announces %d bytes (want %d to %d)", size, tpmHeaderSize, maxResponse)
	}
	rsp = make([]byte, size)
	copy(rsp, hdr[:])
	m, err := io.ReadFull(conn, rsp[tpmHeaderSize:])
	if err != nil {
		return nil, n + m, false, fmt.Errorf("reading a %d-byte response: %w", size, err)
	}
	return rsp, int(size), true, nil
}

func (s *streamTPM) drop() {
	if s.conn != nil {
		_ = s.conn.Close()
		s.conn = nil
	}
}

// Close closes the connection; later commands fail.
func (s *streamTPM) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.drop()
	return nil
}
