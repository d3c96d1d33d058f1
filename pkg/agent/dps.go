package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/attest"
	"github.com/iothubby/iothubby/pkg/dps"
	"github.com/iothubby/iothubby/pkg/hub"
)

// DPSConfig provisions the device through the Device Provisioning Service instead of a
// connection string. The credential is auth.symmetricKey[File] (individual enrollment),
// dps.groupKey[File] (enrollment group: the device key is derived from it and the registration
// ID), auth.certFile + auth.keyFile (X.509), or the TPM of the tpm section
// (dps.attestation: tpm, over HTTPS only).
type DPSConfig struct {
	// GlobalEndpoint is the DPS device endpoint, host[:port]. Default
	// global.azure-devices-provisioning.net.
	GlobalEndpoint string `yaml:"globalEndpoint"`
	// ServerName overrides the name DPS's server certificate must carry.
	ServerName string `yaml:"serverName"`
	// IDScope is the DPS instance's ID scope (required for DPS).
	IDScope string `yaml:"idScope"`
	// RegistrationID defaults to deviceId, or to the certificate's CN for X.509, or for a TPM
	// to the lower-case base32 of SHA-256 over its endorsement key (as Microsoft's SDKs do).
	RegistrationID string `yaml:"registrationId"`
	// Transport is mqtt (default) or https (the default, and the only choice, with a TPM).
	Transport string `yaml:"transport"`
	// Attestation is symmetricKey, x509 or tpm; default: what the configured credential is.
	Attestation string `yaml:"attestation"`
	// GroupKey / GroupKeyFile is an enrollment group's key (base64); prefer the file (mode 0600).
	GroupKey     string `yaml:"groupKey"`
	GroupKeyFile string `yaml:"groupKeyFile"`
	// Payload is a JSON object sent with the registration (e.g. {"modelId": "dtmi:..."}).
	Payload map[string]any `yaml:"payload"`
	// HubAddress overrides the TCP address dialled for the assigned hub (default: the assigned
	// hub's name, port 8883 unless it names one).
	HubAddress string `yaml:"hubAddress"`
	// ReprovisionAfterFailures provisions again after this many consecutive failed hub
	// connection attempts (0: never for that reason).
	ReprovisionAfterFailures int `yaml:"reprovisionAfterFailures"`
	// MaxRetryAfter caps DPS's retry-after. Default 30 s.
	MaxRetryAfter time.Duration `yaml:"maxRetryAfter"`
	// Timeout bounds one provisioning (registration and polling). Default 2 min.
	Timeout time.Duration `yaml:"timeout"`
	// Reprovision ignores the cached result at start (the agent's --reprovision flag).
	Reprovision bool `yaml:"-"`
}

