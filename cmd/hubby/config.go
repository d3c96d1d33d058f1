package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"gopkg.in/yaml.v3"
)

// fileConfig is hubby's config file (YAML), by default ~/.config/hubby/config.yaml
// ($XDG_CONFIG_HOME/hubby/config.yaml). Flags and environment variables override it.
//
//	connectionString: HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=...
//	dpsConnectionString: HostName=mydps.azure-devices-provisioning.net;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=...
//	address: 127.0.0.1:8443   # optional: where requests go, if not HostName:443
//	caFile: /path/ca.pem      # optional: the only CA trusted
//	hubsimState: /path/state  # optional, instead of connectionString
type fileConfig struct {
	ConnectionString    string `yaml:"connectionString"`
	DPSConnectionString string `yaml:"dpsConnectionString"`
	Address             string `yaml:"address"`
	CAFile              string `yaml:"caFile"`
	HubsimState         string `yaml:"hubsimState"`
}

// maxConfig bounds the config file's size.
const maxConfig = 64 << 10

// loadConfig reads path, or the default file when path is empty (a missing default file is no
// error; a missing --config file is).
func loadConfig(path string) (fileConfig, error) {
	var cfg fileConfig
	explicit := path != ""
	if !explicit {
		dir, err := os.UserConfigDir()
		if err != nil {
			return cfg, nil
		}
		path = filepath.Join(dir, "hubby", "config.yaml")
	}
	f, err := os.Open(path)
	if err != nil {
		if !explicit && errors.Is(err, fs.ErrNotExist) {
			return cfg, nil
		}
		return cfg, fmt.Errorf("config file: %w", err)
	}
	defer f.Close()
	b := make([]byte, maxConfig+1)
	n, _ := io.ReadFull(f, b)
	if n > maxConfig {
		return cfg, fmt.Errorf("config file %s: larger than %d bytes", path, maxConfig)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b[:n]))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return cfg, fmt.Errorf("config file %s: %w", path, err)
	}
	return cfg, nil
}
