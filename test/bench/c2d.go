package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"time"

	goamqp "github.com/Azure/go-amqp"
	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/service"
)

// benchC2D measures the cloud-to-device round trip (service send to the device's MQTT
// delivery) over hubsim's AMQP endpoint (go-amqp sender on /messages/devicebound, after a $cbs
// put-token, as azure-iothub does) against the same trip through hubsim's REST addition
// (POST /hubsim/devices/{id}/messages/devicebound) in the same run. n devices each have one
// worker that alternates the two kinds; p50 and p99 are compared. Target: p99 ratio <= 2.
func benchC2D(ctx context.Context, n, samples int, report func(string, float64, bool, string)) error {
	state, err := os.MkdirTemp("", "iothubby-bench-c2d-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(state)
	srv, err := hubsim.Start(ctx, hubsim.Config{StateDir: state, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", AMQPAddr: "127.0.0.1:0", TelemetryPerDevice: -1}, zap.NewNop())
	if err != nil {
		return err
	}
	defer srv.Close()
	ep := srv.Endpoints()
	svc, err := service.New(service.Config{ConnectionString: ep.ServiceConnectionString, Address: ep.HTTPSAddress, CAFile: ep.CAFile})
	if err != nil {
		return err
	}
	defer svc.Close()
	tlsCfg := srv.ClientTLSConfig()

	dctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	conn, err := goamqp.Dial(dctx, "amqps://"+ep.AMQPAddress, &goamqp.ConnOptions{TLSConfig: tlsCfg})
	if err != nil {
		return err
	}
	defer conn.Close()
	sess, err := conn.NewSession(dctx, nil)
	if err != nil {
		return err
	}
	if err := putToken(dctx, sess, srv); err != nil {
		return err
	}
	snd, err := sess.NewSender(dctx, "/messages/devicebound", nil)
	if err != nil {
		return err
	}

	inbox := make([]chan string, n)
	clients, err := connectSwarm(ctx, srv, n, func(i int, c paho.Client) error {
		ch := make(chan string, 16)
		inbox[i] = ch
		return subscribeWait(c, "devices/"+devID(i)+"/messages/devicebound/#", 1, func(_ paho.Client, m paho.Message) { ch <- string(m.Payload()) })
	})
	defer func() { disconnectAll(clients) }()
	if err != nil {
		return err
	}

	// one worker per device, so a device never has two messages in flight; the sample's
	// number is the body the device must receive
	roundTrip := func(send func(id, body string) error) func(w, i int) error {
		return func(w, i int) error {
			id, body := devID(w), strconv.Itoa(i)
			if err := send(id, body); err != nil {
				return err
			}
			select {
			case got := <-inbox[w]:
				if got != body {
					return fmt.Errorf("device %s got %q, want %q", id, got, body)
				}
				return nil
			case <-time.After(30 * time.Second):
				return fmt.Errorf("device %s: message %s not delivered", id, body)
			}
		}
	}
	viaAMQP := roundTrip(func(id, body string) error {
		to := "/devices/" + id + "/messages/devicebound"
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := snd.Send(sctx, &goamqp.Message{Properties: &goamqp.MessageProperties{To: &to}, Data: [][]byte{[]byte(body)}}, nil); err != nil {
			return fmt.Errorf("amqp send: %w", err)
		}
		return nil
	})
	viaREST := roundTrip(func(id, body string) error {
		if _, err := svc.SendC2D(ctx, id, service.C2DMessage{Body: body}); err != nil {
			return fmt.Errorf("rest send: %w", err)
		}
		return nil
	})
	amqpRT, restRT, err := pairedLatency(ctx, n, samples, viaAMQP, viaREST)
	if err != nil {
		return err
	}
	reportPair(report, "c2d (AMQP vs the /hubsim/ REST send, to the device)", "c2d AMQP", "REST", n, amqpRT, restRT, 2)
	return nil
}

// putToken authorises the session's connection with a service SAS, as azure-iothub does.
func putToken(ctx context.Context, sess *goamqp.Session, srv *hubsim.Server) error {
	p, ok := srv.Registry().Policy("service")
	if !ok {
		return fmt.Errorf("no service policy")
	}
	k, err := sas.ParseKey(p.PrimaryKey)
	if err != nil {
		return err
	}
	host := srv.Endpoints().HubHostName
	tok, err := sas.Build(ctx, k, sas.Params{Resource: host, KeyName: "service", Expiry: time.Now().Add(time.Hour), RawResource: true})
	if err != nil {
		return err
	}
	snd, err := sess.NewSender(ctx, "$cbs", nil)
	if err != nil {
		return err
	}
	defer snd.Close(ctx)
	rcv, err := sess.NewReceiver(ctx, "$cbs", &goamqp.ReceiverOptions{Credit: 1})
	if err != nil {
		return err
	}
	defer rcv.Close(ctx)
	replyTo := "cbs"
	if err := snd.Send(ctx, &goamqp.Message{
		Properties:            &goamqp.MessageProperties{MessageID: "1", ReplyTo: &replyTo},
		ApplicationProperties: map[string]any{"operation": "put-token", "type": "servicebus.windows.net:sastoken", "name": host},
		Value:                 tok,
	}, nil); err != nil {
		return err
	}
	m, err := rcv.Receive(ctx, nil)
	if err != nil {
		return err
	}
	if code, _ := m.ApplicationProperties["status-code"].(int32); code != 200 {
		return fmt.Errorf("put-token answered %v: %v", m.ApplicationProperties["status-code"], m.ApplicationProperties["status-description"])
	}
	return rcv.AcceptMessage(ctx, m)
}
