// Package eventhubs reads an IoT hub's built-in Event Hubs-compatible endpoint (device
// telemetry) over AMQP, as Event Hubs clients do: Event Hubs SAS tokens on $cbs, the
// $management node's hub and partition properties, and partition receivers with the
// selector filters of the Event Hubs SDKs. It works against hubsim and a real hub's
// Event Hub-compatible endpoint. It is built on github.com/Azure/go-amqp and kept apart from
// pkg/service so that programs that do not read events do not link an AMQP client.
package eventhubs

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	goamqp "github.com/Azure/go-amqp"

	"github.com/iothubby/iothubby/pkg/sas"
)

// DefaultConsumerGroup is every event hub's first consumer group.
const DefaultConsumerGroup = "$Default"

// ConnectionString is a parsed Event Hubs connection string:
// Endpoint=sb://host[:port]/;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=...
type ConnectionString struct {
	Host, Port          string // Port empty: 5671
	SharedAccessKeyName string
	SharedAccessKey     string
	EntityPath          string
	// UseDevelopmentEmulator selects plain AMQP (port 5672 by default), as the Event Hubs SDKs do.
	UseDevelopmentEmulator bool
}

// ParseConnectionString parses an Event Hubs connection string (split on ';', then on the first
// '='; keys compared without regard to case). Errors never contain the key.
func ParseConnectionString(s string) (ConnectionString, error) {
	var c ConnectionString
	var endpoint string
	for part := range strings.SplitSeq(strings.TrimSpace(s), ";") {
		if strings.TrimSpace(part) == "" {
			continue
		}
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			return c, errors.New("eventhubs: connection string part without '='")
		}
		switch strings.ToLower(strings.TrimSpace(k)) {
		case "endpoint":
			endpoint = v
		case "sharedaccesskeyname":
			c.SharedAccessKeyName = v
		case "sharedaccesskey":
			c.SharedAccessKey = v
		case "entitypath":
			c.EntityPath = v
		case "usedevelopmentemulator":
			c.UseDevelopmentEmulator = strings.EqualFold(v, "true")
		}
	}
	rest, ok := strings.CutPrefix(endpoint, "sb://")
	if !ok {
		return c, errors.New("eventhubs: Endpoint must be sb://host[:port]/")
	}
	hostport, _, _ := strings.Cut(rest, "/")
	if h, p, err := net.SplitHostPort(hostport); err == nil {
		c.Host, c.Port = h, p
	} else {
		c.Host = hostport
	}
	switch {
	case c.Host == "":
		return c, errors.New("eventhubs: Endpoint has no host")
	case c.SharedAccessKeyName == "" || c.SharedAccessKey == "":
		return c, errors.New("eventhubs: SharedAccessKeyName and SharedAccessKey are required")
	case c.EntityPath == "":
		return c, errors.New("eventhubs: EntityPath is required")
	}
	return c, nil
}

// endpoint is sb://host[:port]/ as the SDKs put it in audiences.
func (c ConnectionString) endpoint() string {
	h := c.Host
	if c.Port != "" {
		h = net.JoinHostPort(c.Host, c.Port)
	}
	return "sb://" + h + "/"
}

// Config configures a Client.
type Config struct {
	// ConnectionString is the endpoint's connection string (endpoints.json
	// eventHubsCompatibleConnectionString for hubsim).
	ConnectionString string
	// TLSConfig checks the server (RootCAs for hubsim's CA); nil uses the system roots.
	TLSConfig *tls.Config
	// ConsumerGroup is the consumer group receivers read as (default $Default).
	ConsumerGroup string
	// TokenTTL is the lifetime of the tokens put on $cbs (default 1 h).
	TokenTTL time.Duration
}

// Client is one AMQP connection to the endpoint.
type Client struct {
	cfg  Config
	cs   ConnectionString
	conn *goamqp.Conn

	mu   sync.Mutex
	cbs  *rpc
	mgmt *rpc
}

