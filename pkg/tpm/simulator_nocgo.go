//go:build !cgo

package tpm

import (
	"errors"

	"github.com/google/go-tpm/tpm2/transport"
)

type simTPM = transport.TPMCloser

// openSimulator fails: the in-process simulator is C code.
func openSimulator(Config) (simTPM, *stateDir, bool, error) {
	return nil, nil, false, errors.New("tpm: the simulator backend is not available: this binary was built without cgo (CGO_ENABLED=0)")
}
