package main

import (
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/internal/swtpm"
	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/dps"
	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/tpm"
)

// benchTPM compares, in one hubsim, the time to provision over HTTPS with a TPM (the in-process
// simulator, then swtpm when it is installed) against provisioning over HTTPS with a symmetric
// key: n registrations of each, one after the other (one TPM serves one device). A TPM
// registration is two round trips more (the 401 challenge) plus two imports (ActivateCredential,
// Import, Load, EvictControl) and the HMACs inside the TPM. The figure printed is
// symmetric-key time / TPM time (higher is better); there is no target, it is the price of the
// key never leaving the TPM. Opening the TPM (reading or creating its EK and SRK) is done
// once per device's lifetime and is reported separately.
func benchTPM(ctx context.Context, n int, report func(string, float64, bool, string)) error {
	srv, stop, err := startHub(ctx, func(c *hubsim.Config) { c.DPSRetryAfter = -1 })
	if err != nil {
		return err
	}
	defer stop()
	ep := srv.Endpoints()
	base := dps.Config{Endpoint: ep.HTTPSAddress, ServerName: "localhost", RootCAs: srv.CA().Pool(), IDScope: ep.IDScope,
		Transport: dps.HTTPS, Logger: zap.NewNop()}

	// Baseline: an individual symmetric-key enrollment, registered n times.
	key := registry.GenerateKey()
	if _, err := srv.DPS().PutEnrollment(hubapi.Enrollment{RegistrationID: "bench-sym",
		Attestation: &hubapi.AttestationMechanism{Type: "symmetricKey", SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: key, SecondaryKey: key}}}, false, ""); err != nil {
		return err
	}
	cred, err := attest.FromBase64Key(key)
	if err != nil {
		return err
	}
	symCfg := base
	symCfg.RegistrationID, symCfg.Credential = "bench-sym", cred
	sym, err := timeRegistrations(ctx, n, symCfg)
	if err != nil {
		return fmt.Errorf("symmetric key: %w", err)
	}
	fmt.Printf("tpm: symmetric-key provisioning over HTTPS: %v per registration (n=%d)\n", sym.Round(time.Microsecond), n)

	backends := []tpm.Config{{Backend: tpm.BackendSimulator}}
	swDir, err := os.MkdirTemp("", "iothubby-bench-swtpm-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(swDir)
	if sw, err := swtpm.Start(swtpm.Options{Network: "tcp", StateDir: swDir}); err == nil {
		defer sw.Stop()
		backends = append(backends, tpm.Config{Backend: tpm.BackendSwtpm, Path: sw.Addr})
	} else {
		fmt.Printf("tpm: swtpm skipped: %v\n", err)
	}
	for _, bc := range backends {
		dir, err := os.MkdirTemp("", "iothubby-bench-tpm-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		bc.StateDir = dir
		openStart := time.Now()
		dev, err := tpm.Open(ctx, bc, zap.NewNop())
		if err != nil {
			return fmt.Errorf("%s: %w", bc.Backend, err)
		}
		opened := time.Since(openStart)
		regID := dev.RegistrationID()
		if _, err := srv.DPS().PutEnrollment(hubapi.Enrollment{RegistrationID: regID,
			Attestation: &hubapi.AttestationMechanism{Type: "tpm", TPM: &hubapi.TPMAttestation{
				EndorsementKey: base64.StdEncoding.EncodeToString(dev.EndorsementKey())}}}, false, ""); err != nil {
			dev.Close()
			return err
		}
		c := base
		c.RegistrationID, c.TPM = regID, dev
		d, err := timeRegistrations(ctx, n, c)
		dev.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", bc.Backend, err)
		}
		fmt.Printf("tpm: %s provisioning over HTTPS: %v per registration (n=%d); opening the TPM (EK and SRK) took %v\n",
			bc.Backend, d.Round(time.Microsecond), n, opened.Round(time.Millisecond))
		report("tpm "+bc.Backend+" (sym/tpm time)", float64(sym)/float64(d), true, "none: reported")
	}
	return nil
}

// timeRegistrations runs n registrations one after the other and returns the mean duration.
func timeRegistrations(ctx context.Context, n int, c dps.Config) (time.Duration, error) {
	start := time.Now()
	for range n {
		if _, err := dps.Register(ctx, c); err != nil {
			return 0, err
		}
	}
	return time.Since(start) / time.Duration(n), nil
}
