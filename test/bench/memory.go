package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hubsim/endpoints"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// benchMemory holds n devices connected to a separate hubsim process, once as hub.Sessions and
// once as bare paho clients with the same subscriptions, and compares goroutines and
// heap+stack bytes per device measured in this process. After an unmeasured warm-up, rounds alternate paho/ours three times; medians are compared.
func benchMemory(ctx context.Context, binDir string, n int, report func(string, float64, bool, string)) error {
	if os.Getenv("BENCH_HEAP_PROFILE") != "" {
		runtime.MemProfileRate = 1
	}
	state, err := os.MkdirTemp("", "iothubby-bench-mem-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(state)
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "hubsim"), "serve", "--state", state,
		"--mqtt-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0", "--amqp-addr", "127.0.0.1:0", "--log-level", "warn")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}()
	var ep endpoints.Endpoints
	deadline := time.Now().Add(30 * time.Second)
	for {
		if ep, err = endpoints.Read(state); err == nil && ep.PID == cmd.Process.Pid {
			break
		}
		if time.Now().After(deadline) {
			return errors.New("hubsim did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	svc, err := service.New(service.Config{ConnectionString: ep.ServiceConnectionString, Address: ep.HTTPSAddress, CAFile: ep.CAFile})
	if err != nil {
		return err
	}
	defer svc.Close()
	keys, err := createDevices(ctx, svc, n)
	if err != nil {
		return err
	}
	pem, err := os.ReadFile(ep.CAFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	tlsCfg := &tls.Config{RootCAs: pool, ServerName: ep.HubHostName, MinVersion: tls.VersionTLS12}

	// Warm up both kinds once (TLS, paho and zap set-up costs paid once per process), unmeasured.
	for _, hold := range []func() (func(), error){
		func() (func(), error) { return holdPaho(ctx, ep, tlsCfg, keys[:parallel]) },
		func() (func(), error) { return holdSessions(ctx, ep, tlsCfg, keys[:parallel]) },
	} {
		release, err := hold()
		if err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
		release()
	}

	type sample struct{ goroutines, bytes float64 }
	results := map[string][]sample{}
	for round := 1; round <= 3; round++ {
		for _, kind := range []string{"paho", "iothubby"} {
			before := measure()
			var release func()
			if kind == "paho" {
				release, err = holdPaho(ctx, ep, tlsCfg, keys)
			} else {
				release, err = holdSessions(ctx, ep, tlsCfg, keys)
			}
			if err != nil {
				return fmt.Errorf("%s: %w", kind, err)
			}
			after := measure()
			if prof := os.Getenv("BENCH_HEAP_PROFILE"); prof != "" && round == 1 {
				if f, err := os.Create(prof + "." + kind); err == nil {
					_ = pprof.Lookup("heap").WriteTo(f, 0)
					f.Close()
				}
				if f, err := os.Create(prof + ".goroutines." + kind); err == nil {
					_ = pprof.Lookup("goroutine").WriteTo(f, 1)
					f.Close()
				}
			}
			release()
			s := sample{float64(after.goroutines-before.goroutines) / float64(n), float64(after.bytes-before.bytes) / float64(n)}
			fmt.Printf("memory: round %d %-8s %d devices: %.1f goroutines/device, %.1f KiB heap+stack/device\n",
				round, kind, n, s.goroutines, s.bytes/1024)
			results[kind] = append(results[kind], s)
		}
	}
	med := func(kind string, f func(sample) float64) float64 {
		var xs []float64
		for _, s := range results[kind] {
			xs = append(xs, f(s))
		}
		return median(xs)
	}
	g := med("iothubby", func(s sample) float64 { return s.goroutines }) / med("paho", func(s sample) float64 { return s.goroutines })
	b := med("iothubby", func(s sample) float64 { return s.bytes }) / med("paho", func(s sample) float64 { return s.bytes })
	report("goroutines/device ours/paho", g, g <= 1.2, "<= 1.2")
	report("heap+stack/device ours/paho", b, b <= 1.2, "<= 1.2")
	return nil
}

type usage struct {
	goroutines int
	bytes      uint64
}

func measure() usage {
	// Each GC can halve a goroutine stack that is mostly unused; a few rounds let stacks grown
	// during connects settle to what an idle device really holds.
	for range 4 {
		runtime.GC()
	}
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return usage{runtime.NumGoroutine(), ms.HeapInuse + ms.StackInuse}
}

func createDevices(ctx context.Context, svc *service.Client, n int) ([]sas.Key, error) {
	keys := make([]sas.Key, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				d, err := svc.CreateDevice(ctx, service.Device{DeviceID: devID(i)})
				if err == nil {
					keys[i], err = sas.ParseKey(d.Authentication.SymmetricKey.PrimaryKey)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return keys, <-errs
}

// forEach runs f for 0..n-1 on 32 workers and returns the first error.
func forEach(n int, f func(i int) error) error {
	var next atomic.Int64
	var first error
	var once sync.Once
	var wg sync.WaitGroup
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					once.Do(func() { first = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	return first
}

// holdPaho connects one bare paho client per device, subscribed to the four filters a device
// session holds, and returns a function that disconnects them all.
func holdPaho(ctx context.Context, ep endpoints.Endpoints, tlsCfg *tls.Config, keys []sas.Key) (func(), error) {
	clients, err := connectBare(ctx, ep, tlsCfg, keys)
	return func() { disconnectAll(clients) }, err
}

// connectBare connects one bare paho client per device (in parallel), each subscribed to the
// four filters a device session holds. The clients that connected are returned even on error.
func connectBare(ctx context.Context, ep endpoints.Endpoints, tlsCfg *tls.Config, keys []sas.Key) ([]paho.Client, error) {
	clients := make([]paho.Client, len(keys))
	noop := func(paho.Client, paho.Message) {}
	err := forEach(len(keys), func(i int) error {
		c, err := connectPaho(ctx, ep.MQTTAddress, ep.HubHostName, devID(i), keys[i], tlsCfg)
		if err != nil {
			return err
		}
		clients[i] = c
		tok := c.SubscribeMultiple(map[string]byte{wire.C2DFilter(devID(i)): 1, wire.TwinResponseFilter: 0,
			wire.TwinDesiredFilter: 0, wire.MethodsFilter: 0}, noop)
		if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			return fmt.Errorf("subscribe: %v", tok.Error())
		}
		return nil
	})
	return clients, err
}

// holdSessions runs one hub.Session per device until each reports connected. Like the paho
// clients, the sessions share one TLS configuration, as a fleet in one process does.
func holdSessions(ctx context.Context, ep endpoints.Endpoints, tlsCfg *tls.Config, keys []sas.Key) (func(), error) {
	sessions := make([]*hub.Session, len(keys))
	release := func() {
		_ = forEach(len(sessions), func(i int) error {
			if s := sessions[i]; s != nil {
				cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				_ = s.Close(cctx)
			}
			return nil
		})
	}
	err := forEach(len(keys), func(i int) error {
		s, err := hub.New(hub.Config{Host: ep.HubHostName, Address: ep.MQTTAddress, DeviceID: devID(i), Signer: keys[i],
			TLSConfig: tlsCfg, KeepAlive: 60 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			return err
		}
		sessions[i] = s
		wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		return s.WaitConnected(wctx)
	})
	return release, err
}
