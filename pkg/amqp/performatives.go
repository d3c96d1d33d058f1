package amqp

import (
	"fmt"
)

// Descriptor codes (AMQP 1.0 §2.7, §3.2, §3.4, §3.5, §5.3).
const (
	DescOpen        = 0x10
	DescBegin       = 0x11
	DescAttach      = 0x12
	DescFlow        = 0x13
	DescTransfer    = 0x14
	DescDisposition = 0x15
	DescDetach      = 0x16
	DescEnd         = 0x17
	DescClose       = 0x18
	DescError       = 0x1d
	DescReceived    = 0x23
	DescAccepted    = 0x24
	DescRejected    = 0x25
	DescReleased    = 0x26
	DescModified    = 0x27
	DescSource      = 0x28
	DescTarget      = 0x29
	DescSASLMechs   = 0x40
	DescSASLInit    = 0x41
	DescSASLChall   = 0x42
	DescSASLResp    = 0x43
	DescSASLOutcome = 0x44
)

var symbolicDescriptors = map[Symbol]uint64{
	"amqp:open:list": DescOpen, "amqp:begin:list": DescBegin, "amqp:attach:list": DescAttach,
	"amqp:flow:list": DescFlow, "amqp:transfer:list": DescTransfer, "amqp:disposition:list": DescDisposition,
	"amqp:detach:list": DescDetach, "amqp:end:list": DescEnd, "amqp:close:list": DescClose,
	"amqp:error:list": DescError, "amqp:received:list": DescReceived, "amqp:accepted:list": DescAccepted,
	"amqp:rejected:list": DescRejected, "amqp:released:list": DescReleased, "amqp:modified:list": DescModified,
	"amqp:source:list": DescSource, "amqp:target:list": DescTarget,
	"amqp:sasl-mechanisms:list": DescSASLMechs, "amqp:sasl-init:list": DescSASLInit,
	"amqp:sasl-challenge:list": DescSASLChall, "amqp:sasl-response:list": DescSASLResp,
	"amqp:sasl-outcome:list": DescSASLOutcome,
	"amqp:header:list":       SectionHeader, "amqp:delivery-annotations:map": SectionDeliveryAnnotations,
	"amqp:message-annotations:map": SectionMessageAnnotations, "amqp:properties:list": SectionProperties,
	"amqp:application-properties:map": SectionApplicationProperties, "amqp:data:binary": SectionData,
	"amqp:amqp-sequence:list": SectionSequence, "amqp:amqp-value:*": SectionValue, "amqp:footer:map": SectionFooter,
}

// descriptorCode maps a numeric or symbolic descriptor to its code (0 when unknown).
func descriptorCode(d any) uint64 {
	switch d := d.(type) {
	case uint64:
		return d
	case Symbol:
		return symbolicDescriptors[d]
	}
	return 0
}

// Performative is a frame body: Open, Begin, Attach, Flow, Transfer, Disposition, Detach, End,
// Close, or a SASL frame (SASLMechanisms, SASLInit, SASLChallenge, SASLResponse, SASLOutcome).
type Performative interface {
	descriptor() uint64
	fields() []any
}

// Role of a link end.
type Role bool

// Link roles.
const (
	RoleSender   Role = false
	RoleReceiver Role = true
)

func (r Role) String() string {
	if r == RoleReceiver {
		return "receiver"
	}
	return "sender"
}

// Settlement modes.
const (
	SndUnsettled uint8 = 0
	SndSettled   uint8 = 1
	SndMixed     uint8 = 2
	RcvFirst     uint8 = 0
	RcvSecond    uint8 = 1
)

// Open is the open performative (§2.7.1).
type Open struct {
	ContainerID  string
	Hostname     string
	MaxFrameSize uint32 // default 4294967295
	ChannelMax   uint16 // default 65535
	// IdleTimeout is in milliseconds; 0 means none.
	IdleTimeout         uint32
	OutgoingLocales     []Symbol
	IncomingLocales     []Symbol
	OfferedCapabilities []Symbol
	DesiredCapabilities []Symbol
	Properties          Map
}

