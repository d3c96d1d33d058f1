package amqp

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	codec "github.com/iothubby/iothubby/pkg/amqp"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Feedback message shape (protocol-amqp.md §3.3).
const (
	FeedbackContentType = "application/vnd.microsoft.iothub.feedback.json"
	// MaxFeedbackBatch is the most records one feedback message carries, as IoT Hub.
	MaxFeedbackBatch = 64
	// maxFeedbackRecords bounds the records waiting for a receiver; the oldest go first.
	maxFeedbackRecords = 10000
)

func (s *Server) attachDeviceBound(l *Link) error {
	if !l.ClientSends {
		return codec.Errorf(codec.ErrNotAllowed, "%s only takes messages; feedback is on /messages/serviceBound/feedback", l.Address)
	}
	if err := l.Require(serviceConnect, "sending cloud-to-device messages needs ServiceConnect"); err != nil {
		return err
	}
	l.OnMessage = s.deviceBound
	return nil
}

// deviceOf reads the device ID from a C2D message's to: /devices/{id}/messages/devicebound,
// percent-decoded once (not turning + into a space).
func deviceOf(to string) (string, error) {
	p := NormalizeAddress(to)
	seg := strings.Split(p, "/")
	if len(seg) != 4 || !strings.EqualFold(seg[0], "devices") || !strings.EqualFold(seg[2], "messages") || !strings.EqualFold(seg[3], "devicebound") {
		if len(seg) == 6 && strings.EqualFold(seg[2], "modules") {
			return "", errors.New("module cloud-to-device messages are not supported by hubsim")
		}
		return "", fmt.Errorf("to %q is not /devices/{id}/messages/devicebound", to)
	}
	id, err := url.PathUnescape(seg[1])
	if err != nil || id == "" {
		return "", fmt.Errorf("to %q: bad device id", to)
	}
	return id, nil
}

func propString(v any) (string, bool) {
	switch v := v.(type) {
	case string:
		return v, true
	case codec.Symbol:
		return string(v), true
	case bool, int8, int16, int32, int64, uint8, uint16, uint32, uint64, float32, float64:
		return fmt.Sprint(v), true
	case codec.UUID:
		return v.String(), true
	case time.Time:
		return v.UTC().Format(time.RFC3339Nano), true
	}
	return "", false
}

