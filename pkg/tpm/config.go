package tpm

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Backend names for [Config.Backend].
const (
	// BackendDevice is a TPM character device (/dev/tpmrm0 by default).
	BackendDevice = "device"
	// BackendSwtpm is swtpm's data channel over TCP or a Unix socket. Start swtpm with
	// --flags not-need-init,startup-clear.
	BackendSwtpm = "swtpm"
	// BackendSimulator is the in-process reference TPM (cgo builds only; one per process).
	BackendSimulator = "simulator"
)

// DefaultDevicePath is the TPM device used when [Config.Path] is empty: the kernel's resource
// manager, which lets other programs share the TPM.
const DefaultDevicePath = "/dev/tpmrm0"

// DefaultCommandTimeout bounds one swtpm command when [Config.CommandTimeout] is zero.
// Creating an RSA primary key is the slowest command the package sends.
const DefaultCommandTimeout = time.Minute

// Config selects a TPM.
type Config struct {
	// Backend is BackendDevice, BackendSwtpm or BackendSimulator.
	Backend string `yaml:"backend" json:"backend"`
	// Path is the device path for BackendDevice (default DefaultDevicePath), or the swtpm
	// address for BackendSwtpm: tcp://host:port or unix:///absolute/path. Not used by the
	// simulator.
	Path string `yaml:"path" json:"path"`
	// StateDir is where BackendSimulator keeps its seed and the imported identity key
	// (created with mode 0700 if missing). Ignored by the other backends, whose TPM keeps
	// its own state.
	StateDir string `yaml:"stateDir" json:"stateDir"`
	// CommandTimeout caps each swtpm command (default DefaultCommandTimeout); the context's
	// deadline applies too. Not used by the other backends, whose commands cannot be
	// interrupted.
	CommandTimeout time.Duration `yaml:"commandTimeout" json:"commandTimeout"`
}

// ErrConfig wraps every error from [Config.Validate].
var ErrConfig = errors.New("tpm: bad configuration")

// Validate checks the configuration without touching the TPM.
func (c Config) Validate() error {
	if c.CommandTimeout < 0 {
		return fmt.Errorf("%w: negative command timeout %v", ErrConfig, c.CommandTimeout)
	}
	switch c.Backend {
	case BackendDevice:
		if c.Path != "" && !filepath.IsAbs(c.Path) {
			return fmt.Errorf("%w: device path %q is not absolute (e.g. %s)", ErrConfig, c.Path, DefaultDevicePath)
		}
		return nil
	case BackendSwtpm:
		if c.Path == "" {
			return fmt.Errorf("%w: the swtpm backend needs an address in path: tcp://host:port or unix:///path/to/socket", ErrConfig)
		}
		if _, _, err := parseSwtpmAddress(c.Path); err != nil {
			return fmt.Errorf("%w: %w", ErrConfig, err)
		}
		return nil
	case BackendSimulator:
		if c.Path != "" {
			return fmt.Errorf("%w: the simulator backend takes no path (got %q); its state lives in stateDir", ErrConfig, c.Path)
		}
		if c.StateDir == "" {
			return fmt.Errorf("%w: the simulator backend needs a state directory (stateDir) for its seed and identity key", ErrConfig)
		}
		return nil
	case "":
		return fmt.Errorf("%w: no backend: set %s, %s or %s", ErrConfig, BackendDevice, BackendSwtpm, BackendSimulator)
	default:
		return fmt.Errorf("%w: unknown backend %q: use %s, %s or %s", ErrConfig, c.Backend, BackendDevice, BackendSwtpm, BackendSimulator)
	}
}

func (c Config) commandTimeout() time.Duration {
	if c.CommandTimeout == 0 {
		return DefaultCommandTimeout
	}
	return c.CommandTimeout
}

// parseSwtpmAddress splits tcp://host:port or unix:///absolute/path into a network and an
// address for net.Dial.
func parseSwtpmAddress(s string) (network, addr string, err error) {
	bad := func(format string, a ...any) (string, string, error) {
		return "", "", fmt.Errorf("swtpm address %q: %s (want tcp://host:port or unix:///path/to/socket)", s, fmt.Sprintf(format, a...))
	}
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return bad("no scheme")
	}
	switch strings.ToLower(scheme) {
	case "tcp":
		if rest == "" {
			return bad("no host and port")
		}
		if strings.ContainsAny(rest, "/?#@") {
			return bad("only host:port may follow tcp://")
		}
		host, port, err := net.SplitHostPort(rest)
		if err != nil {
			return bad("%v", err)
		}
		if host == "" {
			return bad("no host")
		}
		if strings.ContainsFunc(host, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
			return bad("the host contains white space or control characters")
		}
		if port == "" {
			return bad("no port")
		}
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil || n == 0 {
			return bad("port %q is not 1 to 65535", port)
		}
		return "tcp", net.JoinHostPort(host, port), nil
	case "unix":
		if !strings.HasPrefix(rest, "/") {
			return bad("the socket path must be absolute, as in unix:///run/swtpm.sock")
		}
		if strings.ContainsAny(rest, "?#\x00") {
			return bad("the socket path contains '?', '#' or NUL")
		}
		return "unix", filepath.Clean(rest), nil
	default:
		return bad("unknown scheme %q", scheme)
	}
}
