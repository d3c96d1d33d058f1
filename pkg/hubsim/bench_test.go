package hubsim_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
)

// BenchmarkConnect measures SAS-over-TLS connects per second against hubsim and against a plain
// mochi broker (TLS, allow-all auth, same client), on the same machine. Each connect is a full
// TLS handshake, CONNECT, CONNACK and DISCONNECT. Compare the two ns/op figures.
func BenchmarkConnect(b *testing.B) {
	const devices = 500
	b.Run("hubsim", func(b *testing.B) {
		srv, err := hubsim.Start(context.Background(), hubsim.Config{
			StateDir: b.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", TelemetryPerDevice: -1,
		}, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer srv.Close()
		type cred struct{ id, user, pass string }
		creds := make([]cred, devices)
		for i := range creds {
			d, err := srv.Registry().Create(registry.Device{DeviceID: fmt.Sprintf("bench-%d", i)})
			if err != nil {
				b.Fatal(err)
			}
			creds[i] = cred{d.DeviceID, "localhost/" + d.DeviceID + "/?api-version=2021-04-12",
				deviceToken(b, "localhost", d.DeviceID, d.Authentication.SymmetricKey.PrimaryKey, time.Now().Add(time.Hour))}
		}
		var n atomic.Int64
		benchConnects(b, srv.Endpoints().MQTTAddress, srv.ClientTLSConfig(), func() (string, string, string) {
			c := creds[int(n.Add(1))%devices]
			return c.id, c.user, c.pass
		})
	})
	b.Run("mochi", func(b *testing.B) {
		srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: b.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, nil)
		if err != nil {
			b.Fatal(err)
		}
		clientTLS := srv.ClientTLSConfig()
		serverCert, err := tls.LoadX509KeyPair(srv.StateDir()+"/server.pem", srv.StateDir()+"/server.key")
		if err != nil {
			b.Fatal(err)
		}
		_ = srv.Close()
		caps := mqtt.NewDefaultServerCapabilities()
		caps.MaximumClientWritesPending = 128
		m := mqtt.New(&mqtt.Options{Capabilities: caps, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), SysTopicResendInterval: 3600})
		_ = m.AddHook(new(auth.AllowHook), nil)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		tl := tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{serverCert}, MinVersion: tls.VersionTLS12})
		if err := m.AddListener(listeners.NewNet("plain", tl)); err != nil {
			b.Fatal(err)
		}
		if err := m.Serve(); err != nil {
			b.Fatal(err)
		}
		defer m.Close()
		var n atomic.Int64
		benchConnects(b, ln.Addr().String(), clientTLS, func() (string, string, string) {
			id := fmt.Sprintf("bench-%d", int(n.Add(1))%devices)
			return id, "localhost/" + id + "/?api-version=2021-04-12", "SharedAccessSignature sr=x&sig=eA%3D%3D&se=1"
		})
	})
}

func benchConnects(b *testing.B, addr string, tc *tls.Config, next func() (id, user, pass string)) {
	b.ReportAllocs()
	b.SetParallelism(4)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			id, user, pass := next()
			c, err := tls.Dial("tcp", addr, tc)
			if err != nil {
				b.Error(err)
				return
			}
			if _, err := c.Write(connectPkt(4, id, user, pass, true)); err != nil {
				b.Error(err)
				return
			}
			r := bufio.NewReader(c)
			ack := make([]byte, 4)
			if _, err := io.ReadFull(r, ack); err != nil || ack[3] != 0 {
				b.Errorf("CONNACK %x %v", ack, err)
				return
			}
			_, _ = c.Write([]byte{0xe0, 0})
			_ = c.Close()
		}
	})
}
