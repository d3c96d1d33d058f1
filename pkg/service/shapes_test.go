package service

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"
	"time"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/golden/*.json from the current output")

// goldenJSON compares the exact bytes that encoding/json writes for v (what goes on the wire)
// with testdata/golden/<name>.json, or rewrites that file with -update.
func goldenJSON(t *testing.T, name string, v any) {
	t.Helper()
	got, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("%s: marshal: %v", name, err)
	}
	got = append(got, '\n')
	path := filepath.Join("testdata", "golden", name+".json")
	if *updateGolden {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("golden %s: %v (run with -update to create it)", name, err)
	}
	if string(want) != string(got) {
		t.Errorf("%s: the wire shape changed\n--- want %s\n%s--- got\n%s", name, path, want, got)
	}
}

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
