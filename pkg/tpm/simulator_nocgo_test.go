//go:build !cgo

package tpm

import (
	"strings"
	"testing"
)

func TestSimulatorNeedsCgo(t *testing.T) {
	_, err := Open(t.Context(), Config{Backend: BackendSimulator, StateDir: t.TempDir()}, nil)
	if err == nil || !strings.Contains(err.Error(), "without cgo") {
		t.Errorf("Open(simulator) without cgo: %v", err)
	}
}
