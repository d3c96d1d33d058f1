//go:build e2e

package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

func clientTLS(t *testing.T, h *hub) *tls.Config {
	t.Helper()
	pem, err := os.ReadFile(h.ep.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("no CA in", h.ep.CAFile)
	}
	return &tls.Config{RootCAs: pool, ServerName: h.ep.HubHostName, MinVersion: tls.VersionTLS12}
}

// rawDevice is a bare paho client speaking the IoT Hub grammar by hand, for checks below the
// agent's own session logic.
type rawDevice struct {
	c    paho.Client
	lost chan error
}

func dialDevice(t *testing.T, h *hub, id, password string) (*rawDevice, error) {
	t.Helper()
	rd := &rawDevice{lost: make(chan error, 1)}
	o := paho.NewClientOptions().AddBroker("tls://" + h.ep.MQTTAddress).SetClientID(id).
		SetUsername(h.ep.HubHostName + "/" + id + "/?api-version=2021-04-12").SetPassword(password).
		SetTLSConfig(clientTLS(t, h)).SetCleanSession(false).SetProtocolVersion(4).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(20 * time.Second).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			select {
			case rd.lost <- err:
			default:
			}
		})
	rd.c = paho.NewClient(o)
	tok := rd.c.Connect()
	if !tok.WaitTimeout(waitTimeout) {
		return nil, errors.New("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { rd.c.Disconnect(50) })
	return rd, nil
}

func deviceToken(t *testing.T, h *hub, id, key string) string {
	t.Helper()
	k, err := sas.ParseKey(key)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := sas.Build(context.Background(), k, sas.Params{Resource: sas.DeviceResource(h.ep.HubHostName, id), Expiry: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func mustDevice(t *testing.T, h *hub, id string) *rawDevice {
	t.Helper()
	d := createDevice(t, h, id)
	rd, err := dialDevice(t, h, id, deviceToken(t, h, id, d.Authentication.SymmetricKey.PrimaryKey))
	if err != nil {
		t.Fatalf("connect %s: %v", id, err)
	}
	return rd
}

func (rd *rawDevice) wait(t *testing.T, tok paho.Token) {
	t.Helper()
	if !tok.WaitTimeout(waitTimeout) {
		t.Fatal("MQTT operation timed out")
	}
	if err := tok.Error(); err != nil {
		t.Fatal(err)
	}
}

// Two devices issue twin GETs at the same time, first with distinct $rids and then with the same
// ones: each receives exactly its own responses, never the other's.
func TestTwoDevicesNeverSeeEachOthersResponses(t *testing.T) {
	h := newHub(t)
	const n = 50
	devs := map[string]*rawDevice{"e2e-iso-a": mustDevice(t, h, "e2e-iso-a"), "e2e-iso-b": mustDevice(t, h, "e2e-iso-b")}
	type got struct {
		mu   sync.Mutex
		rids []string
		all  chan struct{}
	}
	recv := map[string]*got{}
	for id, rd := range devs {
		g := &got{all: make(chan struct{})}
		recv[id] = g
		rd.wait(t, rd.c.Subscribe(wire.TwinResponseFilter, 0, func(_ paho.Client, m paho.Message) {
			tp, err := wire.Parse(m.Topic())
			if err != nil || tp.Kind != wire.KindTwinResponse || tp.Status != 200 {
				t.Errorf("%s: unexpected %q", id, m.Topic())
				return
			}
			g.mu.Lock()
			g.rids = append(g.rids, tp.RequestID)
			if len(g.rids) == 2*n {
				close(g.all)
			}
			g.mu.Unlock()
		}))
	}
	var wg sync.WaitGroup
	for id, rd := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range n {
				for _, rid := range []string{fmt.Sprintf("%s-%d", id, i), fmt.Sprint(i)} {
					if tok := rd.c.Publish(wire.TwinGet(rid), 0, false, []byte{}); tok.WaitTimeout(waitTimeout) && tok.Error() != nil {
						t.Errorf("%s: publish: %v", id, tok.Error())
					}
				}
			}
		}()
	}
	wg.Wait()
	for id, g := range recv {
		select {
		case <-g.all:
		case <-time.After(waitTimeout):
			g.mu.Lock()
			t.Fatalf("%s received %d of %d responses", id, len(g.rids), 2*n)
		}
	}
	// A last request on each connection: its answer comes after anything stray that was queued.
	for id, rd := range devs {
		done := make(chan struct{})
		rd.wait(t, rd.c.Subscribe(wire.TwinResponseFilter, 0, func(_ paho.Client, m paho.Message) {
			if strings.Contains(m.Topic(), "$rid=sentinel") {
				close(done)
			}
		}))
		rd.wait(t, rd.c.Publish(wire.TwinGet("sentinel"), 0, false, []byte{}))
		select {
		case <-done:
		case <-time.After(waitTimeout):
			t.Fatalf("%s: no answer to the sentinel", id)
		}
	}
	for id, g := range recv {
		g.mu.Lock()
		own, plain := 0, 0
		for _, r := range g.rids {
			switch {
			case strings.HasPrefix(r, id+"-"):
				own++
			case !strings.HasPrefix(r, "e2e-"):
				plain++
			default:
				t.Errorf("%s received the other device's response %q", id, r)
			}
		}
		g.mu.Unlock()
		if own != n || plain != n {
			t.Errorf("%s: %d own-prefixed and %d shared-rid responses, want %d each", id, own, plain, n)
		}
	}
}

// Bad input against the real process: a truncated MQTT 5 CONNECT, garbage, malformed SAS tokens,
// an unknown topic and oversize telemetry. Each is refused or closes that one connection; the
// process stays up and serves a well-behaved device afterwards.
func TestHubsimSurvivesBadInput(t *testing.T) {
	h := newHub(t)
	cfg := clientTLS(t, h)
	rawConn := func(payload []byte) []byte {
		c, err := tls.Dial("tcp", h.ep.MQTTAddress, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(waitTimeout))
		if _, err := c.Write(payload); err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(c) // until the server closes
		return b
	}
	// MQTT 5 CONNECT cut off inside its properties: remaining length claims more than is sent.
	v5 := []byte{0x10, 0x20, 0x00, 0x04, 'M', 'Q', 'T', 'T', 0x05, 0x02, 0x00, 0x3c, 0x05, 0x11}
	if got := rawConn(v5); len(got) > 0 && !(len(got) == 4 && got[0] == 0x20 && got[3] == 0x01) {
		t.Errorf("truncated MQTT 5 CONNECT answered % x, want nothing or CONNACK 1", got)
	}
	if got := rawConn([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")); len(got) != 0 {
		t.Errorf("garbage answered % x", got)
	}

	d := createDevice(t, h, "e2e-bad")
	good := deviceToken(t, h, d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey)
	for name, pw := range map[string]string{
		"empty":           "",
		"not a token":     "hello",
		"bad escape":      strings.Replace(good, "sr=", "sr=%zz", 1),
		"no signature":    strings.Replace(good, "&sig=", "&xsig=", 1),
		"other device":    deviceToken(t, h, "e2e-other", d.Authentication.SymmetricKey.PrimaryKey),
		"tampered expiry": good[:len(good)-1] + string('0'+(good[len(good)-1]-'0'+1)%10),
	} {
		if _, err := dialDevice(t, h, d.DeviceID, pw); err == nil || !strings.Contains(err.Error(), "not Authorized") {
			t.Errorf("%s: connect err = %v, want not authorised", name, err)
		}
	}

	for name, pub := range map[string]struct {
		topic string
		size  int
	}{
		"unknown topic":    {"devices/e2e-bad/unknown", 10},
		"malformed bag":    {"devices/e2e-bad/messages/events/a=%zz", 10},
		"other device":     {"devices/e2e-other/messages/events/", 10},
		"oversize 300 KiB": {"devices/e2e-bad/messages/events/", 300 << 10},
	} {
		rd, err := dialDevice(t, h, d.DeviceID, good)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		rd.c.Publish(pub.topic, 1, false, make([]byte, pub.size))
		select {
		case <-rd.lost:
		case <-time.After(waitTimeout):
			t.Fatalf("%s: connection not closed", name)
		}
	}
	if !h.alive() {
		t.Fatal("hubsim exited")
	}
	rd := mustDevice(t, h, "e2e-after")
	rd.wait(t, rd.c.Publish("devices/e2e-after/messages/events/k=v", 1, false, []byte("still here")))
	eventually(t, "telemetry after the bad input", func() error {
		msgs, err := h.svc.Telemetry(ctxT(t), "e2e-after")
		if err == nil && (len(msgs) != 1 || string(msgs[0].Body) != "still here") {
			err = fmt.Errorf("recorded %v", msgs)
		}
		return err
	})
}
