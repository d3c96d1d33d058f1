package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/firmware"
	"github.com/iothubby/iothubby/pkg/service"
)

// hubby firmware: keys, signed manifests, hubsim's image store and driving an update
// (firmware_update.go). The signing and the agent's decision are pkg/firmware's, not re-done here.

func firmwareCommand(g *globals) *cobra.Command {
	fw := &cobra.Command{
		Use:   "firmware",
		Short: "Sign, publish and roll out firmware images (the agent's firmwareUpdate)",
		Long: `Firmware updates for agents with firmware.mode set: make an Ed25519 key pair (keygen), describe
and sign an image (sign), check a manifest as the agent would (verify), host the image in
hubsim's image store or at your own HTTPS URL (publish), and start an update on a device,
following its reported progress until it is current or failed (update).

A manifest is {"version","url","size","sha256","signature"}; the signature is Ed25519 over
"iothubby-firmware-v1\n<version>\n<size>\n<sha256>\n" (the URL is not signed: the hash is).`,
	}
	fw.AddCommand(firmwareKeygen(g), firmwareSign(g), firmwareVerify(g), firmwarePublish(g), firmwareUpdate(g))
	return fw
}

func firmwareKeygen(g *globals) *cobra.Command {
	var keyPath, pubPath string
	var force bool
	cmd := &cobra.Command{
		Use:   "keygen",
		Short: "Make an Ed25519 signing key (mode 0600) and its public key for the agent",
		Long: `Make an Ed25519 key pair: the private key as PEM (PKCS #8) in --key, created mode 0600 (sign
refuses a key file others can read), and the public key as PEM in --public-key, which the
agent's firmware.publicKeyFile reads; the base64 form for firmware.publicKey is printed.
Existing files are kept unless --force.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if pubPath == "" {
				pubPath = strings.TrimSuffix(keyPath, ".key") + ".pub"
			}
			if pubPath == keyPath {
				return usageError{errors.New("--key and --public-key must be different files")}
			}
			pub, priv, err := ed25519.GenerateKey(rand.Reader)
			if err != nil {
				return err
			}
			flags := os.O_WRONLY | os.O_CREATE | os.O_EXCL
			if force {
				flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
				// a key file of the wrong mode is replaced, not reused with its mode
				_ = os.Remove(keyPath)
			}
			if err := writeNew(keyPath, flags, 0o600, firmware.MarshalPrivateKey(priv)); err != nil {
				return err
			}
			if err := writeNew(pubPath, flags, 0o644, firmware.MarshalPublicKey(pub)); err != nil {
				return err
			}
			b64 := firmware.EncodePublicKey(pub)
			if g.output == "json" {
				return g.printJSON(map[string]string{"privateKeyFile": keyPath, "publicKeyFile": pubPath, "publicKey": b64})
			}
			abs, _ := filepath.Abs(pubPath)
			fmt.Fprintf(g.stdout, "private key: %s (mode 0600; keep it secret, it signs firmware)\n", keyPath)
			fmt.Fprintf(g.stdout, "public key:  %s\n", pubPath)
			fmt.Fprintf(g.stdout, "agent configuration, either of:\n  firmware:\n    publicKeyFile: %s\n  firmware:\n    publicKey: %s\n", abs, b64)
			return nil
		},
	}
	cmd.Flags().StringVar(&keyPath, "key", "firmware.key", "private key file to create")
	cmd.Flags().StringVar(&pubPath, "public-key", "", "public key file to create (default: --key with .pub for .key)")
	cmd.Flags().BoolVar(&force, "force", false, "replace existing key files")
	return cmd
}

func writeNew(path string, flags int, mode os.FileMode, data []byte) error {
	f, err := os.OpenFile(path, flags, mode)
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%s exists; keep it, or pass --force to replace it", path)
	}
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// signFlags are shared by sign and publish.
type signFlags struct {
	version, url, key, out string
}

func (s *signFlags) add(cmd *cobra.Command, urlHelp string) {
	f := cmd.Flags()
	f.StringVar(&s.version, "version", "", "firmware version the image installs (dotted, e.g. 1.2.0; required)")
	f.StringVar(&s.url, "url", "", urlHelp)
	f.StringVar(&s.key, "key", "", "private key file from keygen (mode 0600); without it the manifest is unsigned")
	f.StringVar(&s.out, "out", "", "write the manifest to this file instead of printing it")
}

// manifest describes the image at path under s, signed when a key is given.
func (s *signFlags) manifest(path string) (firmware.Manifest, error) {
	if s.version == "" {
		return firmware.Manifest{}, usageError{errors.New("--version is required")}
	}
	var key ed25519.PrivateKey
	if s.key != "" {
		k, err := firmware.ReadPrivateKeyFile(s.key)
		if err != nil {
			return firmware.Manifest{}, err
		}
		key = k
	}
	f, err := os.Open(path)
	if err != nil {
		return firmware.Manifest{}, err
	}
	defer f.Close()
	m, err := firmware.ManifestFor(f, s.version, s.url)
	if err != nil {
		return m, err
	}
	// The fields the agent checks, checked now (a URL still to come stands in as https).
	check := m
	if check.URL == "" {
		check.URL = "https://image.invalid/"
	}
	if err := check.Validate(true); err != nil {
		return m, err
	}
	if key != nil {
		m = m.Sign(key)
	}
	return m, nil
}

func (g *globals) emitManifest(cmd *cobra.Command, m firmware.Manifest, out string) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false) // the URL's & stays readable
	if err := enc.Encode(m); err != nil {
		return err
	}
	b := buf.Bytes()
	if m.Signature == "" {
		fmt.Fprintln(g.stderr, "note: unsigned manifest (no --key); an agent with firmware.publicKey refuses it")
	}
	if out != "" {
		if err := os.WriteFile(out, b, 0o644); err != nil {
			return err
		}
		fmt.Fprintf(g.stderr, "manifest written to %s\n", out)
		return nil
	}
	_, err := g.stdout.Write(b)
	return err
}

func firmwareSign(g *globals) *cobra.Command {
	var s signFlags
	cmd := &cobra.Command{
		Use:   "sign IMAGE --version V [--url URL] --key KEY",
		Short: "Describe an image (size, SHA-256) and sign the manifest",
		Long: `Describe an image (its size and SHA-256) as a manifest for the given version and sign it with
the key from keygen. The URL is where devices download the image (https); leave it out to let
publish fill it in. The signature covers version, size and hash, not the URL.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := s.manifest(args[0])
			if err != nil {
				return err
			}
			return g.emitManifest(cmd, m, s.out)
		},
	}
	s.add(cmd, "https URL devices download the image from (optional; publish fills it in)")
	return cmd
}

