package hubapi

import "testing"

// TestTwinWireShape pins the JSON of the service view of a twin (hubsim's twins.Twin, the
// client's service.Twin) byte for byte: a connected sas device's twin with tags and both property
// sections, a self-signed edge device's, and the zero twin.
func TestTwinWireShape(t *testing.T) {
	reason := "maintenance"
	full := Twin{DeviceID: "dev-1", ETag: "AAAAAAAAAAc=", DeviceETag: "MQ==", Version: 7, Status: "enabled",
		StatusUpdateTime: "2026-12-02T04:05:06.1234567Z", ConnectionState: "Connected", LastActivityTime: "2026-12-02T04:05:07.1234567Z",
		CloudToDeviceMessageCount: 2, AuthenticationType: "sas",
		X509Thumbprint: map[string]any{"primaryThumbprint": nil, "secondaryThumbprint": nil},
		Capabilities:   map[string]any{"iotEdge": false},
		Tags:           map[string]any{"site": "lab", "floor": 3.0}}
	full.Properties.Desired = map[string]any{"interval": 5.0, "$version": 4.0,
		"$metadata": map[string]any{"$lastUpdated": "2026-12-02T04:05:06.1234567Z", "$lastUpdatedVersion": 4.0}}
	full.Properties.Reported = map[string]any{"fw": "1.0", "$version": 2.0, "$metadata": map[string]any{"$lastUpdated": "2026-12-02T04:05:06.1234567Z"}}
	edge := Twin{DeviceID: "edge-1", ETag: "AAAAAAAAAAE=", DeviceETag: "Mg==", Version: 1, Status: "disabled", StatusReason: &reason,
		StatusUpdateTime: "0001-01-01T00:00:00Z", ConnectionState: "Disconnected", LastActivityTime: "0001-01-01T00:00:00Z",
		AuthenticationType: "selfSigned",
		X509Thumbprint:     map[string]any{"primaryThumbprint": "ABABABABABABABABABABABABABABABABABABABAB", "secondaryThumbprint": nil},
		Capabilities:       map[string]any{"iotEdge": true}, Tags: map[string]any{}}
	edge.Properties.Desired = map[string]any{"$version": 1.0, "$metadata": map[string]any{"$lastUpdated": "2026-12-02T04:05:06.1234567Z"}}
	edge.Properties.Reported = map[string]any{"$version": 1.0, "$metadata": map[string]any{"$lastUpdated": "2026-12-02T04:05:06.1234567Z"}}
	for name, tw := range map[string]Twin{"twin-sas-connected": full, "twin-selfsigned-edge": edge, "twin-zero": {}} {
		goldenJSON(t, name, tw)
	}
}
