package amqp

import (
	"context"
	"errors"
	"strings"

	"go.uber.org/zap"

	codec "github.com/iothubby/iothubby/pkg/amqp"
)

var errLinkDetached = errors.New("hubsim amqp: link detached")

// Link is a link a client attached to a node. The exported fields describe it; OnMessage and
// Credit are set by the node's AttachFunc.
type Link struct {
	// Name is the link name; Address the normalised address of the node (the target when the
	// client sends, the source when it receives); Params the segments "*" matched.
	Name    string
	Address string
	Params  []string
	// ClientSends: the client is the sender (the server receives).
	ClientSends bool
	// Attach is the client's attach.
	Attach *codec.Attach
	// OnMessage receives each complete message on a link the client sends on (reader
	// goroutine; must not block). Settle the delivery with Accept or Reject.
	OnMessage func(*Delivery)
	// Credit is the credit window granted to a sending client (default 100).
	Credit uint32

	conn           *Conn
	sess           *session
	handle         uint32
	ctx            context.Context
	cancel         context.CancelFunc
	maxMessageSize uint64
	require        func(Claim) bool

	// under conn.mu
	attached          bool
	detached          bool
	credit            uint32
	unsettledIn       uint32
	deliveryCount     uint32
	partial           *Delivery
	sendCredit        uint32
	sendDeliveryCount uint32
	drain             bool
	pending           []*outDelivery
	creditSignal      chan struct{}
}

type outDelivery struct {
	link    *Link
	id      uint32
	tag     []byte
	payload []byte
	done    func(codec.DeliveryState, error)
}

// Delivery is a message a client sent.
type Delivery struct {
	Message *codec.Message
	Raw     []byte
	Tag     []byte

	link          *Link
	id            uint32
	clientSettled bool
	settled       bool
}

// Link is the link the delivery arrived on.
func (d *Delivery) Link() *Link { return d.link }

// Accept settles the delivery as accepted.
func (d *Delivery) Accept() { d.Settle(&codec.Accepted{}) }

// Reject settles the delivery as rejected with err.
func (d *Delivery) Reject(err *codec.Error) { d.Settle(&codec.Rejected{Error: err}) }

// Settle settles the delivery with an outcome (once; later calls do nothing).
func (d *Delivery) Settle(st codec.DeliveryState) {
	c := d.link.conn
	c.lock()
	c.settle(d, st)
	c.unlock()
}

// Conn is the connection the link belongs to.
func (l *Link) Conn() *Conn { return l.conn }

// Context ends when the link detaches or its connection closes.
func (l *Link) Context() context.Context { return l.ctx }

// Go runs fn on a goroutine tied to the link: fn's context is the link's, and the connection
// waits for fn before it is finished.
func (l *Link) Go(fn func(ctx context.Context)) {
	c := l.conn
	c.mu.Lock()
	if c.finished {
		c.mu.Unlock()
		return
	}
	c.links.Add(1)
	c.mu.Unlock()
	go func() {
		defer l.conn.links.Done()
		fn(l.ctx)
	}()
}

// Require demands that an unexpired claim on the connection satisfies pred, now (returning
// amqp:unauthorized-access otherwise) and for the link's lifetime: the link is detached with
// that error when its claims expire without renewal.
func (l *Link) Require(pred func(Claim) bool, what string) error {
	c := l.conn
	c.lock()
	defer c.unlock()
	if !c.authorized(pred) {
		return codec.Errorf(codec.ErrUnauthorizedAccess, "%s: put a valid token on $cbs first", what)
	}
	l.require = pred
	return nil
}

// Detach detaches the link with err (nil: a plain close).
func (l *Link) Detach(err *codec.Error) {
	c := l.conn
	c.lock()
	c.detach(l, err, true, true)
	c.unlock()
}

// Post queues m for the client (a link the client receives on) and returns at once; done, if
// set, learns the client's outcome (pre-settled links: Accepted once sent) or why there is none
// (nil state and an error: the link or connection went away). tag is the delivery tag (nil: a
// 4-byte counter).
func (l *Link) Post(m *codec.Message, tag []byte, done func(codec.DeliveryState, error)) error {
	if l.ClientSends {
		return errors.New("hubsim amqp: Post on a link the client sends on")
	}
	if len(tag) > 32 {
		return errors.New("hubsim amqp: delivery tag longer than 32 bytes")
	}
	b, err := m.MarshalBinary()
	if err != nil {
		return err
	}
	c := l.conn
	c.lock()
	defer c.unlock()
	if l.detached {
		return errLinkDetached
	}
	if len(l.pending) >= maxPending {
		return codec.Errorf(codec.ErrResourceLimit, "%d messages already wait for credit", maxPending)
	}
	l.pending = append(l.pending, &outDelivery{link: l, tag: tag, payload: b, done: done})
	c.pump(l)
	return nil
}

