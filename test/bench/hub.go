package main

import (
	"context"
	"os"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
)

// startHub runs hubsim in this process on free loopback ports with a temporary state directory
// and no telemetry record; the returned function stops it and removes the directory. mod may
// adjust the configuration.
func startHub(ctx context.Context, mod func(*hubsim.Config)) (*hubsim.Server, func(), error) {
	state, err := os.MkdirTemp("", "iothubby-bench-")
	if err != nil {
		return nil, nil, err
	}
	cfg := hubsim.Config{StateDir: state, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", TelemetryPerDevice: -1}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := hubsim.Start(ctx, cfg, zap.NewNop())
	if err != nil {
		os.RemoveAll(state)
		return nil, nil, err
	}
	return srv, func() { srv.Close(); os.RemoveAll(state) }, nil
}

// createDevices registers n SAS devices named devID(i) and returns their primary keys.
func createHubDevices(srv *hubsim.Server, n int) ([]sas.Key, error) {
	keys := make([]sas.Key, n)
	for i := range n {
		d, err := srv.Registry().Create(registry.Device{DeviceID: devID(i)})
		if err != nil {
			return nil, err
		}
		if keys[i], err = sas.ParseKey(d.Authentication.SymmetricKey.PrimaryKey); err != nil {
			return nil, err
		}
	}
	return keys, nil
}
