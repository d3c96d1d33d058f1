package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/sas"
)

const parallel = 32

// benchConnect compares connect rates: hubsim versus a plain mochi broker serving the same
// certificate, both in this process, with identical paho clients.
func benchConnect(ctx context.Context, n, rounds int, report func(string, float64, bool, string)) error {
	srv, stop, err := startHub(ctx, nil)
	if err != nil {
		return err
	}
	defer stop()
	host := srv.Endpoints().HubHostName
	keys, err := createHubDevices(srv, n)
	if err != nil {
		return err
	}

	plainAddr, stopPlain, err := startPlainMochi(srv.CA())
	if err != nil {
		return err
	}
	defer stopPlain()

	tlsCfg := srv.ClientTLSConfig()
	targets := []struct {
		name, addr string
	}{{"hubsim", srv.Endpoints().MQTTAddress}, {"plain mochi", plainAddr}}
	rates := map[string][]float64{}
	for r := range rounds {
		for _, tg := range targets {
			rate, err := connectRound(ctx, tg.addr, host, tlsCfg, keys)
			if err != nil {
				return fmt.Errorf("%s round %d: %w", tg.name, r+1, err)
			}
			fmt.Printf("connect: round %d %-11s %d devices, %.0f connects/s\n", r+1, tg.name, n, rate)
			rates[tg.name] = append(rates[tg.name], rate)
		}
	}
	ratio := median(rates["hubsim"]) / median(rates["plain mochi"])
	report("connect hubsim / plain mochi", ratio, ratio >= 0.7, ">= 0.7")
	return nil
}

func devID(i int) string { return fmt.Sprintf("bench-%05d", i) }

// connectRound connects len(keys) devices, 32 at a time, measures the rate, then disconnects all.
func connectRound(ctx context.Context, addr, host string, tlsCfg *tls.Config, keys []sas.Key) (float64, error) {
	n := len(keys)
	clients := make([]paho.Client, n)
	var next atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				c, err := connectPaho(ctx, addr, host, devID(i), keys[i], tlsCfg)
				if err != nil {
					errOnce.Do(func() { firstErr = fmt.Errorf("device %d: %w", i, err) })
					return
				}
				clients[i] = c
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	disconnectAll(clients)
	if firstErr != nil {
		return 0, firstErr
	}
	return float64(n) / elapsed.Seconds(), nil
}

func pahoOptions(addr, host, id string, key sas.Key, tlsCfg *tls.Config) *paho.ClientOptions {
	o := paho.NewClientOptions()
	o.AddBroker("tls://" + addr)
	o.SetClientID(id)
	o.SetUsername(host + "/" + id + "/?api-version=2021-04-12")
	o.SetCredentialsProvider(func() (string, string) {
		tok, _ := sas.Build(context.Background(), key, sas.Params{Resource: sas.DeviceResource(host, id), Expiry: time.Now().Add(time.Hour)})
		return host + "/" + id + "/?api-version=2021-04-12", tok
	})
	o.SetTLSConfig(tlsCfg)
	o.SetCleanSession(false)
	o.SetProtocolVersion(4)
	o.SetAutoReconnect(false)
	o.SetConnectRetry(false)
	o.SetKeepAlive(60 * time.Second)
	o.SetConnectTimeout(30 * time.Second)
	return o
}

func connectPaho(ctx context.Context, addr, host, id string, key sas.Key, tlsCfg *tls.Config) (paho.Client, error) {
	c := paho.NewClient(pahoOptions(addr, host, id, key, tlsCfg))
	tok := c.Connect()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(60 * time.Second):
		return nil, fmt.Errorf("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	return c, nil
}

func disconnectAll(clients []paho.Client) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, parallel)
	for _, c := range clients {
		if c == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			c.Disconnect(100)
			<-sem
		}()
	}
	wg.Wait()
}

// startPlainMochi runs mochi with an allow-all auth hook and nothing else, on a TLS listener
// whose certificate the same CA signed.
func startPlainMochi(ca *pki.CA) (string, func(), error) {
	cert, err := ca.Issue(pki.LeafOptions{CommonName: "localhost", DNSNames: []string{"localhost"},
		IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	if err != nil {
		return "", nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	addr := l.Addr().String()
	l.Close()
	opts := &mochi.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	s := mochi.New(opts)
	if err := s.AddHook(new(auth.AllowHook), nil); err != nil {
		return "", nil, err
	}
	tl := listeners.NewTCP(listeners.Config{ID: "plain", Address: addr,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}})
	if err := s.AddListener(tl); err != nil {
		return "", nil, err
	}
	if err := s.Serve(); err != nil {
		return "", nil, err
	}
	return addr, func() { s.Close() }, nil
}