func (*Open) descriptor() uint64 { return DescOpen }
func (o *Open) fields() []any {
	var idle any
	if o.IdleTimeout != 0 {
		idle = o.IdleTimeout
	}
	return []any{o.ContainerID, optString(o.Hostname), o.MaxFrameSize, o.ChannelMax, idle,
		optSymbols(o.OutgoingLocales), optSymbols(o.IncomingLocales), optSymbols(o.OfferedCapabilities),
		optSymbols(o.DesiredCapabilities), optMap(o.Properties)}
}

// Begin is the begin performative (§2.7.2).
type Begin struct {
	RemoteChannel       *uint16
	NextOutgoingID      uint32
	IncomingWindow      uint32
	OutgoingWindow      uint32
	HandleMax           uint32 // default 4294967295
	OfferedCapabilities []Symbol
	DesiredCapabilities []Symbol
	Properties          Map
}

func (*Begin) descriptor() uint64 { return DescBegin }
func (b *Begin) fields() []any {
	var rc any
	if b.RemoteChannel != nil {
		rc = *b.RemoteChannel
	}
	return []any{rc, b.NextOutgoingID, b.IncomingWindow, b.OutgoingWindow, b.HandleMax,
		optSymbols(b.OfferedCapabilities), optSymbols(b.DesiredCapabilities), optMap(b.Properties)}
}

// Attach is the attach performative (§2.7.3).
type Attach struct {
	Name                 string
	Handle               uint32
	Role                 Role
	SndSettleMode        uint8 // default SndMixed
	RcvSettleMode        uint8 // default RcvFirst
	Source               *Source
	Target               *Target
	Unsettled            Map
	IncompleteUnsettled  bool
	InitialDeliveryCount *uint32
	// MaxMessageSize is in bytes; 0 means no limit.
	MaxMessageSize      uint64
	OfferedCapabilities []Symbol
	DesiredCapabilities []Symbol
	Properties          Map
}

func (*Attach) descriptor() uint64 { return DescAttach }
func (a *Attach) fields() []any {
	var src, tgt, mms any
	if a.Source != nil {
		src = a.Source
	}
	if a.Target != nil {
		tgt = a.Target
	}
	if a.MaxMessageSize != 0 {
		mms = a.MaxMessageSize
	}
	return []any{a.Name, a.Handle, bool(a.Role), a.SndSettleMode, a.RcvSettleMode, src, tgt,
		optMap(a.Unsettled), optBool(a.IncompleteUnsettled), optU32(a.InitialDeliveryCount), mms,
		optSymbols(a.OfferedCapabilities), optSymbols(a.DesiredCapabilities), optMap(a.Properties)}
}

// Flow is the flow performative (§2.7.4). The link fields are set only on link flows.
type Flow struct {
	NextIncomingID *uint32
	IncomingWindow uint32
	NextOutgoingID uint32
	OutgoingWindow uint32
	Handle         *uint32
	DeliveryCount  *uint32
	LinkCredit     *uint32
	Available      *uint32
	Drain          bool
	Echo           bool
	Properties     Map
}

func (*Flow) descriptor() uint64 { return DescFlow }
func (f *Flow) fields() []any {
	return []any{optU32(f.NextIncomingID), f.IncomingWindow, f.NextOutgoingID, f.OutgoingWindow,
		optU32(f.Handle), optU32(f.DeliveryCount), optU32(f.LinkCredit), optU32(f.Available),
		optBool(f.Drain), optBool(f.Echo), optMap(f.Properties)}
}

// Transfer is the transfer performative (§2.7.5). The message bytes follow it in the frame.
type Transfer struct {
	Handle        uint32
	DeliveryID    *uint32
	DeliveryTag   []byte
	MessageFormat *uint32
	Settled       bool
	More          bool
	RcvSettleMode *uint8
	State         DeliveryState
	Resume        bool
	Aborted       bool
	Batchable     bool
}

func (*Transfer) descriptor() uint64 { return DescTransfer }
func (t *Transfer) fields() []any {
	var rsm, st any
	if t.RcvSettleMode != nil {
		rsm = *t.RcvSettleMode
	}
	if t.State != nil {
		st = t.State
	}
	return []any{t.Handle, optU32(t.DeliveryID), optBinary(t.DeliveryTag), optU32(t.MessageFormat),
		optBool(t.Settled), optBool(t.More), rsm, st, optBool(t.Resume), optBool(t.Aborted), optBool(t.Batchable)}
}