func (s *Server) deviceBound(d *Delivery) {
	m := d.Message
	reject := func(cond codec.Symbol, format string, args ...any) {
		d.Reject(codec.Errorf(cond, format, args...))
	}
	if m.Properties == nil {
		reject(codec.ErrMicrosoftArgument, "the message has no properties section (to is required)")
		return
	}
	dev, err := deviceOf(m.Properties.To)
	if err != nil {
		reject(codec.ErrMicrosoftArgument, "%v", err)
		return
	}
	var body []byte
	switch {
	case len(m.Data) > 0:
		for _, b := range m.Data {
			body = append(body, b...)
		}
	case m.HasValue:
		switch v := m.Value.(type) {
		case []byte:
			body = v
		case string:
			body = []byte(v)
		case nil:
		default:
			reject(codec.ErrMicrosoftArgument, "an amqp-value body must be binary or a string, not %T", v)
			return
		}
	case len(m.Sequence) > 0:
		reject(codec.ErrMicrosoftArgument, "amqp-sequence bodies are not supported")
		return
	}
	msg := broker.C2DMessage{
		MessageID:       codec.IDString(m.Properties.MessageID),
		CorrelationID:   codec.IDString(m.Properties.CorrelationID),
		UserID:          string(m.Properties.UserID),
		ContentType:     string(m.Properties.ContentType),
		ContentEncoding: string(m.Properties.ContentEncoding),
		ExpiryTime:      m.Properties.AbsoluteExpiryTime,
		Body:            body,
	}
	for _, e := range m.ApplicationProperties {
		k, _ := e.Key.(string)
		v, ok := propString(e.Value)
		if !ok {
			reject(codec.ErrMicrosoftArgument, "application property %q is a %T", k, e.Value)
			return
		}
		if k == "iothub-ack" {
			switch v {
			case "none", "positive", "negative", "full":
				msg.Ack = v
			default:
				reject(codec.ErrMicrosoftArgument, "iothub-ack %q is not none, positive, negative or full", v)
				return
			}
			continue
		}
		msg.Properties = append(msg.Properties, wire.Property{Key: k, Value: v})
	}
	if !msg.ExpiryTime.IsZero() && !msg.ExpiryTime.After(s.cfg.Clock.Now()) {
		// already expired: IoT Hub drops it, with feedback when asked
		d.Accept()
		if msg.MessageID == "" {
			msg.MessageID = broker.NewMessageID()
		}
		s.feedbackFor(dev, &msg)(broker.FeedbackExpired)
		return
	}
	if msg.Ack != "" && msg.Ack != "none" {
		if msg.MessageID == "" {
			msg.MessageID = broker.NewMessageID()
		}
		msg.OnOutcome = s.feedbackFor(dev, &msg)
	}
	if _, err := s.cfg.C2D.SendC2D(dev, msg); err != nil {
		switch {
		case errors.Is(err, wire.ErrDeviceNotFound):
			reject(codec.ErrNotFound, "%v", err)
		case errors.Is(err, wire.ErrQueueDepthExceeded):
			reject(codec.ErrResourceLimit, "%v", err)
		case errors.Is(err, wire.ErrMessageTooLarge):
			reject(codec.ErrMessageSizeExceeded, "%v", err)
		case errors.Is(err, wire.ErrArgumentInvalid):
			reject(codec.ErrMicrosoftArgument, "%v", err)
		default:
			reject(codec.ErrInternal, "%v", err)
		}
		return
	}
	d.Accept()
}

// feedbackFor returns the outcome callback for a message: it queues a feedback record when the
// message's iothub-ack asks for that outcome.
func (s *Server) feedbackFor(dev string, m *broker.C2DMessage) func(string) {
	ack, mid := m.Ack, m.MessageID
	gen := ""
	if id, ok := s.cfg.Policies.Identity(dev); ok {
		gen = id.GenerationID
	}
	return func(status string) {
		positive := status == broker.FeedbackSuccess
		if ack == "full" || (ack == "positive" && positive) || (ack == "negative" && !positive) {
			s.feedback.add(feedbackRecord{
				OriginalMessageID: mid, EnqueuedTimeUTC: s.cfg.Clock.Now().UTC().Format("2006-01-02T15:04:05.000Z"),
				StatusCode: status, Description: status, DeviceID: dev, DeviceGenerationID: gen,
			})
		}
	}
}

func (s *Server) attachFeedback(l *Link) error {
	if l.ClientSends {
		return codec.Errorf(codec.ErrNotAllowed, "%s is for receiving feedback", l.Address)
	}
	if err := l.Require(serviceConnect, "receiving feedback needs ServiceConnect"); err != nil {
		return err
	}
	s.feedback.register(l)
	l.Go(func(ctx context.Context) {
		<-ctx.Done()
		s.feedback.unregister(l)
	})
	return nil
}

type feedbackRecord struct {
	OriginalMessageID  string `json:"originalMessageId"`
	EnqueuedTimeUTC    string `json:"enqueuedTimeUtc"`
	StatusCode         string `json:"statusCode"`
	Description        string `json:"description"`
	DeviceID           string `json:"deviceId"`
	DeviceGenerationID string `json:"deviceGenerationId"`
}

// feedbackQueue holds the hub's feedback records and hands batches to feedback receivers, one
// batch in flight per receiver; a batch released or lost with its link is queued again.
type feedbackQueue struct {
	s         *Server
	kick      chan struct{}
	mu        sync.Mutex
	records   []feedbackRecord
	receivers []*Link
	busy      map[*Link]bool
	next      int
}

