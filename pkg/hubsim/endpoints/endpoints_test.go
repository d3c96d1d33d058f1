package endpoints

import (
	"os"
	"path/filepath"
	"testing"
)

func TestRead(t *testing.T) {
	dir := t.TempDir()
	if _, err := Read(dir); !os.IsNotExist(err) {
		t.Fatalf("missing file: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, File), []byte(`{"hubHostName":"h","mqttAddress":"127.0.0.1:1","pid":7}`), 0o600); err != nil {
		t.Fatal(err)
	}
	e, err := Read(dir)
	if err != nil || e.HubHostName != "h" || e.MQTTAddress != "127.0.0.1:1" || e.PID != 7 {
		t.Fatalf("%+v %v", e, err)
	}
	if err := os.WriteFile(filepath.Join(dir, File), []byte(`{"hubHostName":`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(dir); err == nil {
		t.Fatal("truncated file accepted")
	}
}