// Disposition is the disposition performative (§2.7.6).
type Disposition struct {
	Role      Role
	First     uint32
	Last      *uint32
	Settled   bool
	State     DeliveryState
	Batchable bool
}

func (*Disposition) descriptor() uint64 { return DescDisposition }
func (d *Disposition) fields() []any {
	var st any
	if d.State != nil {
		st = d.State
	}
	return []any{bool(d.Role), d.First, optU32(d.Last), optBool(d.Settled), st, optBool(d.Batchable)}
}

// Detach is the detach performative (§2.7.7).
type Detach struct {
	Handle uint32
	Closed bool
	Error  *Error
}

func (*Detach) descriptor() uint64 { return DescDetach }
func (d *Detach) fields() []any    { return []any{d.Handle, optBool(d.Closed), optError(d.Error)} }

// End is the end performative (§2.7.8).
type End struct{ Error *Error }

func (*End) descriptor() uint64 { return DescEnd }
func (e *End) fields() []any    { return []any{optError(e.Error)} }

// Close is the close performative (§2.7.9).
type Close struct{ Error *Error }

func (*Close) descriptor() uint64 { return DescClose }
func (c *Close) fields() []any    { return []any{optError(c.Error)} }

func optError(e *Error) any {
	if e == nil {
		return nil
	}
	return e
}

// Error is an AMQP error (§2.8.14). It is also a Go error.
type Error struct {
	Condition   Symbol
	Description string
	Info        Map
}

func (*Error) descriptor() uint64 { return DescError }
func (e *Error) fields() []any {
	return []any{e.Condition, optString(e.Description), optMap(e.Info)}
}

func (e *Error) Error() string {
	if e.Description == "" {
		return string(e.Condition)
	}
	return string(e.Condition) + ": " + e.Description
}

// Errorf returns an *Error with a formatted description.
func Errorf(condition Symbol, format string, args ...any) *Error {
	return &Error{Condition: condition, Description: fmt.Sprintf(format, args...)}
}

// Error conditions used by hubsim (§2.8.15-§2.8.18 and Microsoft's).
const (
	ErrInternal             Symbol = "amqp:internal-error"
	ErrNotFound             Symbol = "amqp:not-found"
	ErrUnauthorizedAccess   Symbol = "amqp:unauthorized-access"
	ErrDecodeError          Symbol = "amqp:decode-error"
	ErrResourceLimit        Symbol = "amqp:resource-limit-exceeded"
	ErrNotAllowed           Symbol = "amqp:not-allowed"
	ErrInvalidField         Symbol = "amqp:invalid-field"
	ErrNotImplemented       Symbol = "amqp:not-implemented"
	ErrIllegalState         Symbol = "amqp:illegal-state"
	ErrFramingError         Symbol = "amqp:connection:framing-error"
	ErrConnectionForced     Symbol = "amqp:connection:forced"
	ErrUnattachedHandle     Symbol = "amqp:session:unattached-handle"
	ErrHandleInUse          Symbol = "amqp:session:handle-in-use"
	ErrWindowViolation      Symbol = "amqp:session:window-violation"
	ErrDetachForced         Symbol = "amqp:link:detach-forced"
	ErrTransferLimit        Symbol = "amqp:link:transfer-limit-exceeded"
	ErrMessageSizeExceeded  Symbol = "amqp:link:message-size-exceeded"
	ErrMicrosoftMessageSize Symbol = "com.microsoft:message-too-large"
	ErrMicrosoftArgument    Symbol = "com.microsoft:argument-error"
)

// Source is a link source (§3.5.3).
type Source struct {
	Address               string
	Durable               uint32
	ExpiryPolicy          Symbol
	Timeout               uint32
	Dynamic               bool
	DynamicNodeProperties Map
	DistributionMode      Symbol
	// Filter is the filter set: symbol keys, described values (Event Hubs' selector filters).
	Filter         Map
	DefaultOutcome DeliveryState
	Outcomes       []Symbol
	Capabilities   []Symbol
}