// readManifest reads a manifest file ("-": standard input), at most 64 KiB, as JSON. It is not
// validated: that is the device's (or verify's) decision.
func readManifest(cmd *cobra.Command, path string) (firmware.Manifest, []byte, error) {
	var r io.Reader
	if path == "-" {
		r = cmd.InOrStdin()
	} else {
		f, err := os.Open(path)
		if err != nil {
			return firmware.Manifest{}, nil, err
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, 64<<10+1))
	if err != nil {
		return firmware.Manifest{}, nil, err
	}
	if len(b) > 64<<10 {
		return firmware.Manifest{}, nil, fmt.Errorf("manifest %s is larger than 64 KiB", path)
	}
	var m firmware.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return m, nil, fmt.Errorf("manifest %s is not JSON: %w", path, err)
	}
	return m, b, nil
}

// readPublicKey takes a public key file (PEM or base64), or the base64 text itself.
func readPublicKey(s string) (ed25519.PublicKey, error) {
	if b, err := os.ReadFile(s); err == nil {
		k, err := firmware.ParsePublicKey(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s, err)
		}
		return k, nil
	}
	k, err := firmware.ParsePublicKey([]byte(s))
	if err != nil {
		return nil, fmt.Errorf("--public-key %q is neither a readable file nor a base64 key: %w", s, err)
	}
	return k, nil
}

