package amqp

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	codec "github.com/iothubby/iothubby/pkg/amqp"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/eventhubs"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
)

// The Event Hubs-compatible endpoint (protocol-amqp.md §4): a $management node answering hub
// and partition properties, and partition receivers at
// <entity>/ConsumerGroups/<group>/Partitions/<n> reading pkg/hubsim/eventhubs with the
// selector filters the Event Hubs SDKs send. Tokens for it are Event Hubs SAS tokens: the
// audience sb://host[:port]/<entity>[/...], signed with the UTF-8 bytes of a shared access
// policy key (§0 item 4).

// KindEventHubs is the Claim.Kind of Event Hubs tokens.
const KindEventHubs = "eventhubs"

// Event Hubs' AMQP names.
const (
	selectorFilter               = codec.Symbol("apache.org:selector-filter:string")
	selectorFilterCode    uint64 = 0x0000468C00000004
	epochProperty                = codec.Symbol("com.microsoft:epoch")
	receiverRuntimeMetric        = codec.Symbol("com.microsoft:enable-receiver-runtime-metric")
	// ErrLinkStolen detaches a receiver replaced by one with a higher epoch.
	ErrLinkStolen = codec.Symbol("amqp:link:stolen")
	// eventsPrefetch and eventsPrefetchBytes bound the events queued on one receiver ahead of
	// the client's credit and outcomes (enough to keep a fast reader busy across round trips).
	eventsPrefetch      = 512
	eventsPrefetchBytes = 1 << 20
)

// EventHubsConfig configures the Event Hubs-compatible endpoint.
type EventHubsConfig struct {
	// Store holds the events.
	Store *eventhubs.Store
	// Name is the Event Hub name (EntityPath).
	Name string
	// CreatedAt is reported as created_at.
	CreatedAt time.Time
}

type eventHubs struct {
	s   *Server
	cfg EventHubsConfig
	log *zap.Logger

	mu     sync.Mutex
	owners map[string][]*ehReceiver // "<group>/<partition>" (lower case) → attached receivers
}

type ehReceiver struct {
	l     *Link
	epoch *int64
}

// ServeEventHubs registers the Event Hubs-compatible endpoint's nodes and token verifier. The
// server's Policies must be set.
func (s *Server) ServeEventHubs(cfg EventHubsConfig) error {
	if cfg.Store == nil || cfg.Name == "" || s.cfg.Policies == nil {
		return errors.New("hubsim amqp: the Event Hubs endpoint needs a store, a name and the registry's policies")
	}
	if strings.ContainsAny(cfg.Name, "/ ") {
		return fmt.Errorf("hubsim amqp: event hub name %q", cfg.Name)
	}
	eh := &eventHubs{s: s, cfg: cfg, log: s.log.Named("eventhubs"), owners: map[string][]*ehReceiver{}}
	s.AddTokenVerifier(eh.verifyToken)
	// The Event Hubs SDKs attach to "$management" itself (managementClient.js) and name the
	// entity in each request; "<entity>/$management" is served too.
	s.Handle("$management", eh.attachManagement)
	s.Handle(cfg.Name+"/$management", eh.attachManagement)
	s.Handle(cfg.Name+"/ConsumerGroups/*/Partitions/*", eh.attachPartition)
	return nil
}

// ehPath splits an Event Hubs audience or resource (sb://host:port/entity/...; scheme and port
// optional) into its host and its path below the host, and reports whether the host is one of
// the hub's names and the path starts with the entity.
func (eh *eventHubs) ehPath(resource string) (path string, ok bool) {
	r := resource
	if i := strings.Index(r, "://"); i >= 0 {
		r = r[i+3:]
	}
	host, path, _ := strings.Cut(r, "/")
	if i := strings.LastIndexByte(host, ':'); i >= 0 {
		host = host[:i]
	}
	known := false
	for _, n := range append([]string{eh.s.cfg.HostName}, eh.s.cfg.HostNames...) {
		known = known || strings.EqualFold(host, n)
	}
	path = strings.Trim(path, "/")
	first, _, _ := strings.Cut(path, "/")
	return path, known && strings.EqualFold(first, eh.cfg.Name)
}