func (*Source) descriptor() uint64 { return DescSource }
func (s *Source) fields() []any {
	var dur, to, def any
	if s.Durable != 0 {
		dur = s.Durable
	}
	if s.Timeout != 0 {
		to = s.Timeout
	}
	if s.DefaultOutcome != nil {
		def = s.DefaultOutcome
	}
	return []any{optString(s.Address), dur, optSymbol(s.ExpiryPolicy), to, optBool(s.Dynamic),
		optMap(s.DynamicNodeProperties), optSymbol(s.DistributionMode), optMap(s.Filter), def,
		optSymbols(s.Outcomes), optSymbols(s.Capabilities)}
}

// Target is a link target (§3.5.4).
type Target struct {
	Address               string
	Durable               uint32
	ExpiryPolicy          Symbol
	Timeout               uint32
	Dynamic               bool
	DynamicNodeProperties Map
	Capabilities          []Symbol
}

func (*Target) descriptor() uint64 { return DescTarget }
func (t *Target) fields() []any {
	var dur, to any
	if t.Durable != 0 {
		dur = t.Durable
	}
	if t.Timeout != 0 {
		to = t.Timeout
	}
	return []any{optString(t.Address), dur, optSymbol(t.ExpiryPolicy), to, optBool(t.Dynamic),
		optMap(t.DynamicNodeProperties), optSymbols(t.Capabilities)}
}

// DeliveryState is a delivery's state or outcome: *Received, *Accepted, *Rejected, *Released
// or *Modified.
type DeliveryState interface {
	Performative
	deliveryState()
}

// Received is the received delivery state (§3.4.1).
type Received struct {
	SectionNumber uint32
	SectionOffset uint64
}

// Accepted is the accepted outcome (§3.4.2).
type Accepted struct{}

// Rejected is the rejected outcome (§3.4.3).
type Rejected struct{ Error *Error }

// Released is the released outcome (§3.4.4).
type Released struct{}

// Modified is the modified outcome (§3.4.5).
type Modified struct {
	DeliveryFailed     bool
	UndeliverableHere  bool
	MessageAnnotations Map
}

func (*Received) descriptor() uint64 { return DescReceived }
func (r *Received) fields() []any    { return []any{r.SectionNumber, r.SectionOffset} }
func (*Accepted) descriptor() uint64 { return DescAccepted }
func (*Accepted) fields() []any      { return nil }
func (*Rejected) descriptor() uint64 { return DescRejected }
func (r *Rejected) fields() []any    { return []any{optError(r.Error)} }
func (*Released) descriptor() uint64 { return DescReleased }
func (*Released) fields() []any      { return nil }
func (*Modified) descriptor() uint64 { return DescModified }
func (m *Modified) fields() []any {
	return []any{optBool(m.DeliveryFailed), optBool(m.UndeliverableHere), optMap(m.MessageAnnotations)}
}
func (*Received) deliveryState() {}
func (*Accepted) deliveryState() {}
func (*Rejected) deliveryState() {}
func (*Released) deliveryState() {}
func (*Modified) deliveryState() {}

// SASLMechanisms is the sasl-mechanisms frame (§5.3.3.1).
type SASLMechanisms struct{ Mechanisms []Symbol }

// SASLInit is the sasl-init frame (§5.3.3.2).
type SASLInit struct {
	Mechanism       Symbol
	InitialResponse []byte
	Hostname        string
}

// SASLChallenge is the sasl-challenge frame (§5.3.3.3).
type SASLChallenge struct{ Challenge []byte }

// SASLResponse is the sasl-response frame (§5.3.3.4).
type SASLResponse struct{ Response []byte }

// SASL outcome codes (§5.3.3.6).
const (
	SASLOK      uint8 = 0
	SASLAuth    uint8 = 1
	SASLSys     uint8 = 2
	SASLSysPerm uint8 = 3
	SASLSysTemp uint8 = 4
)

// SASLOutcome is the sasl-outcome frame (§5.3.3.5).
type SASLOutcome struct {
	Code           uint8
	AdditionalData []byte
}