// Dial connects and authenticates (SASL ANONYMOUS, as the Event Hubs SDKs).
func Dial(ctx context.Context, cfg Config) (*Client, error) {
	cs, err := ParseConnectionString(cfg.ConnectionString)
	if err != nil {
		return nil, err
	}
	if cfg.ConsumerGroup == "" {
		cfg.ConsumerGroup = DefaultConsumerGroup
	}
	if cfg.TokenTTL <= 0 {
		cfg.TokenTTL = time.Hour
	}
	scheme, port := "amqps", "5671"
	if cs.UseDevelopmentEmulator {
		scheme, port = "amqp", "5672"
	}
	if cs.Port != "" {
		port = cs.Port
	}
	tc := cfg.TLSConfig
	if tc == nil {
		tc = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	tc = tc.Clone()
	if tc.ServerName == "" {
		tc.ServerName = cs.Host
	}
	conn, err := goamqp.Dial(ctx, scheme+"://"+net.JoinHostPort(cs.Host, port), &goamqp.ConnOptions{
		SASLType: goamqp.SASLTypeAnonymous(), TLSConfig: tc, HostName: cs.Host, IdleTimeout: 2 * time.Minute,
	})
	if err != nil {
		return nil, fmt.Errorf("eventhubs: connect %s: %w", net.JoinHostPort(cs.Host, port), err)
	}
	return &Client{cfg: cfg, cs: cs, conn: conn}, nil
}

// Close closes the connection (and every receiver).
func (c *Client) Close() error { return c.conn.Close() }

// EventHubName is the entity path.
func (c *Client) EventHubName() string { return c.cs.EntityPath }

// token builds an Event Hubs SAS token for audience: the resource percent-encoded as
// encodeURIComponent does, signed with the key string's UTF-8 bytes (not base64-decoded).
func (c *Client) token(ctx context.Context, audience string) (string, error) {
	return sas.Build(ctx, sas.Key(c.cs.SharedAccessKey), sas.Params{
		Resource: audience, KeyName: c.cs.SharedAccessKeyName, Expiry: time.Now().Add(c.cfg.TokenTTL),
	})
}

// rpc is a request/response pair of links (a sender and a receiver on one node).
type rpc struct {
	mu      sync.Mutex
	snd     *goamqp.Sender
	rcv     *goamqp.Receiver
	replyTo string
}

func (c *Client) newRPC(ctx context.Context, address string) (*rpc, error) {
	s, err := c.conn.NewSession(ctx, nil)
	if err != nil {
		return nil, err
	}
	replyTo := address + "-reply-" + randomID()
	snd, err := s.NewSender(ctx, address, nil)
	if err != nil {
		return nil, err
	}
	rcv, err := s.NewReceiver(ctx, address, &goamqp.ReceiverOptions{Credit: 10, TargetAddress: replyTo, Name: replyTo})
	if err != nil {
		return nil, err
	}
	return &rpc{snd: snd, rcv: rcv, replyTo: replyTo}, nil
}

// call sends one request and waits for the reply with its correlation id.
func (r *rpc) call(ctx context.Context, props map[string]any, value any) (*goamqp.Message, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	id := randomID()
	m := &goamqp.Message{
		Properties:            &goamqp.MessageProperties{MessageID: id, ReplyTo: &r.replyTo},
		ApplicationProperties: props,
		Value:                 value,
	}
	if err := r.snd.Send(ctx, m, nil); err != nil {
		return nil, err
	}
	for {
		reply, err := r.rcv.Receive(ctx, nil)
		if err != nil {
			return nil, err
		}
		_ = r.rcv.AcceptMessage(ctx, reply)
		if reply.Properties != nil && reply.Properties.CorrelationID == id {
			return reply, nil
		}
	}
}

// StatusError is a $cbs or $management request the service refused.
type StatusError struct {
	Op          string
	Status      int32
	Description string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("eventhubs: %s: status %d: %s", e.Op, e.Status, e.Description)
}

func checkStatus(op string, m *goamqp.Message) error {
	code, _ := m.ApplicationProperties["status-code"].(int32)
	desc, _ := m.ApplicationProperties["status-description"].(string)
	if code < 200 || code > 299 {
		return &StatusError{Op: op, Status: code, Description: desc}
	}
	return nil
}

// authorize puts a token for audience on $cbs.
func (c *Client) authorize(ctx context.Context, audience string) error {
	c.mu.Lock()
	if c.cbs == nil {
		r, err := c.newRPC(ctx, "$cbs")
		if err != nil {
			c.mu.Unlock()
			return fmt.Errorf("eventhubs: $cbs: %w", err)
		}
		c.cbs = r
	}
	r := c.cbs
	c.mu.Unlock()
	tok, err := c.token(ctx, audience)
	if err != nil {
		return err
	}
	reply, err := r.call(ctx, map[string]any{
		"operation": "put-token", "type": "servicebus.windows.net:sastoken", "name": audience,
	}, tok)
	if err != nil {
		return fmt.Errorf("eventhubs: put-token: %w", err)
	}
	return checkStatus("put-token", reply)
}

func (c *Client) management(ctx context.Context, props map[string]any) (map[string]any, error) {
	audience := c.cs.endpoint() + c.cs.EntityPath + "/$management"
	c.mu.Lock()
	r := c.mgmt
	c.mu.Unlock()
	if r == nil {
		if err := c.authorize(ctx, audience); err != nil {
			return nil, err
		}
		nr, err := c.newRPC(ctx, c.cs.EntityPath+"/$management")
		if err != nil {
			return nil, fmt.Errorf("eventhubs: $management: %w", err)
		}
		c.mu.Lock()
		if c.mgmt == nil {
			c.mgmt = nr
		}
		r = c.mgmt
		c.mu.Unlock()
	}
	tok, err := c.token(ctx, audience)
	if err != nil {
		return nil, err
	}
	props["name"] = c.cs.EntityPath
	props["operation"] = "READ"
	props["security_token"] = tok
	reply, err := r.call(ctx, props, []byte("[]"))
	if err != nil {
		return nil, fmt.Errorf("eventhubs: $management: %w", err)
	}
	if err := checkStatus("$management "+fmt.Sprint(props["type"]), reply); err != nil {
		return nil, err
	}
	body, ok := reply.Value.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("eventhubs: $management answer body is %T, not a map", reply.Value)
	}
	return body, nil
}

