package agent

import (
	"context"
	"encoding/base64"
	"fmt"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/tpm"
)

// TPMConfig selects the TPM that holds the device's identity when dps.attestation is tpm. The
// agent reads (or creates and persists) the endorsement key at 0x81010001 and the storage root
// key at 0x81000001, imports the keys DPS sends to 0x81000100, and signs every SAS token with
// TPM2_HMAC: the key never leaves the TPM.
type TPMConfig struct {
	// Backend is device (a TPM character device), swtpm (a software TPM started with
	// --flags not-need-init,startup-clear) or simulator (an in-process reference TPM for
	// tests; its state is kept in stateDir/tpm-simulator; one per process).
	Backend string `yaml:"backend"`
	// Path is the device (default /dev/tpmrm0) or the swtpm address, tcp://host:port or
	// unix:///path/to/socket.
	Path string `yaml:"path"`
}

// tpmOpenTimeout bounds opening the TPM and reading or creating its keys (creating an RSA
// primary key can take seconds on a slow TPM).
const tpmOpenTimeout = 2 * time.Minute

func (t TPMConfig) config(stateDir string) tpm.Config {
	c := tpm.Config{Backend: t.Backend, Path: t.Path}
	if t.Backend == tpm.BackendSimulator {
		c.StateDir = filepath.Join(stateDir, "tpm-simulator")
	}
	return c
}

func (t TPMConfig) check(stateDir string) error {
	if t.Backend == "" {
		return fmt.Errorf("%w: dps.attestation is tpm: set tpm.backend (device, swtpm or simulator)", ErrConfig)
	}
	if err := t.config(stateDir).Validate(); err != nil {
		return fmt.Errorf("%w: tpm: %w", ErrConfig, err)
	}
	return nil
}

// openTPM opens the configured TPM, makes it the device's credential and, when no
// registration ID is configured, takes the one derived from the endorsement key.
func openTPM(cfg *Config, id *identity, log *zap.Logger) (*tpm.Device, error) {
	ctx, cancel := context.WithTimeout(context.Background(), tpmOpenTimeout)
	defer cancel()
	dev, err := tpm.Open(ctx, cfg.TPM.config(cfg.StateDir), log.Named("tpm"))
	if err != nil {
		return nil, fmt.Errorf("%w: tpm: %w", ErrConfig, err)
	}
	id.cred, _ = attest.FromTPM(dev)
	if id.registrationID == "" {
		id.registrationID = dev.RegistrationID()
		id.deviceID = id.registrationID
	}
	return dev, nil
}

// closeTPM releases the TPM (by Close, or when New fails).
func (d *Device) closeTPM() {
	d.tpmOnce.Do(func() {
		if d.tpm != nil {
			_ = d.tpm.Close()
		}
	})
}

// TPMIdentity is what an individual enrollment needs from a device's TPM: the endorsement key
// (base64 of its TPM2B_PUBLIC, as DPS and `az iot dps enrollment create --endorsement-key`
// take it), the storage root key, and the registration ID the agent will use.
type TPMIdentity struct {
	RegistrationID string `json:"registrationId"`
	EndorsementKey string `json:"endorsementKey"`
	StorageRootKey string `json:"storageRootKey"`
}

// ReadTPMIdentity opens the TPM of cfg (creating and persisting its endorsement and storage root
// keys if they are missing) and returns what enrolling the device needs.
func ReadTPMIdentity(cfg Config, log *zap.Logger) (TPMIdentity, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.DPS.Attestation != "tpm" {
		return TPMIdentity{}, fmt.Errorf("%w: dps.attestation is not tpm", ErrConfig)
	}
	id, err := cfg.resolve()
	if err != nil {
		return TPMIdentity{}, err
	}
	dev, err := openTPM(&cfg, &id, log)
	if err != nil {
		return TPMIdentity{}, err
	}
	defer dev.Close()
	return TPMIdentity{
		RegistrationID: id.registrationID,
		EndorsementKey: base64.StdEncoding.EncodeToString(dev.EndorsementKey()),
		StorageRootKey: base64.StdEncoding.EncodeToString(dev.StorageRootKey()),
	}, nil
}