func (*SASLMechanisms) descriptor() uint64 { return DescSASLMechs }
func (m *SASLMechanisms) fields() []any    { return []any{Array(symbolsToAny(m.Mechanisms))} }
func (*SASLInit) descriptor() uint64       { return DescSASLInit }
func (i *SASLInit) fields() []any {
	return []any{i.Mechanism, optBinary(i.InitialResponse), optString(i.Hostname)}
}
func (*SASLChallenge) descriptor() uint64 { return DescSASLChall }
func (c *SASLChallenge) fields() []any    { return []any{c.Challenge} }
func (*SASLResponse) descriptor() uint64  { return DescSASLResp }
func (r *SASLResponse) fields() []any     { return []any{r.Response} }
func (*SASLOutcome) descriptor() uint64   { return DescSASLOutcome }
func (o *SASLOutcome) fields() []any      { return []any{o.Code, optBinary(o.AdditionalData)} }

func symbolsToAny(s []Symbol) []any {
	out := make([]any, len(s))
	for i, x := range s {
		out[i] = x
	}
	return out
}

// DecodeFrameBody decodes the performative at the start of a frame body and returns the bytes
// after it (a transfer's message payload).
func DecodeFrameBody(body []byte) (Performative, []byte, error) {
	v, n, err := DecodeValue(body)
	if err != nil {
		return nil, nil, err
	}
	d, ok := v.(Described)
	if !ok {
		return nil, nil, fmt.Errorf("amqp: frame body is a %T, not a performative", v)
	}
	x, err := fromDescribed(d)
	if err != nil {
		return nil, nil, err
	}
	p, ok := x.(Performative)
	if !ok {
		return nil, nil, fmt.Errorf("amqp: frame body is a %T, not a performative", x)
	}
	switch p.(type) {
	case *Open, *Begin, *Attach, *Flow, *Transfer, *Disposition, *Detach, *End, *Close,
		*SASLMechanisms, *SASLInit, *SASLChallenge, *SASLResponse, *SASLOutcome:
	default:
		return nil, nil, fmt.Errorf("amqp: frame body is a %T, not a performative", x)
	}
	if _, isTransfer := p.(*Transfer); !isTransfer && n != len(body) {
		return nil, nil, fmt.Errorf("amqp: %d bytes after the %T performative", len(body)-n, p)
	}
	return p, body[n:], nil
}

