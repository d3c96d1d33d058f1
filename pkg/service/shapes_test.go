package service

import (
	"flag"
	"testing"
	"time"

	"github.com/iothubby/iothubby/internal/golden"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/golden/*.json from the current output")

func goldenJSON(t *testing.T, name string, v any) { t.Helper(); golden.JSON(t, name, v, *updateGolden) }

// TestDeviceWireShape pins the JSON of service.Device byte for byte: the devices of hubsim's
// registry shape test as the client holds them, and the body CreateDevice sends for a bare ID.
// Since the merge they are hubapi.Device and render exactly as hubsim answers.
func TestDeviceWireShape(t *testing.T) {
	at := time.Date(2026, 12, 2, 4, 5, 6, 123456700, time.UTC)
	for name, d := range map[string]Device{
		"device-sas-connected": {
			DeviceID: "dev-1", GenerationID: "638000000000000001", ETag: "MQ==",
			ConnectionState: "Connected", Status: "enabled",
			ConnectionStateUpdatedTime: at, StatusUpdatedTime: at.Add(-time.Hour), LastActivityTime: at.Add(time.Second),
			CloudToDeviceMessageCount: 3,
			Authentication: Authentication{Type: "sas", SymmetricKey: SymmetricKey{
				PrimaryKey:   "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
				SecondaryKey: "HxkeHRwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE="}},
		},
		"device-selfsigned-disabled-edge": {
			DeviceID: "edge-1", GenerationID: "638000000000000002", ETag: "Mg==",
			Status: "disabled", StatusReason: "maintenance",
			StatusUpdatedTime: at,
			Authentication: Authentication{Type: "selfSigned", X509Thumbprint: X509Thumbprint{
				PrimaryThumbprint:   "ABABABABABABABABABABABABABABABABABABABAB",
				SecondaryThumbprint: "CDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCD"}},
			Capabilities: Capabilities{IoTEdge: true},
		},
		"device-ca": {
			DeviceID: "ca-1", GenerationID: "638000000000000003", ETag: "Mw==", ConnectionState: "Disconnected",
			Status: "enabled", Authentication: Authentication{Type: "certificateAuthority"},
		},
		"device-zero": {},
		// What CreateDevice sends for Device{DeviceID: "new-1"}.
		"device-create-bare": withDefaults(Device{DeviceID: "new-1"}),
	} {
		goldenJSON(t, name, d)
	}
}

// TestTwinWireShape pins the JSON of service.Twin byte for byte: the twins of hubsim's twin shape
// test as the client holds them.
func TestTwinWireShape(t *testing.T) {
	full := Twin{DeviceID: "dev-1", ETag: "AAAAAAAAAAc=", Version: 7, Status: "enabled", ConnectionState: "Connected",
		LastActivityTime: "2026-12-02T04:05:07.1234567Z", Tags: map[string]any{"site": "lab", "floor": 3.0}}
	full.Properties.Desired = map[string]any{"interval": 5.0, "$version": 4.0,
		"$metadata": map[string]any{"$lastUpdated": "2026-12-02T04:05:06.1234567Z", "$lastUpdatedVersion": 4.0}}
	full.Properties.Reported = map[string]any{"fw": "1.0", "$version": 2.0, "$metadata": map[string]any{"$lastUpdated": "2026-12-02T04:05:06.1234567Z"}}
	edge := Twin{DeviceID: "edge-1", ETag: "AAAAAAAAAAE=", Version: 1, Status: "disabled", ConnectionState: "Disconnected",
		LastActivityTime: "0001-01-01T00:00:00Z", Tags: map[string]any{}}
	edge.Properties.Desired = map[string]any{"$version": 1.0, "$metadata": map[string]any{"$lastUpdated": "2026-12-02T04:05:06.1234567Z"}}
	edge.Properties.Reported = map[string]any{"$version": 1.0, "$metadata": map[string]any{"$lastUpdated": "2026-12-02T04:05:06.1234567Z"}}
	for name, tw := range map[string]Twin{"twin-sas-connected": full, "twin-selfsigned-edge": edge, "twin-zero": {}} {
		goldenJSON(t, name, tw)
	}
}
