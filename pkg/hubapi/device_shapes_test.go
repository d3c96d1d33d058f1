package hubapi

import (
	"encoding/json"
	"flag"
	"testing"
	"time"

	"github.com/iothubby/iothubby/internal/golden"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/golden/*.json from the current output")

func goldenJSON(t *testing.T, name string, v any) { t.Helper(); golden.JSON(t, name, v, *updateGolden) }

// shapeDevices are devices as hubsim's REST API answers them and the client reads and sends them: one of each authentication type,
// with and without runtime state, and the zero device.
func shapeDevices() map[string]Device {
	at := time.Date(2026, 12, 2, 4, 5, 6, 123456700, time.UTC)
	return map[string]Device{
		"device-sas-connected": {
			DeviceID: "dev-1", GenerationID: "638000000000000001", ETag: "MQ==",
			ConnectionState: Connected, Status: StatusEnabled,
			ConnectionStateUpdatedTime: at, StatusUpdatedTime: at.Add(-time.Hour), LastActivityTime: at.Add(time.Second),
			CloudToDeviceMessageCount: 3,
			Authentication: Authentication{Type: AuthSAS, SymmetricKey: SymmetricKey{
				PrimaryKey:   "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
				SecondaryKey: "HxkeHRwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE="}},
		},
		"device-selfsigned-disabled-edge": {
			DeviceID: "edge-1", GenerationID: "638000000000000002", ETag: "Mg==",
			Status: StatusDisabled, StatusReason: "maintenance",
			StatusUpdatedTime: at,
			Authentication: Authentication{Type: AuthSelfSigned, X509Thumbprint: X509Thumbprint{
				PrimaryThumbprint:   "ABABABABABABABABABABABABABABABABABABABAB",
				SecondaryThumbprint: "CDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCDCD"}},
			Capabilities: Capabilities{IoTEdge: true},
		},
		"device-ca": {
			DeviceID: "ca-1", GenerationID: "638000000000000003", ETag: "Mw==", ConnectionState: Disconnected,
			Status: StatusEnabled, Authentication: Authentication{Type: AuthCertificateAuthority},
		},
		"device-zero": {},
	}
}

// TestDeviceWireShape pins the JSON of Device (registry.Device in hubsim, service.Device in the
// client) byte for byte: Azure's device document as the service answers it (every field, nulls for unset keys, thumbprints and status reason,
// "0001-01-01T00:00:00Z" for times never set).
func TestDeviceWireShape(t *testing.T) {
	for name, d := range shapeDevices() {
		goldenJSON(t, name, d)
		var back Device
		b, _ := json.Marshal(d)
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatalf("%s: unmarshal its own JSON: %v", name, err)
		}
		if back.ConnectionState == "" {
			back.ConnectionState = d.ConnectionState
		}
		b2, _ := json.Marshal(back)
		if string(b) != string(b2) {
			t.Errorf("%s does not survive a round trip:\n%s\n%s", name, b, b2)
		}
	}
	goldenJSON(t, "device-list", []Device{shapeDevices()["device-ca"], shapeDevices()["device-sas-connected"]})
}
