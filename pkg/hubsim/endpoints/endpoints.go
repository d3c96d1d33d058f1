// Package endpoints is hubsim's endpoints.json: the file a running hubsim writes into its state
// directory so that scripts, tests and clients find its addresses, CA and service connection
// string without parsing logs. It depends on nothing but the standard library, so clients can
// import it without pulling in the emulator.
package endpoints

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// File is the name of the file in the state directory.
const File = "endpoints.json"

// Endpoints is what endpoints.json holds. The connection string includes a key: the file is
// written mode 0600.
type Endpoints struct {
	HubHostName  string `json:"hubHostName"`
	MQTTAddress  string `json:"mqttAddress"`
	HTTPSAddress string `json:"httpsAddress"`
	// AMQPAddress is the service AMQP (amqps) endpoint: C2D send, feedback.
	AMQPAddress             string `json:"amqpAddress,omitempty"`
	ServiceConnectionString string `json:"serviceConnectionString"`
	// EventHubsCompatibleConnectionString reaches the built-in endpoint (telemetry) with an
	// Event Hubs client: Endpoint=sb://host:port/;SharedAccessKeyName=...;SharedAccessKey=...;
	// EntityPath=<EventHubsCompatibleName>, on the AMQP address.
	EventHubsCompatibleConnectionString string `json:"eventHubsCompatibleConnectionString,omitempty"`
	EventHubsCompatibleName             string `json:"eventHubsCompatibleName,omitempty"`
	CAFile                              string `json:"caFile"`
	// IDScope and DPSConnectionString describe hubsim's DPS (device endpoint on the same MQTT and
	// HTTPS addresses; service API on the HTTPS address).
	IDScope             string `json:"idScope,omitempty"`
	DPSConnectionString string `json:"dpsConnectionString,omitempty"`
	PID                 int    `json:"pid"`
}

// Read reads stateDir/endpoints.json.
func Read(stateDir string) (Endpoints, error) {
	var e Endpoints
	b, err := os.ReadFile(filepath.Join(stateDir, File))
	if err != nil {
		return e, err
	}
	if err := json.Unmarshal(b, &e); err != nil {
		return e, fmt.Errorf("hubsim: %s: %w", filepath.Join(stateDir, File), err)
	}
	return e, nil
}