// verifyToken is the put-token verifier for Event Hubs audiences.
func (eh *eventHubs) verifyToken(audience, _ string, token string, now time.Time) (Claim, bool, error) {
	if _, ok := eh.ehPath(audience); !ok {
		return Claim{}, false, nil
	}
	cl, err := eh.verifySAS(token, now)
	if err != nil {
		return Claim{}, true, err
	}
	if !eh.covers(cl.Resource, audience) {
		return Claim{}, true, fmt.Errorf("token resource %q does not cover %q", cl.Resource, audience)
	}
	cl.Audience = audience
	return cl, true, nil
}

// verifySAS checks an Event Hubs SAS token: a policy key's UTF-8 bytes sign it, unexpired,
// for a resource in this event hub.
func (eh *eventHubs) verifySAS(token string, now time.Time) (Claim, error) {
	tok, err := sas.Parse(token)
	if err != nil {
		return Claim{}, fmt.Errorf("malformed token: %v", err)
	}
	if _, ok := eh.ehPath(tok.Resource); !ok {
		return Claim{}, fmt.Errorf("token resource %q is not event hub %s on this hub", tok.Resource, eh.cfg.Name)
	}
	if tok.KeyName == "" {
		return Claim{}, errors.New("token names no shared access policy (skn)")
	}
	p, ok := eh.s.cfg.Policies.Policy(tok.KeyName)
	if !ok {
		return Claim{}, fmt.Errorf("unknown shared access policy %q", tok.KeyName)
	}
	err = tok.Verify(sas.Key(p.PrimaryKey), now)
	if errors.Is(err, sas.ErrSignature) {
		err = tok.Verify(sas.Key(p.SecondaryKey), now)
	}
	switch {
	case errors.Is(err, sas.ErrExpired):
		return Claim{}, errors.New("token expired")
	case err != nil:
		return Claim{}, fmt.Errorf("token signature does not match policy %q (Event Hubs tokens are signed with the key string's bytes)", tok.KeyName)
	}
	return Claim{Kind: KindEventHubs, Resource: tok.Resource, KeyName: tok.KeyName, Rights: p.Rights, Expiry: tok.Expiry}, nil
}

// covers reports whether a token resource covers target (both Event Hubs URIs): the same hub,
// and the resource's path a segment prefix of target's, without regard to case.
func (eh *eventHubs) covers(resource, target string) bool {
	rp, ok1 := eh.ehPath(resource)
	tp, ok2 := eh.ehPath(target)
	if !ok1 || !ok2 {
		return false
	}
	rp, tp = strings.ToLower(rp), strings.ToLower(tp)
	return rp == tp || strings.HasPrefix(tp, rp+"/")
}

// requireFor demands an Event Hubs claim with ServiceConnect covering the link's address
// ("$management" stands for the entity's).
func (eh *eventHubs) requireFor(l *Link) error {
	addr := l.Address
	if strings.EqualFold(addr, "$management") {
		addr = eh.cfg.Name + "/$management"
	}
	target := eh.s.cfg.HostName + "/" + addr
	return l.Require(func(c Claim) bool {
		return c.Kind == KindEventHubs && c.Rights.Has(registry.ServiceConnect) && eh.covers(c.Resource, target)
	}, "reading the Event Hubs-compatible endpoint needs a token with ServiceConnect for "+l.Address)
}

// --- $management ------------------------------------------------------------------------

func (eh *eventHubs) attachManagement(l *Link) error {
	if err := eh.requireFor(l); err != nil {
		return err
	}
	if l.ClientSends {
		l.OnMessage = eh.management
	}
	return nil
}

func (eh *eventHubs) management(d *Delivery) {
	m := d.Message
	d.Accept()
	var msgID any
	var replyTo string
	if m.Properties != nil {
		msgID, replyTo = m.Properties.MessageID, m.Properties.ReplyTo
	}
	status, desc, body := eh.answer(m)
	reply := &codec.Message{
		Properties: &codec.Properties{CorrelationID: msgID, To: replyTo},
		ApplicationProperties: codec.Map{
			{Key: "status-code", Value: int32(status)},
			{Key: "status-description", Value: desc},
		},
		Value: body, HasValue: true,
	}
	rl := d.link.ReplyLink(replyTo)
	if rl == nil {
		eh.log.Info("$management request with no receiver link to answer on")
		return
	}
	if err := rl.Post(reply, nil, nil); err != nil {
		eh.log.Info("$management reply not sent", zap.Error(err))
	}
}