func (c *Config) resolveDPS(fileOpts attest.FileOptions) (identity, error) {
	var id identity
	d := &c.DPS
	if c.ConnectionString != "" || c.ConnectionStringFile != "" || c.Host != "" || c.ModuleID != "" {
		return id, fmt.Errorf("%w: with dps, do not set connectionString(File), host or moduleId: the hub comes from DPS", ErrConfig)
	}
	if d.IDScope == "" {
		return id, fmt.Errorf("%w: dps.idScope is required", ErrConfig)
	}
	if c.StateDir == "" {
		return id, fmt.Errorf("%w: dps needs stateDir (the provisioning result is cached there)", ErrConfig)
	}
	switch d.Transport {
	case "", dps.MQTT, dps.HTTPS:
	default:
		return id, fmt.Errorf("%w: dps.transport must be mqtt or https", ErrConfig)
	}
	if d.GlobalEndpoint != "" {
		if err := dps.ParseEndpoint(d.GlobalEndpoint); err != nil {
			return id, fmt.Errorf("%w: dps.globalEndpoint: %w", ErrConfig, err)
		}
	}
	if d.ReprovisionAfterFailures < 0 {
		return id, fmt.Errorf("%w: dps.reprovisionAfterFailures must not be negative", ErrConfig)
	}
	group := d.GroupKey != "" || d.GroupKeyFile != ""
	key := c.Auth.SymmetricKey != "" || c.Auth.SymmetricKeyFile != ""
	x509Files := c.Auth.CertFile != "" || c.Auth.KeyFile != ""
	if d.Attestation == "tpm" {
		if group || key || x509Files {
			return id, fmt.Errorf("%w: dps.attestation is tpm: do not set auth keys, certificates or dps.groupKey", ErrConfig)
		}
		if d.Transport == dps.MQTT {
			return id, fmt.Errorf("%w: %w", ErrConfig, dps.ErrTPMOverMQTT)
		}
		if err := c.TPM.check(c.StateDir); err != nil {
			return id, err
		}
		id.tpm = true
		id.registrationID = d.RegistrationID
		if id.registrationID == "" {
			id.registrationID = c.DeviceID
		}
		// An empty registration ID is filled from the TPM's endorsement key when it is opened.
		id.deviceID = id.registrationID
		return id, nil
	}
	if c.TPM != (TPMConfig{}) {
		return id, fmt.Errorf("%w: a tpm section is set but dps.attestation is not tpm", ErrConfig)
	}
	n := 0
	for _, b := range []bool{group, key, x509Files} {
		if b {
			n++
		}
	}
	if n != 1 {
		return id, fmt.Errorf("%w: dps needs exactly one credential: auth.symmetricKey(File), dps.groupKey(File), auth.certFile and auth.keyFile, or dps.attestation tpm", ErrConfig)
	}
	if (group && d.GroupKey != "" && d.GroupKeyFile != "") || (key && c.Auth.SymmetricKey != "" && c.Auth.SymmetricKeyFile != "") {
		return id, fmt.Errorf("%w: set a key or its file, not both", ErrConfig)
	}
	switch d.Attestation {
	case "":
	case "symmetricKey":
		if x509Files {
			return id, fmt.Errorf("%w: dps.attestation is symmetricKey but an X.509 certificate is configured", ErrConfig)
		}
	case "x509":
		if !x509Files {
			return id, fmt.Errorf("%w: dps.attestation is x509; set auth.certFile and auth.keyFile", ErrConfig)
		}
	default:
		return id, fmt.Errorf("%w: dps.attestation must be symmetricKey, x509 or tpm", ErrConfig)
	}
	regID := d.RegistrationID
	if regID == "" {
		regID = c.DeviceID
	}
	var err error
	switch {
	case x509Files:
		id.cred, err = attest.FromX509Files(c.Auth.CertFile, c.Auth.KeyFile, fileOpts)
		if err == nil && regID == "" {
			regID = id.cred.CommonName()
		}
	case regID == "":
		err = errors.New("dps: set dps.registrationId (or deviceId)")
	case d.GroupKeyFile != "":
		id.cred, err = attest.FromGroupKeyFile(d.GroupKeyFile, regID, fileOpts)
	case d.GroupKey != "":
		id.cred, err = attest.FromGroupKey(d.GroupKey, regID)
	case c.Auth.SymmetricKeyFile != "":
		id.cred, err = attest.FromKeyFile(c.Auth.SymmetricKeyFile, fileOpts)
	default:
		id.cred, err = attest.FromBase64Key(c.Auth.SymmetricKey)
	}
	if err != nil {
		return id, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if regID == "" {
		return id, fmt.Errorf("%w: dps.registrationId is required (the certificate has no CN)", ErrConfig)
	}
	if cn := id.cred.CommonName(); x509Files && cn != regID {
		return id, fmt.Errorf("%w: dps.registrationId %q is not the certificate's CN %q", ErrConfig, regID, cn)
	}
	id.registrationID, id.deviceID = regID, regID
	return id, nil
}

func (d *Device) dpsEnabled() bool { return d.id.registrationID != "" || d.id.tpm }

func (d *Device) dpsConfig() (dps.Config, error) {
	c := d.cfg.DPS
	dc := dps.Config{
		Endpoint: c.GlobalEndpoint, ServerName: c.ServerName, IDScope: c.IDScope,
		RegistrationID: d.id.registrationID, Transport: c.Transport, Credential: d.id.cred,
		MaxWait: c.MaxRetryAfter, Timeout: c.Timeout, Logger: d.log.Named("dps"),
	}
	if d.cfg.TLS.ServerName != "" && dc.ServerName == "" {
		dc.ServerName = d.cfg.TLS.ServerName
	}
	if len(c.Payload) > 0 {
		b, err := json.Marshal(c.Payload)
		if err != nil {
			return dc, fmt.Errorf("%w: dps.payload: %w", ErrConfig, err)
		}
		dc.Payload = b
	}
	dc.RootCAs = d.rootCAs
	dc.SessionCache, dc.CurvePreferences = d.cfg.Shared.TLSSessionCache, d.cfg.Shared.CurvePreferences
	if d.tpm != nil {
		dc.TPM, dc.Credential = d.tpm, nil
	}
	return dc, nil
}

// provision returns the cached result, or registers with DPS (force skips the cache) and caches
// the result.
func (d *Device) provision(ctx context.Context, force bool) (*dps.Result, bool, error) {
	c := d.cfg.DPS
	if !force {
		res, err := dps.LoadCache(d.cfg.StateDir, c.IDScope, d.id.registrationID)
		if err == nil {
			d.observer().Provisioned(d.id.deviceID, ProvisionCached, nil)
			d.log.Info(MsgUsingCachedProvisioning, zap.String("hub", res.AssignedHub), zap.String("device", res.DeviceID))
			return res, true, nil
		}
		if !errors.Is(err, dps.ErrNoCache) {
			return nil, false, err
		}
		d.log.Debug("no cached provisioning result", zap.Error(err))
	}
	dc, err := d.dpsConfig()
	if err != nil {
		return nil, false, err
	}
	// A registration is a connection too (to DPS): a fleet's connect-rate limiter counts it.
	if bc := d.cfg.Shared.BeforeConnect; bc != nil {
		if err := bc(ctx); err != nil {
			return nil, false, err
		}
	}
	res, err := dps.Register(ctx, dc)
	if err != nil {
		if ctx.Err() == nil {
			d.observer().Provisioned(d.id.deviceID, ProvisionFailed, err)
		}
		return nil, false, err
	}
	d.observer().Provisioned(d.id.deviceID, ProvisionRegistered, nil)
	if err := dps.SaveCache(d.cfg.StateDir, res); err != nil {
		return nil, false, err
	}
	return res, false, nil
}

// hubConfigFor builds the hub session configuration for a provisioning result.
func (d *Device) hubConfigFor(res *dps.Result) hub.Config {
	hc := d.cfg.hubConfig(d.id)
	hc.Host, hc.Address = res.HubHostAndAddress()
	if hc.Transport == hub.TransportMQTTWS {
		hc.Address = "" // the assigned hub's HTTPS port, not its MQTT one
	}
	if d.cfg.DPS.HubAddress != "" {
		hc.Address = d.cfg.DPS.HubAddress
	}
	if d.cfg.TLS.ServerName == "" {
		hc.ServerName = ""
	}
	hc.DeviceID = res.DeviceID
	return hc
}

// errReprovision is how a session's loop reports that the device asked to provision again.
var errReprovision = errors.New("agent: provisioning again")

// provisioned is one provisioning result and the hub session configuration made from it, kept
// by the run (loop.go) while its sessions use it.
type provisioned struct {
	hc     hub.Config
	cached bool
	hub    string
}

// provisionForRun provisions (or loads the cached result); nil with a nil error when ctx ended.
func (d *Device) provisionForRun(ctx context.Context, force bool) (*provisioned, error) {
	res, cached, err := d.provision(ctx, force)
	if err != nil {
		if ctx.Err() != nil {
			return nil, nil
		}
		d.log.Error(MsgProvisioningFailed, zap.Error(err))
		return nil, fmt.Errorf("device %s: %w", d.id.registrationID, err)
	}
	return &provisioned{hc: d.hubConfigFor(res), cached: cached, hub: res.AssignedHub}, nil
}

// afterDPSHub decides, from how the hub sessions ended (err), whether to provision again
// (true) or return err.
func (d *Device) afterDPSHub(ctx context.Context, p *provisioned, err error) (again bool, _ error) {
	switch {
	case errors.Is(err, errReprovision):
		d.log.Info("provisioning again", zap.String("reason", "requested or too many failed connection attempts"))
	case errors.Is(err, hub.ErrNotAuthorized) && p.cached:
		d.log.Warn(MsgReprovisioning, zap.String("hub", p.hub), zap.Error(err))
	default:
		return false, err
	}
	if err := dps.ClearCache(d.cfg.StateDir); err != nil {
		return false, err
	}
	select {
	case <-ctx.Done():
		return false, nil
	default:
		return true, nil
	}
}
