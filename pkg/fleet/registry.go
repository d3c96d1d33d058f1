package fleet

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/service"
)

// registry creates the fleet's devices in the hub's identity registry with the bulk registry
// operation (service.MaxBulkDevices per call). Each device's key is generated here and kept in
// its state directory (device.key, 0600); a device that already exists is reused with the key
// the registry holds.
type registry struct {
	c    *Config
	log  *zap.Logger
	svc  *service.Client
	host string
	keys map[string]string
}

func newRegistry(c *Config, log *zap.Logger) (*registry, error) {
	b, err := attest.ReadSecretFile(c.Registry.ConnectionStringFile, attest.FileOptions{AllowInsecureKeyFile: c.DPS.AllowInsecureKeyFile})
	if err != nil {
		return nil, fmt.Errorf("%w: registry.connectionStringFile: %w", ErrConfig, err)
	}
	svc, err := service.New(service.Config{ConnectionString: strings.TrimSpace(string(b)),
		Address: c.Registry.ServiceAddress, CAFile: c.TLS.CAFile})
	if err != nil {
		return nil, fmt.Errorf("%w: registry: %w", ErrConfig, err)
	}
	return &registry{c: c, log: log, svc: svc, host: svc.HostName(), keys: map[string]string{}}, nil
}

func (r *registry) keyFile(id string) string { return filepath.Join(r.c.StateDir, id, "device.key") }

// ensure creates (or reuses) every device, 100 per call; per-device errors other than
// "already exists" are reported together.
func (r *registry) ensure(ctx context.Context, ids []string) error {
	var bad []string
	for start := 0; start < len(ids); start += service.MaxBulkDevices {
		batch := ids[start:min(len(ids), start+service.MaxBulkDevices)]
		rows := make([]service.BulkDevice, len(batch))
		for i, id := range batch {
			key, err := r.localKey(id)
			if err != nil {
				return err
			}
			r.keys[id] = key
			rows[i] = service.BulkDevice{ID: id, ImportMode: service.ImportCreate, Status: "enabled",
				Authentication: &service.Authentication{Type: "sas", SymmetricKey: service.SymmetricKey{PrimaryKey: key, SecondaryKey: key}}}
		}
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		res, err := r.svc.BulkDevices(cctx, rows)
		cancel()
		if err != nil && res == nil {
			return fmt.Errorf("fleet: registry bulk create (devices %s..%s): %w", batch[0], batch[len(batch)-1], err)
		}
		for _, e := range res.Errors {
			if e.ErrorCode == "DeviceAlreadyExists" || strings.Contains(e.ErrorCode, "AlreadyExists") {
				if err := r.reuse(ctx, e.DeviceID); err != nil {
					bad = append(bad, fmt.Sprintf("%s: %v", e.DeviceID, err))
				}
				continue
			}
			bad = append(bad, fmt.Sprintf("%s: %s %s", e.DeviceID, e.ErrorCode, e.ErrorStatus))
		}
	}
	if len(bad) > 0 {
		more := ""
		if len(bad) > 5 {
			more = fmt.Sprintf(" (and %d more)", len(bad)-5)
			bad = bad[:5]
		}
		return fmt.Errorf("fleet: registry: %d devices could not be created: %s%s", len(bad), strings.Join(bad, "; "), more)
	}
	r.log.Info("registry devices ready", zap.Int("devices", len(ids)))
	return nil
}

// reuse takes an existing device's primary key from the registry and keeps it locally.
func (r *registry) reuse(ctx context.Context, id string) error {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	d, err := r.svc.GetDevice(cctx, id)
	if err != nil {
		return err
	}
	if d.Authentication.SymmetricKey.PrimaryKey == "" {
		return errors.New("exists without a symmetric key")
	}
	k := d.Authentication.SymmetricKey.PrimaryKey
	r.keys[id] = k
	return os.WriteFile(r.keyFile(id), []byte(k+"\n"), 0o600)
}

// localKey returns the device's kept key, generating and keeping a new one if there is none.
func (r *registry) localKey(id string) (string, error) {
	p := r.keyFile(id)
	if b, err := os.ReadFile(p); err == nil {
		if k := strings.TrimSpace(string(b)); k != "" {
			return k, nil
		}
	}
	var raw [32]byte
	_, _ = rand.Read(raw[:])
	k := base64.StdEncoding.EncodeToString(raw[:])
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return "", fmt.Errorf("%w: stateDir: %w", ErrConfig, err)
	}
	if err := os.WriteFile(p, []byte(k+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("fleet: %w", err)
	}
	return k, nil
}
