package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/agent"
)

// Verdicts of agent check.
const (
	verdictOK      = "ok"
	verdictWarning = "warning"
	verdictError   = "error"
	verdictSkipped = "skipped"
)

// Clock skew bounds: IoT Hub and DPS refuse a SAS token already expired by their clock, and
// TLS certificates are checked against ours.
const (
	skewWarning = 30 * time.Second
	skewError   = 5 * time.Minute
)

// checkResult is one check's outcome.
type checkResult struct {
	Name    string `json:"name"`
	Verdict string `json:"verdict"`
	Detail  string `json:"detail"`
	Hint    string `json:"hint,omitempty"`
}

// errChecksFailed makes agent check exit 1 when a check errored.
var errChecksFailed = errors.New("one or more checks failed")

type checkFlags struct {
	runFlags
	output      string
	timeout     time.Duration
	clockOffset time.Duration
	timeURL     string
}

func newCheckCmd(stdout, stderr io.Writer) *cobra.Command {
	var f checkFlags
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Check the configuration, credentials, network, TLS, clock, TPM and state directory",
		Long: `Run the checks worth running before opening a ticket, each with a verdict (ok, warning,
error) and a hint: the configuration is valid; credential files are readable and private; the
DPS and hub endpoints resolve and accept TCP; their TLS certificate chains verify for the host
name (with tls.caFile or the system roots); the clock is within the SAS tolerance of the
server's (the Date header of an HTTPS answer); the TPM answers (when configured); the state
directory is writable. Exit status 1 when any check reports an error, 2 for usage errors.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if f.output != "text" && f.output != "json" {
				return usageError{fmt.Errorf("-o %q: want text or json", f.output)}
			}
			results := runChecks(cmd, &f)
			if err := printChecks(stdout, f.output, results); err != nil {
				return err
			}
			for _, r := range results {
				if r.Verdict == verdictError {
					return errChecksFailed
				}
			}
			return nil
		},
	}
	bindRunFlags(cmd, &f.runFlags)
	fl := cmd.Flags()
	fl.StringVarP(&f.output, "output", "o", "text", "output format: text or json")
	fl.DurationVar(&f.timeout, "timeout", 5*time.Second, "deadline of each network check")
	fl.DurationVar(&f.clockOffset, "clock-offset", 0, "pretend the local clock is off by this much (for testing the clock check)")
	fl.StringVar(&f.timeURL, "time-url", "", "HTTPS URL whose Date header is the reference time (default https://<hub host>/, or the DPS host)")
	return cmd
}

// runChecks runs every check in order; later checks are skipped when what they need failed.
func runChecks(cmd *cobra.Command, f *checkFlags) []checkResult {
	var out []checkResult
	add := func(r checkResult) { out = append(out, r) }

	cfg, err := loadConfig(cmd, &f.runFlags)
	if err != nil {
		add(checkResult{Name: "config", Verdict: verdictError, Detail: err.Error(),
			Hint: "fix the file (configs/agent.yaml documents every field); unknown fields are errors"})
		return out
	}
	add(checkCredentialFiles(cfg))

	// The configuration as the agent would load it, with key-file modes checked above instead.
	lenient := cfg
	lenient.Auth.AllowInsecureKeyFile = true
	dev, err := agent.New(lenient, zap.NewNop())
	if err != nil {
		r := checkResult{Name: "config", Verdict: verdictError, Detail: err.Error(),
			Hint: "fix the setting named; configs/agent.yaml documents every field"}
		if cfg.TPM.Backend != "" || cfg.DPS.Attestation == "tpm" {
			add(checkResult{Name: "tpm", Verdict: verdictError, Detail: err.Error(),
				Hint: "check tpm.device exists and is readable by the agent's user (group tss), or that swtpm is running"})
		}
		add(r)
		return out
	}
	defer dev.Close()
	add(checkResult{Name: "config", Verdict: verdictOK, Detail: "configuration valid for device " + dev.DeviceID()})
	if cfg.TPM.Backend != "" || cfg.DPS.Attestation == "tpm" {
		add(checkResult{Name: "tpm", Verdict: verdictOK, Detail: "TPM opened and its keys read"})
	}
	add(checkStateDir(cfg))

	eps := dev.Endpoints()
	if len(eps) == 1 && eps[0].Role == "dps" {
		add(checkResult{Name: "hub", Verdict: verdictSkipped, Detail: "no cached provisioning result: the hub is known after DPS assigns one"})
	}
	timeout := f.timeout
	var clockEP *agent.Endpoint
	for i, ep := range eps {
		ok := true
		for _, c := range []func(context.Context, agent.Endpoint, *x509.CertPool) checkResult{checkDNS, checkTCP, checkTLS} {
			if !ok {
				break
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			r := c(ctx, ep, dev.RootCAs())
			cancel()
			add(r)
			ok = r.Verdict == verdictOK
		}
		if ok && (clockEP == nil || ep.Role == "hub") {
			clockEP = &eps[i]
		}
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
	defer cancel()
	add(checkClock(ctx, f, clockEP, dev.RootCAs()))
	return out
}

// checkCredentialFiles checks that each configured secret file is readable and private, and
// other credential files readable.
func checkCredentialFiles(cfg agent.Config) checkResult {
	type file struct{ field, path string }
	secret := []file{
		{"connectionStringFile", cfg.ConnectionStringFile},
		{"auth.symmetricKeyFile", cfg.Auth.SymmetricKeyFile},
		{"auth.keyFile", cfg.Auth.KeyFile},
		{"dps.groupKeyFile", cfg.DPS.GroupKeyFile},
	}
	public := []file{{"auth.certFile", cfg.Auth.CertFile}, {"tls.caFile", cfg.TLS.CAFile}}
	var problems, warnings, checked []string
	readable := func(f file) bool {
		fh, err := os.Open(f.path)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s %s: %v", f.field, f.path, err))
			return false
		}
		_ = fh.Close()
		checked = append(checked, f.field)
		return true
	}
	for _, f := range secret {
		if f.path == "" || !readable(f) {
			continue
		}
		fi, err := os.Stat(f.path)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s %s: %v", f.field, f.path, err))
			continue
		}
		if m := fi.Mode().Perm(); m&0o077 != 0 {
			msg := fmt.Sprintf("%s %s has mode %04o: group or others can read or write it", f.field, f.path, m)
			if cfg.Auth.AllowInsecureKeyFile {
				warnings = append(warnings, msg+" (allowed by auth.allowInsecureKeyFile)")
			} else {
				problems = append(problems, msg)
			}
		}
	}
	for _, f := range public {
		if f.path != "" {
			readable(f)
		}
	}
	if cfg.ConnectionString != "" || cfg.Auth.SymmetricKey != "" || cfg.DPS.GroupKey != "" {
		warnings = append(warnings, "a secret is written in the configuration itself")
	}
	r := checkResult{Name: "credentials", Verdict: verdictOK}
	switch {
	case len(problems) > 0:
		r.Verdict, r.Detail = verdictError, strings.Join(problems, "; ")
		r.Hint = "make key files readable by the agent's user only: chmod 600 FILE (and chown to the agent's user)"
	case len(warnings) > 0:
		r.Verdict, r.Detail = verdictWarning, strings.Join(warnings, "; ")
		r.Hint = "keep secrets in files of mode 0600 (or systemd LoadCredential), not in the configuration"
	case len(checked) == 0:
		r.Detail = "no credential files configured"
	default:
		r.Detail = "readable and private: " + strings.Join(checked, ", ")
	}
	return r
}

// checkStateDir checks the state directory is writable (creating it as the agent would).
func checkStateDir(cfg agent.Config) checkResult {
	r := checkResult{Name: "state-dir", Verdict: verdictOK}
	if cfg.StateDir == "" {
		if cfg.DPS.IDScope != "" {
			r.Verdict, r.Detail, r.Hint = verdictError, "no stateDir, and DPS needs one", "set stateDir (e.g. /var/lib/iothubby)"
			return r
		}
		r.Verdict, r.Detail = verdictWarning, "no stateDir: intended reported properties do not survive a restart"
		r.Hint = "set stateDir (e.g. /var/lib/iothubby)"
		return r
	}
	f, err := os.CreateTemp(cfg.StateDir, ".agent-check-*")
	if err == nil {
		_, err = f.Write([]byte("ok"))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		_ = os.Remove(f.Name())
	}
	if err != nil {
		r.Verdict, r.Detail = verdictError, err.Error()
		r.Hint = "create the directory and give it to the agent's user (systemd: StateDirectory=)"
		return r
	}
	r.Detail = "writable: " + filepath.Clean(cfg.StateDir)
	return r
}

func checkDNS(ctx context.Context, ep agent.Endpoint, _ *x509.CertPool) checkResult {
	r := checkResult{Name: ep.Role + "-dns", Verdict: verdictOK}
	host, _, err := net.SplitHostPort(ep.Address)
	if err != nil {
		r.Verdict, r.Detail = verdictError, fmt.Sprintf("address %q: %v", ep.Address, err)
		return r
	}
	if ip := net.ParseIP(host); ip != nil {
		r.Detail = host + " is an IP address"
		return r
	}
	addrs, err := net.DefaultResolver.LookupHost(ctx, host)
	if err != nil {
		r.Verdict, r.Detail = verdictError, err.Error()
		r.Hint = "check the host name and the DNS servers (/etc/resolv.conf); behind a proxy use transport mqtt-ws"
		return r
	}
	r.Detail = fmt.Sprintf("%s resolves to %s", host, strings.Join(addrs, ", "))
	return r
}

func checkTCP(ctx context.Context, ep agent.Endpoint, _ *x509.CertPool) checkResult {
	r := checkResult{Name: ep.Role + "-tcp", Verdict: verdictOK}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", ep.Address)
	if err != nil {
		r.Verdict, r.Detail = verdictError, err.Error()
		r.Hint = "the server does not answer on " + ep.Address + ": check the address and port, that the service runs, and firewalls (MQTT needs outbound 8883; mqtt-ws uses 443)"
		return r
	}
	_ = c.Close()
	r.Detail = "connected to " + ep.Address
	return r
}

func checkTLS(ctx context.Context, ep agent.Endpoint, roots *x509.CertPool) checkResult {
	r := checkResult{Name: ep.Role + "-tls", Verdict: verdictOK}
	d := tls.Dialer{Config: &tls.Config{ServerName: ep.ServerName, RootCAs: roots, MinVersion: tls.VersionTLS12}}
	c, err := d.DialContext(ctx, "tcp", ep.Address)
	if err != nil {
		r.Verdict, r.Detail = verdictError, err.Error()
		var unknown x509.UnknownAuthorityError
		var host x509.HostnameError
		var inv x509.CertificateInvalidError
		switch {
		case errors.As(err, &unknown):
			r.Hint = "the server's chain does not lead to a trusted root: set tls.caFile to the CA that issued it (hubsim: its ca.pem), or leave it empty for Azure (system roots)"
		case errors.As(err, &host):
			r.Hint = "the certificate is not for " + ep.ServerName + ": check the host name, or tls.serverName when dialling an address"
		case errors.As(err, &inv):
			r.Hint = "the certificate is expired or not yet valid: check the clock"
		default:
			r.Hint = "the TLS handshake failed: check that the address is the TLS (MQTT 8883 / HTTPS 443) port"
		}
		return r
	}
	st := c.(*tls.Conn).ConnectionState()
	_ = c.Close()
	leaf := st.PeerCertificates[0]
	r.Detail = fmt.Sprintf("chain verified for %s (issuer %q, expires %s)", ep.ServerName, leaf.Issuer.CommonName, leaf.NotAfter.UTC().Format(time.DateOnly))
	return r
}

// checkClock compares the local clock (shifted by --clock-offset) with the Date header of an
// HTTPS answer from the hub (or DPS, or --time-url).
func checkClock(ctx context.Context, f *checkFlags, ep *agent.Endpoint, roots *x509.CertPool) checkResult {
	r := checkResult{Name: "clock", Verdict: verdictOK}
	url, serverName := f.timeURL, ""
	if ep != nil {
		serverName = ep.ServerName
		if url == "" {
			url = "https://" + net.JoinHostPort(ep.Host, "443") + "/"
		}
	}
	if url == "" {
		r.Verdict, r.Detail = verdictSkipped, "no reachable server to compare with (see the checks above), and no --time-url"
		return r
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12},
		DisableKeepAlives: true, Proxy: http.ProxyFromEnvironment}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, url, nil)
	if err != nil {
		r.Verdict, r.Detail = verdictError, err.Error()
		return r
	}
	sent := time.Now()
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		r.Verdict, r.Detail = verdictWarning, "could not read the server's time: "+err.Error()
		r.Hint = "pass --time-url with an HTTPS URL of the hub (hubsim: its HTTPS address)"
		return r
	}
	_ = resp.Body.Close()
	rtt := time.Since(sent)
	date, err := http.ParseTime(resp.Header.Get("Date"))
	if err != nil {
		r.Verdict, r.Detail = verdictWarning, fmt.Sprintf("%s sent no usable Date header", url)
		return r
	}
	// The Date is the server's clock truncated to whole seconds, read at some point during the
	// round trip: the server's time at mid-trip is best estimated half a second after it.
	local := sent.Add(rtt / 2).Add(f.clockOffset)
	skew := local.Sub(date.Add(time.Second / 2)).Round(time.Second)
	abs := skew
	if abs < 0 {
		abs = -abs
	}
	r.Detail = fmt.Sprintf("local clock is %s off the server's (%s)", skew, url)
	switch {
	case abs > skewError:
		r.Verdict = verdictError
		r.Hint = fmt.Sprintf("the hub refuses SAS tokens outside its clock's tolerance; sync the clock (timedatectl set-ntp true, chronyc tracking): off by more than %s", skewError)
	case abs > skewWarning+time.Second+rtt:
		r.Verdict = verdictWarning
		r.Hint = "the clock drifts: enable NTP (timedatectl set-ntp true)"
	}
	return r
}

func printChecks(w io.Writer, format string, results []checkResult) error {
	if format == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(map[string]any{"checks": results})
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", strings.ToUpper(r.Verdict), r.Name, r.Detail)
		if r.Hint != "" && r.Verdict != verdictOK {
			fmt.Fprintf(tw, "\t\thint: %s\n", r.Hint)
		}
	}
	return tw.Flush()
}