// HubProperties are the event hub's properties.
type HubProperties struct {
	Name         string
	CreatedAt    time.Time
	PartitionIDs []string
}

// Properties reads the event hub's properties ($management READ com.microsoft:eventhub).
func (c *Client) Properties(ctx context.Context) (HubProperties, error) {
	b, err := c.management(ctx, map[string]any{"type": "com.microsoft:eventhub"})
	if err != nil {
		return HubProperties{}, err
	}
	p := HubProperties{}
	p.Name, _ = b["name"].(string)
	p.CreatedAt, _ = b["created_at"].(time.Time)
	switch ids := b["partition_ids"].(type) {
	case []string:
		p.PartitionIDs = ids
	case []any:
		for _, id := range ids {
			if s, ok := id.(string); ok {
				p.PartitionIDs = append(p.PartitionIDs, s)
			}
		}
	}
	if len(p.PartitionIDs) == 0 {
		return p, errors.New("eventhubs: the event hub reports no partitions")
	}
	return p, nil
}

// PartitionProperties describe one partition.
type PartitionProperties struct {
	ID                      string
	BeginningSequenceNumber int64
	LastEnqueuedSequence    int64
	LastEnqueuedOffset      string
	LastEnqueuedTime        time.Time
	IsEmpty                 bool
}

// PartitionProperties reads a partition's properties ($management READ com.microsoft:partition).
func (c *Client) PartitionProperties(ctx context.Context, id string) (PartitionProperties, error) {
	b, err := c.management(ctx, map[string]any{"type": "com.microsoft:partition", "partition": id})
	if err != nil {
		return PartitionProperties{}, err
	}
	p := PartitionProperties{ID: id}
	p.BeginningSequenceNumber, _ = b["begin_sequence_number"].(int64)
	p.LastEnqueuedSequence, _ = b["last_enqueued_sequence_number"].(int64)
	p.LastEnqueuedOffset, _ = b["last_enqueued_offset"].(string)
	p.LastEnqueuedTime, _ = b["last_enqueued_time_utc"].(time.Time)
	p.IsEmpty, _ = b["is_partition_empty"].(bool)
	return p, nil
}

// Position is where a receiver starts: its selector filter.
type Position struct{ filter string }

// Earliest starts at the oldest retained event.
func Earliest() Position { return Position{"amqp.annotation.x-opt-offset > '-1'"} }

// Latest starts with the events enqueued after the receiver attaches.
func Latest() Position { return Position{"amqp.annotation.x-opt-offset > '@latest'"} }

// FromEnqueuedTime starts after t (millisecond precision).
func FromEnqueuedTime(t time.Time) Position {
	return Position{"amqp.annotation.x-opt-enqueued-time > '" + strconv.FormatInt(t.UnixMilli(), 10) + "'"}
}

// FromSequenceNumber starts after (or, inclusive, at) a sequence number.
func FromSequenceNumber(n int64, inclusive bool) Position {
	op := " > '"
	if inclusive {
		op = " >= '"
	}
	return Position{"amqp.annotation.x-opt-sequence-number" + op + strconv.FormatInt(n, 10) + "'"}
}

// FromOffset starts after an offset.
func FromOffset(offset string) Position {
	return Position{"amqp.annotation.x-opt-offset > '" + offset + "'"}
}

// String is the selector filter.
func (p Position) String() string { return p.filter }

// ReceiverOptions tune a partition receiver.
type ReceiverOptions struct {
	// Credit is how many events the server may send ahead (default 100); go-amqp tops it up
	// as events are read. -1: no credit until IssueCredit.
	Credit int32
	// Epoch, if set, makes this an exclusive (owner-level) receiver.
	Epoch *int64
}

// Receiver reads one partition.
type Receiver struct {
	rcv       *goamqp.Receiver
	partition string
}

// selectorFilterCode is the descriptor the Event Hubs SDKs put on selector filters.
const selectorFilterCode uint64 = 0x0000468C00000004