// answer serves one $management request (protocol-amqp.md §4.3).
func (eh *eventHubs) answer(m *codec.Message) (int, string, any) {
	op, name, typ := appString(m, "operation"), appString(m, "name"), appString(m, "type")
	if tok := appString(m, "security_token"); tok != "" {
		cl, err := eh.verifySAS(tok, eh.s.cfg.Clock.Now())
		if err != nil {
			return 401, err.Error(), nil
		}
		if !cl.Rights.Has(registry.ServiceConnect) {
			return 401, "the token's policy lacks ServiceConnect", nil
		}
	}
	if op != "READ" {
		return 400, fmt.Sprintf("unsupported operation %q (READ only)", op), nil
	}
	if !strings.EqualFold(name, eh.cfg.Name) {
		return 404, fmt.Sprintf("no event hub %q (this one is %q)", name, eh.cfg.Name), nil
	}
	st := eh.cfg.Store
	switch typ {
	case "com.microsoft:eventhub":
		return 200, "OK", codec.Map{
			{Key: "name", Value: eh.cfg.Name},
			{Key: "type", Value: "com.microsoft:eventhub"},
			{Key: "created_at", Value: eh.cfg.CreatedAt.UTC()},
			{Key: "partition_count", Value: int32(st.Partitions())},
			{Key: "partition_ids", Value: st.PartitionIDs()},
		}
	case "com.microsoft:partition":
		pid := appString(m, "partition")
		p, err := strconv.Atoi(pid)
		if err != nil || PartitionIDOK(pid) != nil {
			return 404, fmt.Sprintf("no partition %q", pid), nil
		}
		info, err := st.Info(p)
		if err != nil {
			return 404, err.Error(), nil
		}
		last := info.LastEnqueuedTime
		if last.IsZero() {
			last = time.UnixMilli(0).UTC()
		}
		return 200, "OK", codec.Map{
			{Key: "name", Value: eh.cfg.Name},
			{Key: "type", Value: "com.microsoft:partition"},
			{Key: "partition", Value: pid},
			{Key: "begin_sequence_number", Value: info.BeginSequenceNumber},
			{Key: "last_enqueued_sequence_number", Value: info.LastSequenceNumber},
			{Key: "last_enqueued_offset", Value: strconv.FormatInt(info.LastOffset, 10)},
			{Key: "last_enqueued_time_utc", Value: last},
			{Key: "is_partition_empty", Value: info.Empty},
		}
	}
	return 400, fmt.Sprintf("unsupported type %q", typ), nil
}

// PartitionIDOK checks a partition id's form (decimal, no sign or leading zeros).
func PartitionIDOK(id string) error {
	if id == "" || len(id) > 3 || (len(id) > 1 && id[0] == '0') || strings.Trim(id, "0123456789") != "" {
		return fmt.Errorf("partition id %q", id)
	}
	return nil
}

// --- partition receivers ----------------------------------------------------------------