// Send sends m and waits for the client's outcome (see Post).
func (l *Link) Send(ctx context.Context, m *codec.Message) (codec.DeliveryState, error) {
	type result struct {
		st  codec.DeliveryState
		err error
	}
	ch := make(chan result, 1)
	if err := l.Post(m, nil, func(st codec.DeliveryState, err error) { ch <- result{st, err} }); err != nil {
		return nil, err
	}
	select {
	case r := <-ch:
		return r.st, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-l.ctx.Done():
		return nil, errLinkDetached
	}
}

// WaitCredit returns once the client has given credit for more than the messages already
// waiting on a link it receives on, or with an error when ctx ends or the link goes away.
func (l *Link) WaitCredit(ctx context.Context) error {
	c := l.conn
	for {
		c.lock()
		ok, gone := l.sendCredit > uint32(len(l.pending)), l.detached
		c.unlock()
		switch {
		case gone:
			return errLinkDetached
		case ok:
			return nil
		}
		select {
		case <-l.creditSignal:
		case <-ctx.Done():
			return ctx.Err()
		case <-l.ctx.Done():
			return errLinkDetached
		}
	}
}

// SendCredit is the credit the client has given on a link it receives on, and how many
// messages wait for it.
func (l *Link) SendCredit() (credit uint32, waiting int) {
	c := l.conn
	c.lock()
	defer c.unlock()
	return l.sendCredit, len(l.pending)
}

// ReplyLink finds the link to answer a request on: in the same session, a link the client
// receives on from the same node address, preferably one whose target address or name is
// replyTo (protocol-amqp.md §0 item 3).
func (l *Link) ReplyLink(replyTo string) *Link {
	c := l.conn
	c.lock()
	defer c.unlock()
	var fallback *Link
	for _, r := range l.sess.links {
		if r.ClientSends || r.detached || !strings.EqualFold(r.Address, l.Address) {
			continue
		}
		if replyTo != "" && (r.Name == replyTo || (r.Attach.Target != nil && r.Attach.Target.Address == replyTo)) {
			return r
		}
		if fallback == nil {
			fallback = r
		}
	}
	return fallback
}

func (c *Conn) onAttach(ch uint16, a *codec.Attach) error {
	c.lock()
	s := c.sessions[ch]
	switch {
	case s == nil:
		c.unlock()
		return codec.Errorf(codec.ErrIllegalState, "attach on channel %d, which has no session", ch)
	case a.Handle > handleMax:
		c.unlock()
		return codec.Errorf(codec.ErrFramingError, "handle %d exceeds handle-max %d", a.Handle, handleMax)
	case s.links[a.Handle] != nil:
		c.unlock()
		return codec.Errorf(codec.ErrHandleInUse, "handle %d is in use", a.Handle)
	}
	l := &Link{Name: a.Name, ClientSends: a.Role == codec.RoleSender, Attach: a, Credit: 100,
		conn: c, sess: s, handle: a.Handle, maxMessageSize: c.s.cfg.MaxMessageSize, creditSignal: make(chan struct{}, 1)}
	l.ctx, l.cancel = context.WithCancel(c.ctx)
	raw := ""
	if l.ClientSends && a.Target != nil {
		raw = a.Target.Address
	} else if !l.ClientSends && a.Source != nil {
		raw = a.Source.Address
	}
	l.Address = NormalizeAddress(raw)
	s.links[a.Handle] = l // reserves the handle while the node decides
	c.unlock()

	var refuse *codec.Error
	if fn, params := c.s.route(raw); fn == nil {
		refuse = codec.Errorf(codec.ErrNotFound, "no node at address %q", raw)
	} else {
		l.Params = params
		if err := fn(l); err != nil {
			if !errors.As(err, &refuse) {
				refuse = &codec.Error{Condition: codec.ErrInternal, Description: err.Error()}
			}
		}
	}

	c.lock()
	defer c.unlock()
	if l.detached { // the session ended meanwhile
		return nil
	}
	reply := &codec.Attach{Name: a.Name, Handle: a.Handle, Role: !a.Role, SndSettleMode: a.SndSettleMode,
		RcvSettleMode: a.RcvSettleMode, Source: a.Source, Target: a.Target}
	if l.ClientSends {
		reply.RcvSettleMode = codec.RcvFirst
		reply.MaxMessageSize = l.maxMessageSize
	} else {
		zero := uint32(0)
		reply.InitialDeliveryCount = &zero
	}
	if refuse != nil {
		// §2.6.3: attach with the refused terminus null, then detach with the error
		if l.ClientSends {
			reply.Target = nil
		} else {
			reply.Source = nil
		}
		c.send(ch, reply)
		c.log.Info("amqp link refused", zap.String("address", raw), zap.String("error", refuse.Error()))
		c.s.emit(Event{Kind: "refused", Remote: c.remote, Address: l.Address, Reason: refuse.Error()})
		l.attached = true
		c.detach(l, refuse, true, false)
		return nil
	}
	c.send(ch, reply)
	l.attached = true
	if l.ClientSends {
		if a.InitialDeliveryCount != nil {
			l.deliveryCount = *a.InitialDeliveryCount
		}
		if l.Credit == 0 {
			l.Credit = 100
		}
		l.credit = l.Credit
		c.sendLinkFlow(l)
	} else {
		c.pump(l)
	}
	return nil
}
