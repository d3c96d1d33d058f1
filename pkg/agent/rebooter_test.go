package agent

import (
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/zap"
)

// TestRebooterOnlyWhenNeeded: a device has a rebooter when reboot or firmware updates are
// configured, or when its state directory holds a reboot state file at start (whose pending
// report is then loaded as before); a device with none of these has none.
func TestRebooterOnlyWhenNeeded(t *testing.T) {
	newDev := func(t *testing.T, mutate func(*Config)) *Device {
		t.Helper()
		c := Default()
		c.ConnectionString = "HostName=hub.example;DeviceId=dev1;SharedAccessKey=" + base64.StdEncoding.EncodeToString(make([]byte, 32))
		c.Address = "127.0.0.1:1"
		c.StateDir = t.TempDir()
		mutate(&c)
		d, err := New(c, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(d.Close)
		return d
	}
	if d := newDev(t, func(*Config) {}); d.reboot != nil {
		t.Fatal("a device without reboot, firmware or reboot state has a rebooter")
	}
	if d := newDev(t, func(c *Config) { c.Reboot.Mode = "simulate" }); d.reboot == nil {
		t.Fatal("reboot.mode simulate: no rebooter")
	}

	d := newDev(t, func(*Config) {})
	state := `{"bootCount":3,"report":{"reboot":{"state":"done","mode":"simulate"},"bootCount":3}}`
	if err := os.WriteFile(filepath.Join(d.cfg.StateDir, "reboot-dev1.json"), []byte(state), 0o600); err != nil {
		t.Fatal(err)
	}
	_, release, err := d.startRun(context.Background())
	defer release()
	if err != nil {
		t.Fatal(err)
	}
	if d.reboot == nil {
		t.Fatal("a reboot state file at start: no rebooter made to settle and report it")
	}
	d.reboot.mu.Lock()
	defer d.reboot.mu.Unlock()
	if d.reboot.rb.BootCount != 3 || d.reboot.rb.Report == nil {
		t.Fatalf("reboot state not loaded: %+v", d.reboot.rb)
	}
}
