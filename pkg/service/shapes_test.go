package service

import (
	"flag"
	"testing"

	"github.com/iothubby/iothubby/internal/golden"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/golden/*.json from the current output")

func goldenJSON(t *testing.T, name string, v any) { t.Helper(); golden.JSON(t, name, v, *updateGolden) }

// TestCreateBodyWireShape pins the body CreateDevice sends for a bare ID: Azure's full device
// document (the one pkg/hubapi's shape tests pin) with the defaults Microsoft's SDKs fill.
func TestCreateBodyWireShape(t *testing.T) {
	goldenJSON(t, "device-create-bare", withDefaults(Device{DeviceID: "new-1"}))
}
