package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/dps"
	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
)

// benchDPS compares, in one hubsim, N devices doing the full DPS flow over MQTT (TLS connect,
// register, poll, then a hub connect with the key they attested with) against the same N
// devices doing only the hub connect. hubsim answers retry-after 0, so the figure is the cost of
// the flow, not of waiting. Target: dps/plain >= 0.4 (a registration is a second TLS handshake).
func benchDPS(ctx context.Context, n, rounds int, report func(string, float64, bool, string)) error {
	srv, stop, err := startHub(ctx, func(c *hubsim.Config) { c.DPSRetryAfter = -1 })
	if err != nil {
		return err
	}
	defer stop()
	groupKey := registry.GenerateKey()
	if _, err := srv.DPS().PutEnrollment(hubapi.Enrollment{EnrollmentGroupID: "bench",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: groupKey}}}, true, ""); err != nil {
		return err
	}
	gk, err := sas.ParseKey(groupKey)
	if err != nil {
		return err
	}
	ep := srv.Endpoints()
	tlsCfg := srv.ClientTLSConfig()
	keys := make([]sas.Key, n)
	for i := range n {
		keys[i] = sas.DeriveDeviceKey(gk, devID(i))
	}
	rates := map[string][]float64{}
	for r := range rounds {
		// DPS first: it creates the hub devices the plain round then connects.
		var next atomic.Int64
		var firstErr error
		var once sync.Once
		clients := make([]paho.Client, n)
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
					cred, _ := attest.FromKey(keys[i])
					res, err := dps.Register(ctx, dps.Config{Endpoint: ep.MQTTAddress, ServerName: "localhost", RootCAs: srv.CA().Pool(),
						IDScope: ep.IDScope, RegistrationID: devID(i), Credential: cred, Timeout: time.Minute})
					if err == nil {
						host, _ := res.HubHostAndAddress()
						clients[i], err = connectPaho(ctx, ep.MQTTAddress, host, res.DeviceID, keys[i], tlsCfg)
					}
					if err != nil {
						once.Do(func() { firstErr = fmt.Errorf("device %d: %w", i, err) })
						return
					}
				}
			}()
		}
		wg.Wait()
		elapsed := time.Since(start)
		disconnectAll(clients)
		if firstErr != nil {
			return fmt.Errorf("dps round %d: %w", r+1, firstErr)
		}
		rate := float64(n) / elapsed.Seconds()
		fmt.Printf("dps: round %d full flow   %d devices, %.0f devices/s\n", r+1, n, rate)
		rates["dps"] = append(rates["dps"], rate)

		plain, err := connectRound(ctx, ep.MQTTAddress, ep.HubHostName, tlsCfg, keys)
		if err != nil {
			return fmt.Errorf("plain round %d: %w", r+1, err)
		}
		fmt.Printf("dps: round %d plain TLS   %d devices, %.0f connects/s\n", r+1, n, plain)
		rates["plain"] = append(rates["plain"], plain)
	}
	ratio := median(rates["dps"]) / median(rates["plain"])
	report("dps registrations / plain TLS connects", ratio, ratio >= 0.4, ">= 0.4")
	return nil
}