func firmwareVerify(g *globals) *cobra.Command {
	var pubArg, image, running string
	var pol firmware.Policy
	cmd := &cobra.Command{
		Use:   "verify MANIFEST --public-key KEY [--image FILE] [--running V]",
		Short: "Decide on a manifest as the agent would, and say why",
		Long: `Decide on a manifest ("-" reads standard input) as an agent configured with this public key
would before downloading anything (well formed, https URL, signed by the key, not a downgrade
from --running), and with --image also as it would after the download (size and SHA-256).
--public-key is a file (PEM or base64, as firmware.publicKeyFile) or the base64 key itself
(as firmware.publicKey); "" checks as an agent without a key (unsigned manifests only).
Exit status 0 when the agent would accept it, 1 with the reason when it would refuse it.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !cmd.Flags().Changed("public-key") {
				return usageError{errors.New("--public-key is required (\"\" for an agent without a key)")}
			}
			if pubArg != "" {
				k, err := readPublicKey(pubArg)
				if err != nil {
					return err
				}
				pol.PublicKey = k
			}
			_, raw, err := readManifest(cmd, args[0])
			if err != nil {
				return err
			}
			m, err := firmware.ParseManifest(raw, pol.AllowHTTP)
			if err == nil {
				err = pol.Check(m, running)
			}
			if err == nil && image != "" {
				err = firmware.VerifyFile(image, m)
			}
			if g.output == "json" {
				res := map[string]any{"accepted": err == nil, "version": m.Version}
				if err != nil {
					res["reason"] = err.Error()
				}
				if perr := g.printJSON(res); perr != nil {
					return perr
				}
			}
			if err != nil {
				return fmt.Errorf("refused: %w", err)
			}
			if g.output != "json" {
				what := "signature good"
				if m.Signature == "" {
					what = "unsigned, and no key configured"
				}
				if image != "" {
					what += ", image matches"
				}
				fmt.Fprintf(g.stdout, "accepted: version %s, %d bytes, sha256 %s (%s)\n", m.Version, m.Size, strings.ToLower(m.SHA256), what)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&pubArg, "public-key", "", "the agent's public key: a file (PEM or base64) or the base64 text (required)")
	f.StringVar(&image, "image", "", "also check that this file is the image the manifest describes")
	f.StringVar(&running, "running", "", "the device's running version, to check for a downgrade")
	f.BoolVar(&pol.AllowDowngrade, "allow-downgrade", false, "as an agent with firmware.allowDowngrade")
	f.BoolVar(&pol.AllowHTTP, "allow-http", false, "as an agent with firmware.allowHTTP")
	return cmd
}

func firmwarePublish(g *globals) *cobra.Command {
	var s signFlags
	var name string
	var cutAt, rate int64
	cmd := &cobra.Command{
		Use:   "publish IMAGE --version V [--key KEY] [--url URL | --name NAME]",
		Short: "Host an image (hubsim's image store, or your URL) and print its signed manifest",
		Long: `Host an image and print its manifest, signed with --key, ready for update. With --hubsim-state
the image is uploaded to hubsim's image store (named --name, default the file's name) and the
manifest's URL is the store's download URL (HTTPS with hubsim's certificate: the agent needs
firmware.caFile set to hubsim's ca.pem). Against a real hub, host the image yourself and give
its https URL with --url: nothing is uploaded.

--cut-at N and --rate B (hubsim's store only) add the store's test knobs to the URL: the
download breaks at byte N (a device resumes it with a Range request) or is paced to B bytes
per second.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if s.url != "" && (name != "" || cutAt >= 0 || rate > 0) {
				return usageError{errors.New("--name, --cut-at and --rate are for hubsim's image store; not with --url")}
			}
			m, err := s.manifest(args[0])
			if err != nil {
				return err
			}
			if s.url != "" {
				if err := m.Validate(false); err != nil {
					return err
				}
				return g.emitManifest(cmd, m, s.out)
			}
			if err := g.resolve(); err != nil {
				return err
			}
			if g.hubsimState == "" {
				return usageError{errors.New("publish uploads to hubsim's image store (--hubsim-state); against a real hub, host the image and give its https URL with --url")}
			}
			if name == "" {
				name = filepath.Base(args[0])
			}
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				f, err := os.Open(args[0])
				if err != nil {
					return err
				}
				defer f.Close()
				im, err := c.UploadImage(ctx, name, f, m.Size)
				if err != nil {
					return fmt.Errorf("upload to hubsim's image store: %w", err)
				}
				if im.Size != m.Size || !strings.EqualFold(im.SHA256, m.SHA256) {
					return fmt.Errorf("the store holds %d bytes with sha256 %s, not the image read (%d bytes, %s): did the file change?", im.Size, im.SHA256, m.Size, m.SHA256)
				}
				u, err := url.Parse(im.URL)
				if err != nil {
					return fmt.Errorf("the store's URL %q: %w", im.URL, err)
				}
				q := u.Query()
				if cutAt >= 0 {
					q.Set("cutAt", strconv.FormatInt(cutAt, 10))
				}
				if rate > 0 {
					q.Set("rate", strconv.FormatInt(rate, 10))
				}
				u.RawQuery = q.Encode()
				m.URL = u.String()
				return g.emitManifest(cmd, m, s.out)
			})
		},
	}
	s.add(cmd, "https URL where you host the image (a real hub); nothing is uploaded")
	f := cmd.Flags()
	f.StringVar(&name, "name", "", "name in hubsim's image store (default: the file's name)")
	f.Int64Var(&cutAt, "cut-at", -1, "hubsim's store: break the first download at this byte offset (resume demo)")
	f.Int64Var(&rate, "rate", 0, "hubsim's store: pace downloads to this many bytes per second")
	return cmd
}
