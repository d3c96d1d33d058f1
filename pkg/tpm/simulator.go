//go:build cgo

package tpm

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/google/go-tpm-tools/simulator"
)

// simulatorInUse guards the in-process simulator, which is one global C object per process.
// simulator.Get would block until the holder closes it; TryLock turns that into an error.
// This is the package's only package-level state, and it mirrors the C global it guards.
var simulatorInUse sync.Mutex

// openSimulator starts the in-process reference TPM with the hierarchy seeds derived from the
// seed kept in the state directory, so its EK and SRK are the same after a restart.
// Everything else the simulator holds is gone when the process exits: the identity key is
// restored from the state directory by Open.
func openSimulator(cfg Config) (_ *simTPM, _ *stateDir, seedCreated bool, err error) {
	if !simulatorInUse.TryLock() {
		return nil, nil, false, ErrSimulatorBusy
	}
	defer func() {
		if err != nil {
			simulatorInUse.Unlock()
		}
	}()
	st, err := openStateDir(cfg.StateDir)
	if err != nil {
		return nil, nil, false, err
	}
	seed, created, err := st.seed()
	if err != nil {
		return nil, nil, false, err
	}
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		return nil, nil, false, fmt.Errorf("tpm: starting the in-process simulator: %w", err)
	}
	return &simTPM{sim: sim}, st, created, nil
}

// simTPM is a transport.TPMCloser over the in-process simulator.
type simTPM struct {
	mu     sync.Mutex
	sim    *simulator.Simulator
	closed bool
}

func (s *simTPM) Send(cmd []byte) ([]byte, error) {
	if len(cmd) < tpmHeaderSize {
		return nil, errors.New("tpm: simulator: command shorter than a TPM header")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errTransportClosed
	}
	if _, err := s.sim.Write(cmd); err != nil {
		return nil, fmt.Errorf("tpm: simulator: %w", err)
	}
	rsp, err := io.ReadAll(s.sim)
	if err != nil {
		return nil, fmt.Errorf("tpm: simulator: %w", err)
	}
	return rsp, nil
}

// Close shuts the simulator down and lets this process open it again.
func (s *simTPM) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	err := s.sim.Close()
	simulatorInUse.Unlock()
	return err
}
