package main

import (
	"context"
	"crypto/ecdsa"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/internal/atomicfile"
	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// pkiCommand is the test PKI helper: a root CA, an intermediate and device certificates, and
// optionally an X.509 enrollment group on the root so the devices can provision through DPS.
func pkiCommand(g *globals) *cobra.Command {
	var dir, groupID string
	var devices []string
	var enroll bool
	var validity time.Duration
	cmd := &cobra.Command{
		Use:   "pki",
		Short: "Make a test PKI (root CA, intermediate, device certificates) and enroll it in DPS",
		Long: `Writes into --dir: root.pem/root.key, intermediate.pem/intermediate.key, and for each
--devices ID a chain ID.pem (leaf, then intermediate) and its key ID.key (mode 0600), CN = ID.
With --enroll it creates (or replaces) the X.509 enrollment group --group-id whose signing
certificate is the root, through the DPS service API (--hubsim-state, or --dps-connection-string
with --address and --ca-file). For testing only: the keys are not protected by anything but file
permissions.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return errors.New("--dir is required")
			}
			for _, id := range devices {
				if err := wire.ValidateRegistrationID(id); err != nil || len(id) > 64 {
					return fmt.Errorf("--devices %q: a registration ID used as CN must be at most 64 characters of letters, digits and -._: (%v)", id, err)
				}
			}
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			root, err := pki.NewCA("iothubby test root", validity)
			if err != nil {
				return err
			}
			inter, err := root.NewIntermediate("iothubby test intermediate", validity)
			if err != nil {
				return err
			}
			write := func(name string, data []byte, mode os.FileMode) error {
				return atomicfile.WriteFile(filepath.Join(dir, name), data, mode)
			}
			for _, ca := range []struct {
				name string
				ca   *pki.CA
			}{{"root", root}, {"intermediate", inter}} {
				k, err := pki.EncodeKey(ca.ca.Key)
				if err != nil {
					return err
				}
				if err := write(ca.name+".pem", ca.ca.CertPEM(), 0o644); err != nil {
					return err
				}
				if err := write(ca.name+".key", k, 0o600); err != nil {
					return err
				}
			}
			for _, id := range devices {
				leaf, err := inter.Issue(pki.LeafOptions{CommonName: id, Client: true, NotAfter: time.Now().Add(validity)})
				if err != nil {
					return err
				}
				k, err := pki.EncodeKey(leaf.PrivateKey.(*ecdsa.PrivateKey))
				if err != nil {
					return err
				}
				chain := append(pki.EncodeCert(leaf.Leaf), inter.CertPEM()...)
				if err := write(id+".pem", chain, 0o644); err != nil {
					return err
				}
				if err := write(id+".key", k, 0o600); err != nil {
					return err
				}
			}
			fmt.Fprintf(g.stdout, "wrote root, intermediate and %d device certificate(s) to %s\n", len(devices), dir)
			if !enroll {
				return nil
			}
			c, scope, err := g.dpsClient()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			_, err = c.PutEnrollmentGroup(ctx, groupID, map[string]any{"enrollmentGroupId": groupID,
				"attestation": map[string]any{"type": "x509", "x509": map[string]any{"signingCertificates": map[string]any{
					"primary": map[string]any{"certificate": string(root.CertPEM())}}}}}, "*")
			if err != nil {
				return fmt.Errorf("enrollment group %s: %w", groupID, err)
			}
			fmt.Fprintf(g.stdout, "enrollment group %s (X.509, signed by the root) registered", groupID)
			if scope != "" {
				fmt.Fprintf(g.stdout, " in ID scope %s", scope)
			}
			fmt.Fprintln(g.stdout)
			if len(devices) > 0 {
				id := devices[0]
				fmt.Fprintf(g.stdout, "agent configuration for %s:\n  stateDir: <dir>\n  dps:\n    idScope: %s\n    globalEndpoint: <hubsim mqttAddress>\n  auth:\n    certFile: %s\n    keyFile: %s\n",
					id, scope, filepath.Join(dir, id+".pem"), filepath.Join(dir, id+".key"))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "output folder")
	f.StringSliceVar(&devices, "devices", []string{"x509-device-1"}, "device registration IDs (certificate CNs)")
	f.BoolVar(&enroll, "enroll", false, "register an X.509 enrollment group for the root in DPS")
	f.StringVar(&groupID, "group-id", "iothubby-test-pki", "enrollment group ID (with --enroll)")
	f.DurationVar(&validity, "validity", 30*24*time.Hour, "certificate validity")
	return cmd
}

// dpsClient is a DPS service client from --dps-connection-string (or its environment variable
// or config key), or from --hubsim-state; it also returns hubsim's ID scope when known.
func (g *globals) dpsClient() (*service.Client, string, error) {
	if err := g.resolve(); err != nil {
		return nil, "", err
	}
	if cs := g.dpsConnString; cs != "" {
		c, err := service.New(service.Config{ConnectionString: cs, Address: g.address, CAFile: g.caFile})
		if err != nil {
			return nil, "", fmt.Errorf("DPS connection string: %w", err)
		}
		return c, "", nil
	}
	if g.hubsimState == "" {
		return nil, "", errors.New("no DPS given: use --dps-connection-string, IOTHUB_DPS_CONNECTION_STRING, --hubsim-state or dpsConnectionString in the config file")
	}
	_, e, err := service.ForHubsim(g.hubsimState)
	if err != nil {
		return nil, "", err
	}
	if !strings.Contains(e.DPSConnectionString, "SharedAccessKey=") {
		return nil, "", errors.New("this hubsim's endpoints.json has no DPS connection string")
	}
	c, err := service.New(service.Config{ConnectionString: e.DPSConnectionString, Address: e.HTTPSAddress, CAFile: e.CAFile})
	return c, e.IDScope, err
}