func newFeedbackQueue(s *Server) *feedbackQueue {
	return &feedbackQueue{s: s, kick: make(chan struct{}, 1), busy: map[*Link]bool{}}
}

func (q *feedbackQueue) signal() {
	select {
	case q.kick <- struct{}{}:
	default:
	}
}

func (q *feedbackQueue) add(r feedbackRecord) {
	q.mu.Lock()
	if len(q.records) >= maxFeedbackRecords {
		q.records = q.records[1:]
		q.s.log.Warn("feedback queue full; dropping the oldest record")
	}
	q.records = append(q.records, r)
	q.mu.Unlock()
	q.signal()
}

func (q *feedbackQueue) register(l *Link) {
	q.mu.Lock()
	q.receivers = append(q.receivers, l)
	q.mu.Unlock()
	q.signal()
}

func (q *feedbackQueue) unregister(l *Link) {
	q.mu.Lock()
	for i, r := range q.receivers {
		if r == l {
			q.receivers = append(q.receivers[:i], q.receivers[i+1:]...)
			break
		}
	}
	q.mu.Unlock()
}

// run batches: after a kick it waits FeedbackDelay for more records (unless a batch is full),
// then hands out batches.
func (q *feedbackQueue) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-q.kick:
		}
		q.mu.Lock()
		full := len(q.records) >= MaxFeedbackBatch
		q.mu.Unlock()
		if !full {
			t := time.NewTimer(q.s.cfg.FeedbackDelay)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		q.deliver()
	}
}

func (q *feedbackQueue) deliver() {
	for {
		q.mu.Lock()
		var l *Link
		for i := range q.receivers {
			r := q.receivers[(q.next+i)%len(q.receivers)]
			if !q.busy[r] {
				l = r
				q.next = (q.next + i + 1) % len(q.receivers)
				break
			}
		}
		if l == nil || len(q.records) == 0 {
			q.mu.Unlock()
			return
		}
		n := min(len(q.records), MaxFeedbackBatch)
		batch := append([]feedbackRecord(nil), q.records[:n]...)
		q.records = q.records[n:]
		q.busy[l] = true
		q.mu.Unlock()

		body, _ := json.Marshal(batch)
		var tag [16]byte
		_, _ = rand.Read(tag[:])
		m := &codec.Message{
			Properties: &codec.Properties{MessageID: broker.NewMessageID(), UserID: []byte(hubName(q.s.cfg.HostName)),
				ContentType: FeedbackContentType},
			Annotations: codec.Map{{Key: codec.Symbol("iothub-enqueuedtime"), Value: q.s.cfg.Clock.Now()}},
			Data:        [][]byte{body},
		}
		err := l.Post(m, tag[:], func(st codec.DeliveryState, err error) { q.settled(l, batch, st, err) })
		if err != nil {
			q.unregister(l) // detached: its unregistering goroutine may not have run yet
			q.settled(l, batch, nil, err)
		}
	}
}

// settled ends a batch's flight: accepted or rejected batches are done (IoT Hub dead-letters
// rejected ones); released, modified or lost ones go back to the front of the queue.
func (q *feedbackQueue) settled(l *Link, batch []feedbackRecord, st codec.DeliveryState, err error) {
	q.mu.Lock()
	if !q.busy[l] {
		q.mu.Unlock()
		return
	}
	delete(q.busy, l)
	requeue := false
	switch st.(type) {
	case *codec.Accepted, *codec.Rejected:
	default:
		requeue = true
	}
	if requeue {
		q.records = append(batch, q.records...)
		if err != nil {
			q.s.log.Debug("feedback batch not delivered; queued again", zap.Error(err))
		}
	}
	q.mu.Unlock()
	q.signal()
}

// hubName is the hub's name: the first label of its host name.
func hubName(host string) string {
	name, _, _ := strings.Cut(host, ".")
	return name
}