// fromDescribed interprets a described value as one of the package's types (performatives,
// delivery states, source, target, error). Unknown descriptors are an error.
func fromDescribed(d Described) (any, error) {
	code := descriptorCode(d.Descriptor)
	l, isList := d.Value.([]any)
	name := fmt.Sprintf("descriptor %v", d.Descriptor)
	if !isList {
		return nil, fmt.Errorf("amqp: %s holds a %T, want a list", name, d.Value)
	}
	r := &fieldReader{f: l}
	var out any
	switch code {
	case DescOpen:
		r.what = "open"
		o := &Open{}
		if r.required(0, "container-id") {
			o.ContainerID = r.str(0, "container-id")
		}
		o.Hostname = r.str(1, "hostname")
		o.MaxFrameSize = r.u32(2, "max-frame-size", 4294967295)
		o.ChannelMax = r.u16(3, "channel-max", 65535)
		o.IdleTimeout = r.u32(4, "idle-time-out", 0)
		o.OutgoingLocales = r.symbols(5, "outgoing-locales")
		o.IncomingLocales = r.symbols(6, "incoming-locales")
		o.OfferedCapabilities = r.symbols(7, "offered-capabilities")
		o.DesiredCapabilities = r.symbols(8, "desired-capabilities")
		o.Properties = r.mapf(9, "properties")
		out = o
	case DescBegin:
		r.what = "begin"
		b := &Begin{}
		b.RemoteChannel = r.optU16(0, "remote-channel")
		if r.required(1, "next-outgoing-id") {
			b.NextOutgoingID = r.u32(1, "next-outgoing-id", 0)
		}
		if r.required(2, "incoming-window") {
			b.IncomingWindow = r.u32(2, "incoming-window", 0)
		}
		if r.required(3, "outgoing-window") {
			b.OutgoingWindow = r.u32(3, "outgoing-window", 0)
		}
		b.HandleMax = r.u32(4, "handle-max", 4294967295)
		b.OfferedCapabilities = r.symbols(5, "offered-capabilities")
		b.DesiredCapabilities = r.symbols(6, "desired-capabilities")
		b.Properties = r.mapf(7, "properties")
		out = b
	case DescAttach:
		r.what = "attach"
		a := &Attach{}
		if r.required(0, "name") {
			a.Name = r.str(0, "name")
		}
		if r.required(1, "handle") {
			a.Handle = r.u32(1, "handle", 0)
		}
		if r.required(2, "role") {
			a.Role = Role(r.boolean(2, "role"))
		}
		a.SndSettleMode = r.u8(3, "snd-settle-mode", SndMixed)
		a.RcvSettleMode = r.u8(4, "rcv-settle-mode", RcvFirst)
		if a.SndSettleMode > SndMixed || a.RcvSettleMode > RcvSecond {
			return nil, fmt.Errorf("amqp: attach settle modes %d/%d out of range", a.SndSettleMode, a.RcvSettleMode)
		}
		if s, ok := r.described(5, "source", DescSource).(*Source); ok {
			a.Source = s
		}
		if t, ok := r.described(6, "target", DescTarget).(*Target); ok {
			a.Target = t
		}
		a.Unsettled = r.mapf(7, "unsettled")
		a.IncompleteUnsettled = r.boolean(8, "incomplete-unsettled")
		a.InitialDeliveryCount = r.optU32(9, "initial-delivery-count")
		a.MaxMessageSize = r.u64(10, "max-message-size", 0)
		a.OfferedCapabilities = r.symbols(11, "offered-capabilities")
		a.DesiredCapabilities = r.symbols(12, "desired-capabilities")
		a.Properties = r.mapf(13, "properties")
		out = a
	case DescFlow:
		r.what = "flow"
		f := &Flow{}
		f.NextIncomingID = r.optU32(0, "next-incoming-id")
		if r.required(1, "incoming-window") {
			f.IncomingWindow = r.u32(1, "incoming-window", 0)
		}
		if r.required(2, "next-outgoing-id") {
			f.NextOutgoingID = r.u32(2, "next-outgoing-id", 0)
		}
		if r.required(3, "outgoing-window") {
			f.OutgoingWindow = r.u32(3, "outgoing-window", 0)
		}
		f.Handle = r.optU32(4, "handle")
		f.DeliveryCount = r.optU32(5, "delivery-count")
		f.LinkCredit = r.optU32(6, "link-credit")
		f.Available = r.optU32(7, "available")
		f.Drain = r.boolean(8, "drain")
		f.Echo = r.boolean(9, "echo")
		f.Properties = r.mapf(10, "properties")
		out = f
	case DescTransfer:
		r.what = "transfer"
		t := &Transfer{}
		if r.required(0, "handle") {
			t.Handle = r.u32(0, "handle", 0)
		}
		t.DeliveryID = r.optU32(1, "delivery-id")
		t.DeliveryTag = r.bin(2, "delivery-tag")
		if len(t.DeliveryTag) > 32 {
			return nil, fmt.Errorf("amqp: transfer.delivery-tag is %d bytes, at most 32", len(t.DeliveryTag))
		}
		t.MessageFormat = r.optU32(3, "message-format")
		t.Settled = r.boolean(4, "settled")
		t.More = r.boolean(5, "more")
		if r.get(6) != nil {
			m := r.u8(6, "rcv-settle-mode", 0)
			t.RcvSettleMode = &m
		}
		if s, ok := r.described(7, "state", DescReceived, DescAccepted, DescRejected, DescReleased, DescModified).(DeliveryState); ok {
			t.State = s
		}
		t.Resume = r.boolean(8, "resume")
		t.Aborted = r.boolean(9, "aborted")
		t.Batchable = r.boolean(10, "batchable")
		out = t
	case DescDisposition:
		r.what = "disposition"
		d := &Disposition{}
		if r.required(0, "role") {
			d.Role = Role(r.boolean(0, "role"))
		}
		if r.required(1, "first") {
			d.First = r.u32(1, "first", 0)
		}
		d.Last = r.optU32(2, "last")
		d.Settled = r.boolean(3, "settled")
		if s, ok := r.described(4, "state", DescReceived, DescAccepted, DescRejected, DescReleased, DescModified).(DeliveryState); ok {
			d.State = s
		}
		d.Batchable = r.boolean(5, "batchable")
		out = d
	case DescDetach:
		r.what = "detach"
		d := &Detach{}
		if r.required(0, "handle") {
			d.Handle = r.u32(0, "handle", 0)
		}
		d.Closed = r.boolean(1, "closed")
		d.Error, _ = r.described(2, "error", DescError).(*Error)
		out = d
	case DescEnd:
		r.what = "end"
		e := &End{}
		e.Error, _ = r.described(0, "error", DescError).(*Error)
		out = e
	case DescClose:
		r.what = "close"
		c := &Close{}
		c.Error, _ = r.described(0, "error", DescError).(*Error)
		out = c
	case DescError:
		r.what = "error"
		e := &Error{}
		if r.required(0, "condition") {
			e.Condition = r.sym(0, "condition")
		}
		e.Description = r.str(1, "description")
		e.Info = r.mapf(2, "info")
		out = e
	case DescReceived:
		r.what = "received"
		x := &Received{}
		if r.required(0, "section-number") && r.required(1, "section-offset") {
			x.SectionNumber = r.u32(0, "section-number", 0)
			x.SectionOffset = r.u64(1, "section-offset", 0)
		}
		out = x
	case DescAccepted:
		out = &Accepted{}
	case DescRejected:
		r.what = "rejected"
		x := &Rejected{}
		x.Error, _ = r.described(0, "error", DescError).(*Error)
		out = x
	case DescReleased:
		out = &Released{}
	case DescModified:
		r.what = "modified"
		out = &Modified{DeliveryFailed: r.boolean(0, "delivery-failed"), UndeliverableHere: r.boolean(1, "undeliverable-here"),
			MessageAnnotations: r.mapf(2, "message-annotations")}
	case DescSource:
		r.what = "source"
		s := &Source{}
		s.Address = addressString(r, 0, "address")
		s.Durable = r.u32(1, "durable", 0)
		s.ExpiryPolicy = r.sym(2, "expiry-policy")
		s.Timeout = r.u32(3, "timeout", 0)
		s.Dynamic = r.boolean(4, "dynamic")
		s.DynamicNodeProperties = r.mapf(5, "dynamic-node-properties")
		s.DistributionMode = r.sym(6, "distribution-mode")
		s.Filter = r.mapf(7, "filter")
		if o, ok := r.described(8, "default-outcome", DescAccepted, DescRejected, DescReleased, DescModified).(DeliveryState); ok {
			s.DefaultOutcome = o
		}
		s.Outcomes = r.symbols(9, "outcomes")
		s.Capabilities = r.symbols(10, "capabilities")
		out = s
	case DescTarget:
		r.what = "target"
		t := &Target{}
		t.Address = addressString(r, 0, "address")
		t.Durable = r.u32(1, "durable", 0)
		t.ExpiryPolicy = r.sym(2, "expiry-policy")
		t.Timeout = r.u32(3, "timeout", 0)
		t.Dynamic = r.boolean(4, "dynamic")
		t.DynamicNodeProperties = r.mapf(5, "dynamic-node-properties")
		t.Capabilities = r.symbols(6, "capabilities")
		out = t
	case DescSASLMechs:
		r.what = "sasl-mechanisms"
		m := &SASLMechanisms{}
		if r.required(0, "sasl-server-mechanisms") {
			m.Mechanisms = r.symbols(0, "sasl-server-mechanisms")
		}
		out = m
	case DescSASLInit:
		r.what = "sasl-init"
		i := &SASLInit{}
		if r.required(0, "mechanism") {
			i.Mechanism = r.sym(0, "mechanism")
		}
		i.InitialResponse = r.bin(1, "initial-response")
		i.Hostname = r.str(2, "hostname")
		out = i
	case DescSASLChall:
		r.what = "sasl-challenge"
		c := &SASLChallenge{}
		if r.required(0, "challenge") {
			c.Challenge = r.bin(0, "challenge")
		}
		out = c
	case DescSASLResp:
		r.what = "sasl-response"
		x := &SASLResponse{}
		if r.required(0, "response") {
			x.Response = r.bin(0, "response")
		}
		out = x
	case DescSASLOutcome:
		r.what = "sasl-outcome"
		o := &SASLOutcome{}
		if r.required(0, "code") {
			o.Code = r.u8(0, "code", 0)
		}
		o.AdditionalData = r.bin(1, "additional-data")
		out = o
	default:
		return nil, fmt.Errorf("amqp: unknown %s", name)
	}
	if r.err != nil {
		return nil, r.err
	}
	return out, nil
}
