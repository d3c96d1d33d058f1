package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	goamqp "github.com/Azure/go-amqp"
	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
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

	clients := make([]paho.Client, 0, n)
	defer func() { disconnectAll(clients) }()
	inbox := make([]chan string, n)
	for i := range n {
		d, err := srv.Registry().Create(registry.Device{DeviceID: devID(i)})
		if err != nil {
			return err
		}
		key, err := sas.ParseKey(d.Authentication.SymmetricKey.PrimaryKey)
		if err != nil {
			return err
		}
		c, err := connectPaho(ctx, ep.MQTTAddress, ep.HubHostName, devID(i), key, tlsCfg)
		if err != nil {
			return fmt.Errorf("device %d: %w", i, err)
		}
		clients = append(clients, c)
		ch := make(chan string, 16)
		inbox[i] = ch
		tok := c.Subscribe("devices/"+devID(i)+"/messages/devicebound/#", 1, func(_ paho.Client, m paho.Message) { ch <- string(m.Payload()) })
		if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			return fmt.Errorf("subscribe %d: %v", i, tok.Error())
		}
	}

	var (
		mu        sync.Mutex
		amqpRT    []time.Duration
		restRT    []time.Duration
		next      atomic.Int64
		first     error
		once      sync.Once
		wg        sync.WaitGroup
		failed    atomic.Bool
		deviceFor = func(w int) (string, chan string) { return devID(w), inbox[w] }
	)
	fail := func(err error) { once.Do(func() { first = err; failed.Store(true) }) }
	for w := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id, in := deviceFor(w)
			to := "/devices/" + id + "/messages/devicebound"
			for k := 0; ; k++ {
				i := int(next.Add(1) - 1)
				if i >= 2*samples || ctx.Err() != nil || failed.Load() {
					return
				}
				body := strconv.Itoa(i)
				start := time.Now()
				if k%2 == 0 {
					sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
					err := snd.Send(sctx, &goamqp.Message{Properties: &goamqp.MessageProperties{To: &to}, Data: [][]byte{[]byte(body)}}, nil)
					cancel()
					if err != nil {
						fail(fmt.Errorf("amqp send: %w", err))
						return
					}
				} else if _, err := svc.SendC2D(ctx, id, service.C2DMessage{Body: body}); err != nil {
					fail(fmt.Errorf("rest send: %w", err))
					return
				}
				select {
				case got := <-in:
					if got != body {
						fail(fmt.Errorf("device %s got %q, want %q", id, got, body))
						return
					}
				case <-time.After(30 * time.Second):
					fail(fmt.Errorf("device %s: message %s not delivered", id, body))
					return
				}
				el := time.Since(start)
				mu.Lock()
				if k%2 == 0 {
					amqpRT = append(amqpRT, el)
				} else {
					restRT = append(restRT, el)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return first
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	ap50, ap99 := pct(amqpRT, 0.50), pct(amqpRT, 0.99)
	rp50, rp99 := pct(restRT, 0.50), pct(restRT, 0.99)
	fmt.Printf("c2d: %d devices, %d samples: AMQP send to device p50 %v p99 %v; REST (/hubsim/) send to device p50 %v p99 %v\n",
		n, len(amqpRT)+len(restRT), ap50, ap99, rp50, rp99)
	report(fmt.Sprintf("c2d AMQP p50 / REST p50 (%d)", n), float64(ap50)/float64(rp50), true, "(informational)")
	r99 := float64(ap99) / float64(rp99)
	report(fmt.Sprintf("c2d AMQP p99 / REST p99 (%d)", n), r99, r99 <= 2, "<= 2")
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
