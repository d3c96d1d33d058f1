//go:build windows

package tpm

import (
	"errors"

	"github.com/google/go-tpm/tpm2/transport"
)

// openDevice fails: TPM character devices are a Linux thing.
func openDevice(string) (transport.TPMCloser, error) {
	return nil, errors.New("tpm: the device backend needs a TPM character device (Linux); use swtpm or the simulator")
}