func (eh *eventHubs) attachPartition(l *Link) error {
	if l.ClientSends {
		return codec.Errorf(codec.ErrNotAllowed, "%s is read-only: IoT Hub's built-in endpoint takes events from devices", l.Address)
	}
	group, pid := l.Params[0], l.Params[1]
	st := eh.cfg.Store
	if !st.HasConsumerGroup(group) {
		return codec.Errorf(codec.ErrNotFound, "consumer group %q does not exist in event hub %s (groups: %s)",
			group, eh.cfg.Name, strings.Join(st.ConsumerGroups(), ", "))
	}
	p, err := strconv.Atoi(pid)
	if err != nil || PartitionIDOK(pid) != nil || p >= st.Partitions() {
		return codec.Errorf(codec.ErrNotFound, "partition %q does not exist in event hub %s (partitions 0 to %d)", pid, eh.cfg.Name, st.Partitions()-1)
	}
	if err := eh.requireFor(l); err != nil {
		return err
	}
	pos := eventhubs.Position{Kind: eventhubs.Latest} // no filter: the end of the stream
	if src := l.Attach.Source; src != nil {
		for _, f := range src.Filter {
			dv, ok := f.Value.(codec.Described)
			if !ok {
				continue
			}
			code, _ := dv.Descriptor.(uint64)
			sym, _ := dv.Descriptor.(codec.Symbol)
			if code != selectorFilterCode && sym != selectorFilter {
				continue
			}
			expr, _ := dv.Value.(string)
			if pos, err = eventhubs.ParseFilter(expr); err != nil {
				return codec.Errorf(codec.ErrMicrosoftArgument, "%v", err)
			}
		}
	}
	var epoch *int64
	if v, ok := l.Attach.Properties.Get(epochProperty); ok {
		e, ok := v.(int64)
		if !ok {
			return codec.Errorf(codec.ErrMicrosoftArgument, "%s must be a long, not %T", epochProperty, v)
		}
		epoch = &e
	}
	start, err := st.Start(p, pos)
	if err != nil {
		return codec.Errorf(codec.ErrNotFound, "%v", err)
	}
	r := &ehReceiver{l: l, epoch: epoch}
	key := strings.ToLower(group) + "/" + pid
	if err := eh.own(key, r); err != nil {
		return err
	}
	// Events go pre-settled (protocol-amqp.md §4.5: the SDKs take either; no disposition
	// traffic). The connection answers the attach from Link.Attach, so this sets the
	// sender-settle-mode of the reply.
	l.Attach.SndSettleMode = codec.SndSettled
	metrics := slices.Contains(l.Attach.DesiredCapabilities, receiverRuntimeMetric)
	eh.log.Debug("partition receiver attached", zap.String("address", l.Address), zap.String("position", pos.String()),
		zap.Int64("start", start))
	l.Go(func(ctx context.Context) {
		defer eh.disown(key, r)
		eh.pump(ctx, l, p, start, metrics)
	})
	return nil
}

// own registers r as a receiver of a group's partition, applying epochs: a receiver with a
// higher epoch than every other takes the partition (the others are detached with
// amqp:link:stolen); one with a lower epoch, or without an epoch while an epoch receiver holds
// the partition, is refused.
func (eh *eventHubs) own(key string, r *ehReceiver) error {
	eh.mu.Lock()
	cur := eh.owners[key]
	var stolen []*ehReceiver
	for _, o := range cur {
		switch {
		case o.epoch == nil && r.epoch == nil:
		case o.epoch != nil && (r.epoch == nil || *r.epoch < *o.epoch):
			eh.mu.Unlock()
			return codec.Errorf(ErrLinkStolen, "a receiver with epoch %d holds %s; this one has a lower or no epoch", *o.epoch, key)
		default: // r has an epoch at least as high as o's, or o has none: r takes over
			stolen = append(stolen, o)
		}
	}
	kept := cur[:0:0]
	for _, o := range cur {
		if !slices.Contains(stolen, o) {
			kept = append(kept, o)
		}
	}
	eh.owners[key] = append(kept, r)
	eh.mu.Unlock()
	for _, o := range stolen {
		o.l.Detach(codec.Errorf(ErrLinkStolen, "a receiver with epoch %d took %s", *r.epoch, key))
	}
	return nil
}

func (eh *eventHubs) disown(key string, r *ehReceiver) {
	eh.mu.Lock()
	defer eh.mu.Unlock()
	eh.owners[key] = slices.DeleteFunc(eh.owners[key], func(o *ehReceiver) bool { return o == r })
	if len(eh.owners[key]) == 0 {
		delete(eh.owners, key)
	}
}

