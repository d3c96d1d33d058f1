package hub

import (
	"errors"
	"strconv"
	"sync"

	"github.com/iothubby/iothubby/pkg/wire"
)

// errConnGone means a request was about to be registered on a connection that has ended; the
// caller picks the next connection.
var errConnGone = errors.New("hub: connection ended")

// requests is the $rid correlation of twin requests: each pending request belongs to the
// connection it was published on and is answered only by a response on that connection. It is
// safe for concurrent use: callers register, paho's router resolves, the supervisor fails what
// a connection's end leaves behind.
type requests struct {
	mu      sync.Mutex
	next    uint64
	pending map[string]*pendingReq
	closed  bool
}

type pendingReq struct {
	c  *conn
	ch chan reqResult // cap 1; exactly one send
}

type reqResult struct {
	resp Response
	err  error
}

func (r *requests) init() { r.pending = make(map[string]*pendingReq) }

// add registers a request on c under a fresh $rid. It fails with errConnGone when c has ended
// (or the session has stopped), so a request is never left on a connection whose pending
// requests have already been failed.
func (r *requests) add(c *conn) (string, *pendingReq, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	select {
	case <-c.Done():
		return "", nil, errConnGone
	default:
	}
	if r.closed {
		return "", nil, errConnGone
	}
	if len(r.pending) >= maxPendingRequests {
		return "", nil, ErrTooManyRequests
	}
	r.next++
	rid := strconv.FormatUint(r.next, 10)
	p := &pendingReq{c: c, ch: make(chan reqResult, 1)}
	r.pending[rid] = p
	return rid, p, nil
}

// resolve answers the request q.RequestID with the twin response q (body its payload) if it is
// pending on c; false for an unknown, expired or other connection's $rid. It runs on paho's
// router goroutine: the Response is built here, in one small frame, not passed down by value.
func (r *requests) resolve(c *conn, q *wire.Quick, body []byte) bool {
	r.mu.Lock()
	p := r.pending[q.RequestID]
	if p == nil || p.c != c {
		r.mu.Unlock()
		return false
	}
	delete(r.pending, q.RequestID)
	r.mu.Unlock()
	p.ch <- reqResult{resp: Response{RequestID: q.RequestID, Status: q.Status, Version: q.Version,
		HasVersion: q.HasVersion, Body: body}}
	return true
}

// drop forgets request rid (its caller gave up).
func (r *requests) drop(rid string) {
	r.mu.Lock()
	delete(r.pending, rid)
	r.mu.Unlock()
}

// failConn fails every request pending on c with err. Call it after c has ended.
func (r *requests) failConn(c *conn, err error) {
	r.mu.Lock()
	var failed []*pendingReq
	for rid, p := range r.pending {
		if p.c == c {
			delete(r.pending, rid)
			failed = append(failed, p)
		}
	}
	r.mu.Unlock()
	for _, p := range failed {
		p.ch <- reqResult{err: err}
	}
}

// close fails every pending request with err and refuses new ones.
func (r *requests) close(err error) {
	r.mu.Lock()
	r.closed = true
	failed := r.pending
	r.pending = make(map[string]*pendingReq)
	r.mu.Unlock()
	for _, p := range failed {
		p.ch <- reqResult{err: err}
	}
}

// pendingOn reports whether a request awaits its answer on c.
func (r *requests) pendingOn(c *conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, p := range r.pending {
		if p.c == c {
			return true
		}
	}
	return false
}
