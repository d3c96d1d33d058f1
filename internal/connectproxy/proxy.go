// Package connectproxy is an HTTP CONNECT proxy for tests: it tunnels CONNECT requests (and
// refuses everything else), counts the tunnels it opened and the targets they named, can require
// Basic credentials, and can resolve host names itself (so a test can name a host the client
// cannot resolve, which proves the client went through the proxy). It is test support.
package connectproxy

import (
	"bufio"
	"context"
	"encoding/base64"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// Config configures a Proxy.
type Config struct {
	// Resolve maps a CONNECT target host:port to the address to dial; nil dials the target.
	Resolve func(target string) string
	// User and Password, if User is set, are required in Proxy-Authorization (Basic); without
	// them the proxy answers 407.
	User, Password string
}

// Proxy is a running proxy.
type Proxy struct {
	cfg Config
	ln  net.Listener

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	targets []string
	refused int
	closed  bool
	changed chan struct{}

	wg sync.WaitGroup
}

// Start listens on 127.0.0.1 (a free port) and serves until Close.
func Start(cfg Config) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{cfg: cfg, ln: ln, conns: map[net.Conn]struct{}{}, changed: make(chan struct{})}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is host:port of the proxy.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// URL is http://Addr, with credentials if given.
func (p *Proxy) URL(user, password string) string {
	if user == "" {
		return "http://" + p.Addr()
	}
	return "http://" + user + ":" + password + "@" + p.Addr()
}

// Targets lists the targets of the tunnels opened, in order.
func (p *Proxy) Targets() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.targets...)
}

// Refused counts requests answered with an error status.
func (p *Proxy) Refused() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.refused
}

// WaitTunnels waits until at least n tunnels were opened or ctx is done.
func (p *Proxy) WaitTunnels(ctx context.Context, n int) error {
	for {
		p.mu.Lock()
		got, ch := len(p.targets), p.changed
		p.mu.Unlock()
		if got >= n {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Close stops the proxy, closes every connection and waits for its goroutines.
func (p *Proxy) Close() {
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	_ = p.ln.Close()
	p.wg.Wait()
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		_ = c.Close()
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	_ = c.Close()
}

func (p *Proxy) note(target string, refused bool) {
	p.mu.Lock()
	if refused {
		p.refused++
	} else {
		p.targets = append(p.targets, target)
	}
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			continue
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer p.untrack(c)
			p.serve(c)
		}()
	}
}

func (p *Proxy) refuse(c net.Conn, status int) {
	p.note("", true)
	hdr := "HTTP/1.1 " + strconv.Itoa(status) + " " + http.StatusText(status) + "\r\nContent-Length: 0\r\n"
	if status == http.StatusProxyAuthRequired {
		hdr += "Proxy-Authenticate: Basic realm=\"test\"\r\n"
	}
	_, _ = io.WriteString(c, hdr+"\r\n")
}

func (p *Proxy) serve(c net.Conn) {
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	if req.Method != http.MethodConnect {
		p.refuse(c, http.StatusMethodNotAllowed)
		return
	}
	if p.cfg.User != "" {
		want := "Basic " + base64.StdEncoding.EncodeToString([]byte(p.cfg.User+":"+p.cfg.Password))
		if req.Header.Get("Proxy-Authorization") != want {
			p.refuse(c, http.StatusProxyAuthRequired)
			return
		}
	}
	target := req.Host
	dst := target
	if p.cfg.Resolve != nil {
		dst = p.cfg.Resolve(target)
	}
	up, err := net.DialTimeout("tcp", dst, 10*time.Second)
	if err != nil {
		p.refuse(c, http.StatusBadGateway)
		return
	}
	if !p.track(up) {
		return
	}
	defer p.untrack(up)
	if _, err := io.WriteString(c, "HTTP/1.1 200 Connection Established\r\n\r\n"); err != nil {
		return
	}
	_ = c.SetDeadline(time.Time{})
	p.note(target, false)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if br.Buffered() > 0 {
			b, _ := br.Peek(br.Buffered())
			if _, err := up.Write(b); err != nil {
				return
			}
		}
		_, _ = io.Copy(up, c)
		if tc, ok := up.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	}()
	_, _ = io.Copy(c, up)
	_ = c.Close() // ends the other copy
	<-done
}