// pump reads the partition from seq on and posts events to the link: at most eventsPrefetch
// wait ahead of the client's credit (the connection sends only with credit).
func (eh *eventHubs) pump(ctx context.Context, l *Link, p int, seq int64, metrics bool) {
	var inflight, inflightBytes atomic.Int64
	kick := make(chan struct{}, 1)
	st := eh.cfg.Store
	for {
		room := eventsPrefetch - int(inflight.Load())
		var wake <-chan struct{}
		if room > 0 && inflightBytes.Load() < eventsPrefetchBytes {
			evs, next, w, err := st.Read(p, seq, room)
			if err != nil {
				l.Detach(codec.Errorf(codec.ErrInternal, "%v", err))
				return
			}
			for _, e := range evs {
				m := EventMessage(e)
				if metrics {
					eh.addRuntimeMetrics(m, p)
				}
				size := int64(len(e.Body))
				inflight.Add(1)
				inflightBytes.Add(size)
				done := func(codec.DeliveryState, error) {
					inflight.Add(-1)
					inflightBytes.Add(-size)
					select {
					case kick <- struct{}{}:
					default:
					}
				}
				if err := l.Post(m, nil, done); err != nil {
					inflight.Add(-1)
					inflightBytes.Add(-size)
					if !errors.Is(err, errLinkDetached) {
						eh.log.Info("event not sent", zap.Error(err))
					}
					return
				}
			}
			seq = next
			if len(evs) == room {
				continue // there may be more
			}
			wake = w
		}
		select {
		case <-ctx.Done():
			return
		case <-wake:
		case <-kick:
		}
	}
}

func (eh *eventHubs) addRuntimeMetrics(m *codec.Message, p int) {
	info, err := eh.cfg.Store.Info(p)
	if err != nil {
		return
	}
	m.DeliveryAnnotations = codec.Map{
		{Key: codec.Symbol("last_enqueued_sequence_number"), Value: info.LastSequenceNumber},
		{Key: codec.Symbol("last_enqueued_offset"), Value: strconv.FormatInt(info.LastOffset, 10)},
		{Key: codec.Symbol("last_enqueued_time_utc"), Value: info.LastEnqueuedTime},
		{Key: codec.Symbol("runtime_info_retrieval_time_utc"), Value: eh.s.cfg.Clock.Now().UTC()},
	}
}

// EventMessage is an event as the built-in endpoint delivers it (protocol-amqp.md §4.6): the
// x-opt-* and iothub-* message annotations, the properties section, the application
// properties and one Data section with the body.
func EventMessage(e eventhubs.Event) *codec.Message {
	ann := codec.Map{
		{Key: codec.Symbol("x-opt-sequence-number"), Value: e.SequenceNumber},
		{Key: codec.Symbol("x-opt-offset"), Value: strconv.FormatInt(e.Offset, 10)},
		{Key: codec.Symbol("x-opt-enqueued-time"), Value: e.EnqueuedTime},
	}
	keys := make([]string, 0, len(e.Annotations))
	for k := range e.Annotations {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		v := e.Annotations[k]
		var val any = v
		if k == "iothub-enqueuedtime" {
			t, err := time.Parse(broker.EnqueuedTimeFormat, v)
			if err != nil {
				t = e.EnqueuedTime
			}
			val = t
		}
		ann = append(ann, codec.MapEntry{Key: codec.Symbol(k), Value: val})
	}
	m := &codec.Message{Annotations: ann, Data: [][]byte{e.Body}}
	if e.Body == nil {
		m.Data = [][]byte{{}}
	}
	if len(e.System) > 0 {
		p := &codec.Properties{}
		for k, v := range e.System {
			switch k {
			case "message-id":
				p.MessageID = v
			case "correlation-id":
				p.CorrelationID = v
			case "user-id":
				p.UserID = []byte(v)
			case "to":
				p.To = v
			case "content-type":
				p.ContentType = codec.Symbol(asciiOnly(v))
			case "content-encoding":
				p.ContentEncoding = codec.Symbol(asciiOnly(v))
			case "absolute-expiry-time":
				p.AbsoluteExpiryTime = parseTime(v)
			case "creation-time":
				p.CreationTime = parseTime(v)
			}
		}
		m.Properties = p
	}
	for _, pr := range e.Properties {
		var v any = pr.Value
		if pr.Null {
			v = nil
		}
		m.ApplicationProperties = append(m.ApplicationProperties, codec.MapEntry{Key: pr.Key, Value: v})
	}
	return m
}

// asciiOnly drops what a symbol cannot hold.
func asciiOnly(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return -1
		}
		return r
	}, s)
}

// parseTime reads an ISO 8601 time as MQTT devices send $.exp / $.ctime; zero if it is not one.
func parseTime(s string) time.Time {
	for _, f := range []string{time.RFC3339Nano, "2006-01-02T15:04:05.999999999", "2006-01-02T15:04:05Z07:00"} {
		if t, err := time.Parse(f, s); err == nil {
			return t.UTC()
		}
	}
	return time.Time{}
}