// Receive attaches a receiver to partition id in the client's consumer group at pos.
func (c *Client) Receive(ctx context.Context, id string, pos Position, opts *ReceiverOptions) (*Receiver, error) {
	if opts == nil {
		opts = &ReceiverOptions{}
	}
	if opts.Credit == 0 {
		opts.Credit = 100
	}
	addr := c.cs.EntityPath + "/ConsumerGroups/" + c.cfg.ConsumerGroup + "/Partitions/" + id
	if err := c.authorize(ctx, c.cs.endpoint()+addr); err != nil {
		return nil, err
	}
	s, err := c.conn.NewSession(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("eventhubs: session: %w", err)
	}
	ro := &goamqp.ReceiverOptions{
		Credit:         opts.Credit,
		SettlementMode: goamqp.ReceiverSettleModeFirst.Ptr(),
		Filters: []goamqp.LinkFilter{
			goamqp.NewLinkFilter("apache.org:selector-filter:string", selectorFilterCode, pos.filter),
		},
		Name: addr + "-" + randomID(),
	}
	if opts.Epoch != nil {
		ro.Properties = map[string]any{"com.microsoft:epoch": *opts.Epoch}
	}
	r, err := s.NewReceiver(ctx, addr, ro)
	if err != nil {
		_ = s.Close(context.Background())
		return nil, fmt.Errorf("eventhubs: receiver on %s: %w", addr, err)
	}
	return &Receiver{rcv: r, partition: id}, nil
}

// Event is one event read from the endpoint.
type Event struct {
	Partition      string
	SequenceNumber int64
	Offset         string
	EnqueuedTime   time.Time
	Body           []byte
	// DeviceID and ModuleID are IoT Hub's iothub-connection-device-id and -module-id.
	DeviceID, ModuleID string
	// Annotations are the message annotations (x-opt-*, iothub-*, dt-*).
	Annotations map[string]any
	// SystemProperties are the properties section's fields by Azure's names (message-id,
	// correlation-id, content-type, ...).
	SystemProperties map[string]any
	// Properties are the application properties.
	Properties map[string]any
}

// Next waits for the next event.
func (r *Receiver) Next(ctx context.Context) (Event, error) {
	m, err := r.rcv.Receive(ctx, nil)
	if err != nil {
		return Event{}, err
	}
	return r.event(ctx, m)
}

// event accepts m and converts it.
func (r *Receiver) event(ctx context.Context, m *goamqp.Message) (Event, error) {
	if err := r.rcv.AcceptMessage(ctx, m); err != nil {
		return Event{}, err
	}
	e := Event{Partition: r.partition, Annotations: map[string]any{}, SystemProperties: map[string]any{}, Properties: m.ApplicationProperties}
	for k, v := range m.Annotations {
		ks := fmt.Sprint(k)
		e.Annotations[ks] = v
		switch ks {
		case "x-opt-sequence-number":
			e.SequenceNumber, _ = v.(int64)
		case "x-opt-offset":
			e.Offset, _ = v.(string)
		case "x-opt-enqueued-time":
			e.EnqueuedTime, _ = v.(time.Time)
		case "iothub-connection-device-id":
			e.DeviceID, _ = v.(string)
		case "iothub-connection-module-id":
			e.ModuleID, _ = v.(string)
		}
	}
	if p := m.Properties; p != nil {
		set := func(k string, v any, ok bool) {
			if ok {
				e.SystemProperties[k] = v
			}
		}
		set("message-id", p.MessageID, p.MessageID != nil)
		set("correlation-id", p.CorrelationID, p.CorrelationID != nil)
		set("user-id", string(p.UserID), len(p.UserID) > 0)
		set("to", deref(p.To), p.To != nil)
		set("content-type", deref(p.ContentType), p.ContentType != nil)
		set("content-encoding", deref(p.ContentEncoding), p.ContentEncoding != nil)
		if p.AbsoluteExpiryTime != nil {
			set("absolute-expiry-time", *p.AbsoluteExpiryTime, true)
		}
		if p.CreationTime != nil {
			set("creation-time", *p.CreationTime, true)
		}
	}
	for _, d := range m.Data {
		e.Body = append(e.Body, d...)
	}
	return e, nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// IssueCredit lets the server send n more events (receivers made with Credit -1).
func (r *Receiver) IssueCredit(n uint32) error { return r.rcv.IssueCredit(n) }

// TryNext returns an event that has already arrived, without waiting (ok false: none).
func (r *Receiver) TryNext(ctx context.Context) (Event, bool, error) {
	m := r.rcv.Prefetched()
	if m == nil {
		return Event{}, false, nil
	}
	e, err := r.event(ctx, m)
	return e, err == nil, err
}

// Close detaches the receiver.
func (r *Receiver) Close(ctx context.Context) error { return r.rcv.Close(ctx) }

func randomID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
