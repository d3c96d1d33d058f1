package amqp_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	goamqp "github.com/Azure/go-amqp"
	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap/zaptest"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
)

type hub struct {
	t   *testing.T
	srv *hubsim.Server
}

func startHub(t *testing.T) *hub {
	t.Helper()
	srv, err := hubsim.Start(context.Background(), hubsim.Config{
		StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", AMQPAddr: "127.0.0.1:0",
	}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return &hub{t: t, srv: srv}
}

// service connects as azure-iothub does (no SASL, put-token on $cbs) and returns the session.
func (h *hub) service() *goamqp.Session {
	t := h.t
	t.Helper()
	c, err := goamqp.Dial(ctxT(t), "amqps://"+h.srv.Endpoints().AMQPAddress, &goamqp.ConnOptions{TLSConfig: h.srv.ClientTLSConfig()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	s, err := c.NewSession(ctxT(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	if code, desc := newCBS(t, s).put(t, "localhost", serviceToken(t, h.srv.Registry(), "localhost", "iothubowner", time.Now().Add(time.Hour))); code != 200 {
		t.Fatalf("put-token %d %s", code, desc)
	}
	return s
}

func (h *hub) connect(d registry.Device) chan paho.Message {
	t := h.t
	t.Helper()
	k, _ := sas.ParseKey(d.Authentication.SymmetricKey.PrimaryKey)
	tok, err := sas.Build(context.Background(), k, sas.Params{Resource: sas.DeviceResource("localhost", d.DeviceID), Expiry: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	o := paho.NewClientOptions().AddBroker("ssl://" + h.srv.Endpoints().MQTTAddress).SetTLSConfig(h.srv.ClientTLSConfig()).
		SetClientID(d.DeviceID).SetUsername("localhost/" + d.DeviceID + "/?api-version=2021-04-12").SetPassword(tok).
		SetCleanSession(false).SetProtocolVersion(4).SetAutoReconnect(false).SetConnectTimeout(waitTimeout)
	c := paho.NewClient(o)
	if tk := c.Connect(); !tk.WaitTimeout(waitTimeout) || tk.Error() != nil {
		t.Fatalf("device connect: %v", tk.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	got := make(chan paho.Message, 64)
	if tk := c.Subscribe("devices/"+d.DeviceID+"/messages/devicebound/#", 1, func(_ paho.Client, m paho.Message) { got <- m }); !tk.WaitTimeout(waitTimeout) || tk.Error() != nil {
		t.Fatalf("subscribe: %v", tk.Error())
	}
	return got
}

type feedbackRecord struct {
	OriginalMessageID  string `json:"originalMessageId"`
	EnqueuedTimeUTC    string `json:"enqueuedTimeUtc"`
	StatusCode         string `json:"statusCode"`
	Description        string `json:"description"`
	DeviceID           string `json:"deviceId"`
	DeviceGenerationID string `json:"deviceGenerationId"`
}

// feedback receives one feedback message, checks its envelope (protocol-amqp.md §3.3) and
// returns its records.
func feedback(t *testing.T, r *goamqp.Receiver) []feedbackRecord {
	t.Helper()
	m, err := r.Receive(ctxT(t), nil)
	if err != nil {
		t.Fatalf("feedback: %v", err)
	}
	if err := r.AcceptMessage(ctxT(t), m); err != nil {
		t.Fatal(err)
	}
	if len(m.DeliveryTag) != 16 {
		t.Errorf("delivery tag of %d bytes, want 16 (a GUID)", len(m.DeliveryTag))
	}
	if m.Properties == nil || m.Properties.ContentType == nil || *m.Properties.ContentType != "application/vnd.microsoft.iothub.feedback.json" || string(m.Properties.UserID) != "localhost" {
		t.Errorf("properties %+v", m.Properties)
	}
	if _, ok := m.Annotations["iothub-enqueuedtime"].(time.Time); !ok {
		t.Errorf("iothub-enqueuedtime is %T, want a timestamp", m.Annotations["iothub-enqueuedtime"])
	}
	var recs []feedbackRecord
	if len(m.Data) != 1 || json.Unmarshal(m.Data[0], &recs) != nil || len(recs) == 0 {
		t.Fatalf("body %q is not a non-empty JSON array in one data section", m.Data)
	}
	return recs
}

// TestC2DToMQTTDeviceWithFeedback: a message sent over AMQP while the device is offline waits,
// reaches the device's MQTT connection with the system properties, and its completion comes
// back as Success feedback; an expired message gives Expired feedback when negative feedback
// is asked for, none when only positive is.
func TestC2DToMQTTDeviceWithFeedback(t *testing.T) {
	h := startHub(t)
	ctx := ctxT(t)
	s := h.service()
	fb, err := s.NewReceiver(ctx, "/messages/serviceBound/feedback", &goamqp.ReceiverOptions{Credit: 10})
	if err != nil {
		t.Fatal(err)
	}
	snd, err := s.NewSender(ctx, "/messages/devicebound", nil)
	if err != nil {
		t.Fatal(err)
	}
	d, err := h.srv.Registry().Create(registry.Device{DeviceID: "dev-1"})
	if err != nil {
		t.Fatal(err)
	}
	to := "/devices/dev-1/messages/devicebound"
	exp := time.Now().Add(time.Hour).Truncate(time.Millisecond)
	mid := [16]byte{0x6f, 0x1c, 0x0a, 0x9d, 0x3c, 0x4f, 0x4e, 0x8a, 0x9b, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77}
	if err := snd.Send(ctx, &goamqp.Message{
		Properties:            &goamqp.MessageProperties{MessageID: goamqp.UUID(mid), CorrelationID: "corr-1", To: &to, AbsoluteExpiryTime: &exp},
		ApplicationProperties: map[string]any{"iothub-ack": "full", "color": "blue"},
		Data:                  [][]byte{[]byte("hello device")},
	}, nil); err != nil {
		t.Fatalf("send while offline: %v", err)
	}
	if n := h.srv.Broker().PendingC2D("dev-1"); n != 1 {
		t.Fatalf("pending %d, want 1", n)
	}
	got := h.connect(d)
	var m paho.Message
	select {
	case m = <-got:
	case <-time.After(waitTimeout):
		t.Fatal("the device got nothing")
	}
	if string(m.Payload()) != "hello device" {
		t.Fatalf("payload %q", m.Payload())
	}
	for _, want := range []string{"%24.mid=6f1c0a9d-3c4f-4e8a-9b11-223344556677", "%24.cid=corr-1", "%24.to=%2Fdevices%2Fdev-1%2Fmessages%2FdeviceBound",
		"%24.exp=", "iothub-ack=full", "color=blue"} {
		if !strings.Contains(m.Topic(), want) {
			t.Errorf("topic %s lacks %s", m.Topic(), want)
		}
	}
	recs := feedback(t, fb) // paho acknowledged the message
	if len(recs) != 1 || recs[0].OriginalMessageID != "6f1c0a9d-3c4f-4e8a-9b11-223344556677" || recs[0].StatusCode != "Success" ||
		recs[0].Description != "Success" || recs[0].DeviceID != "dev-1" || recs[0].DeviceGenerationID != d.GenerationID {
		t.Fatalf("feedback %+v", recs)
	}
	if _, err := time.Parse(time.RFC3339, recs[0].EnqueuedTimeUTC); err != nil {
		t.Errorf("enqueuedTimeUtc %q: %v", recs[0].EnqueuedTimeUTC, err)
	}

	past := time.Now().Add(-time.Minute)
	for _, c := range []struct{ id, ack string }{{"exp-positive", "positive"}, {"exp-negative", "negative"}} {
		if err := snd.Send(ctx, &goamqp.Message{
			Properties:            &goamqp.MessageProperties{MessageID: c.id, To: &to, AbsoluteExpiryTime: &past},
			ApplicationProperties: map[string]any{"iothub-ack": c.ack}, Data: [][]byte{[]byte("late")},
		}, nil); err != nil {
			t.Fatalf("send %s: %v", c.id, err)
		}
	}
	recs = feedback(t, fb)
	if len(recs) != 1 || recs[0].OriginalMessageID != "exp-negative" || recs[0].StatusCode != "Expired" || recs[0].Description != "Expired" {
		t.Fatalf("expiry feedback %+v", recs)
	}
	select {
	case m := <-got:
		t.Fatalf("an expired message reached the device: %s", m.Topic())
	default:
	}
}

// TestC2DLimits: 50 messages wait per device and the 51st is refused with
// amqp:resource-limit-exceeded; over 64 KB is amqp:link:message-size-exceeded; an unknown
// device amqp:not-found; the link survives each refusal.
func TestC2DLimits(t *testing.T) {
	h := startHub(t)
	ctx := ctxT(t)
	snd, err := h.service().NewSender(ctx, "/messages/devicebound", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.srv.Registry().Create(registry.Device{DeviceID: "full"}); err != nil {
		t.Fatal(err)
	}
	msg := func(dev string, body []byte) *goamqp.Message {
		to := "/devices/" + dev + "/messages/devicebound"
		return &goamqp.Message{Properties: &goamqp.MessageProperties{To: &to}, Data: [][]byte{body}}
	}
	refused := func(what string, err error, cond goamqp.ErrCond) {
		t.Helper()
		var ae *goamqp.Error
		if !errors.As(err, &ae) || ae.Condition != cond || ae.Description == "" {
			t.Fatalf("%s: %v, want rejected with %s and a description", what, err, cond)
		}
	}
	refused("too large", snd.Send(ctx, msg("full", make([]byte, 64*1024+1)), nil), "amqp:link:message-size-exceeded")
	for i := range 50 {
		if err := snd.Send(ctx, msg("full", []byte("x")), nil); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	refused("51st", snd.Send(ctx, msg("full", []byte("x")), nil), "amqp:resource-limit-exceeded")
	refused("unknown device", snd.Send(ctx, msg("nobody", []byte("x")), nil), "amqp:not-found")
	if n := h.srv.Broker().PendingC2D("full"); n != 50 {
		t.Fatalf("pending %d, want 50", n)
	}
}

// TestC2DExpiresWhileOffline: a message that expires in the queue of a device that never
// connects is found by the periodic sweep, and its Expired feedback goes out without any other
// traffic for that device.
func TestC2DExpiresWhileOffline(t *testing.T) {
	h := startHub(t)
	ctx := ctxT(t)
	s := h.service()
	fb, err := s.NewReceiver(ctx, "/messages/serviceBound/feedback", &goamqp.ReceiverOptions{Credit: 10})
	if err != nil {
		t.Fatal(err)
	}
	snd, err := s.NewSender(ctx, "/messages/devicebound", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.srv.Registry().Create(registry.Device{DeviceID: "sleeper"}); err != nil {
		t.Fatal(err)
	}
	to := "/devices/sleeper/messages/devicebound"
	exp := time.Now().Add(time.Second)
	if err := snd.Send(ctx, &goamqp.Message{
		Properties:            &goamqp.MessageProperties{MessageID: "short-lived", To: &to, AbsoluteExpiryTime: &exp},
		ApplicationProperties: map[string]any{"iothub-ack": "negative"}, Data: [][]byte{[]byte("x")},
	}, nil); err != nil {
		t.Fatal(err)
	}
	recs := feedback(t, fb) // within the 5 s sweep after the expiry
	if len(recs) != 1 || recs[0].OriginalMessageID != "short-lived" || recs[0].StatusCode != "Expired" || recs[0].DeviceID != "sleeper" {
		t.Fatalf("feedback %+v", recs)
	}
	if n := h.srv.Broker().PendingC2D("sleeper"); n != 0 {
		t.Fatalf("pending %d after expiry", n)
	}
}
