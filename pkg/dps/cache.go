package dps

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/iothubby/iothubby/internal/atomicfile"
)

// CacheFile is the provisioning result's file name in the state directory.
const CacheFile = "dps-result.json"

// ErrNoCache is returned by LoadCache when there is no usable cached result.
var ErrNoCache = errors.New("dps: no cached provisioning result")

// LoadCache reads the cached result in dir for this ID scope and registration ID. A result for
// another scope or registration, or an unreadable file, is ErrNoCache (the device provisions
// again; nothing is lost since the next success overwrites the file).
func LoadCache(dir, idScope, registrationID string) (*Result, error) {
	b, err := os.ReadFile(filepath.Join(dir, CacheFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNoCache
	}
	if err != nil {
		return nil, fmt.Errorf("dps: cache: %w", err)
	}
	var r Result
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%w: %s is not valid JSON: %v", ErrNoCache, CacheFile, err)
	}
	if r.IDScope != idScope || r.RegistrationID != registrationID || r.AssignedHub == "" || r.DeviceID == "" {
		return nil, fmt.Errorf("%w: cached result is for another registration", ErrNoCache)
	}
	return &r, nil
}

// SaveCache writes r to dir atomically (temporary file, fsync, rename), mode 0600.
func SaveCache(dir string, r *Result) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("dps: cache: %w", err)
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, CacheFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("dps: cache: %w", err)
	}
	return nil
}

// ClearCache removes the cached result (so that the next start provisions again).
func ClearCache(dir string) error {
	if err := os.Remove(filepath.Join(dir, CacheFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("dps: cache: %w", err)
	}
	return nil
}
