package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/connstr"
	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// deviceCommand is `hubby devices` (az iot hub device-identity), also reachable as `device`.
func deviceCommand(g *globals) *cobra.Command {
	dev := &cobra.Command{Use: "devices", Aliases: []string{"device", "device-identity"}, Short: "Manage device identities (az iot hub device-identity)"}

	var ifMissing, disabled, edge bool
	var primary, secondary, thumb1, thumb2, authMethod string
	create := &cobra.Command{
		Use:   "create DEVICE_ID",
		Short: "Create a device (symmetric keys generated unless given, or X.509 thumbprints or CA)",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			d := service.Device{DeviceID: args[0], Status: "enabled"}
			if disabled {
				d.Status = "disabled"
			}
			if edge {
				d.Capabilities = service.Capabilities{IoTEdge: true}
			}
			if authMethod == "" {
				authMethod = "shared_private_key"
				if thumb1 != "" {
					authMethod = "x509_thumbprint"
				}
			}
			switch authMethod {
			case "shared_private_key":
				for _, k := range []string{primary, secondary} {
					if k != "" {
						if _, err := base64.StdEncoding.DecodeString(k); err != nil {
							return usageError{errors.New("--primary-key and --secondary-key must be base64")}
						}
					}
				}
				d.Authentication = service.Authentication{Type: hubapi.AuthSAS,
					SymmetricKey: service.SymmetricKey{PrimaryKey: primary, SecondaryKey: secondary}}
			case "x509_thumbprint":
				if thumb1 == "" {
					return errors.New("--auth-method x509_thumbprint needs --primary-thumbprint")
				}
				d.Authentication = service.Authentication{Type: hubapi.AuthSelfSigned,
					X509Thumbprint: service.X509Thumbprint{PrimaryThumbprint: thumb1, SecondaryThumbprint: thumb2}}
			case "x509_ca":
				d.Authentication = service.Authentication{Type: hubapi.AuthCertificateAuthority}
			default:
				return usageError{fmt.Errorf("--auth-method must be shared_private_key, x509_thumbprint or x509_ca, not %q", authMethod)}
			}
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				out, err := c.CreateDevice(ctx, d)
				if ifMissing && errors.Is(err, wire.ErrDeviceAlreadyExists) {
					out, err = c.GetDevice(ctx, args[0])
				}
				if err != nil {
					return err
				}
				return g.printDevice(out)
			})
		},
	}
	f := create.Flags()
	f.BoolVar(&ifMissing, "if-missing", false, "succeed, showing the existing device, if it already exists")
	f.BoolVar(&disabled, "disabled", false, "create the device disabled")
	f.BoolVar(&edge, "edge-enabled", false, "an IoT Edge device")
	f.StringVar(&authMethod, "auth-method", "", "shared_private_key, x509_thumbprint or x509_ca (default: from the other flags)")
	f.StringVar(&primary, "primary-key", "", "primary symmetric key (base64); generated when empty")
	f.StringVar(&secondary, "secondary-key", "", "secondary symmetric key (base64); generated when empty")
	f.StringVar(&thumb1, "primary-thumbprint", "", "X.509 self-signed: primary certificate thumbprint (SHA-1 or SHA-256 hex)")
	f.StringVar(&thumb2, "secondary-thumbprint", "", "X.509 self-signed: secondary certificate thumbprint")

	show := &cobra.Command{
		Use:     "show DEVICE_ID",
		Aliases: []string{"get"},
		Short:   "Show a device",
		Args:    exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				d, err := c.GetDevice(ctx, args[0])
				if err != nil {
					return err
				}
				return g.printDevice(d)
			})
		},
	}

	var top int
	list := &cobra.Command{
		Use:   "list",
		Short: "List devices (up to --top; use query for more)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				ds, err := c.ListDevices(ctx, top)
				if err != nil {
					return err
				}
				return g.printDevices(ds)
			})
		},
	}
	list.Flags().IntVar(&top, "top", 0, "at most this many devices (0: the service's default)")

	var status, reason, uetag, upk, usk, utp1, utp2 string
	update := &cobra.Command{
		Use:   "update DEVICE_ID",
		Short: "Change a device's status, keys or thumbprints (read, change, write with the etag)",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if status != "" && status != "enabled" && status != "disabled" {
				return usageError{fmt.Errorf("--status must be enabled or disabled, not %q", status)}
			}
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				d, err := c.GetDevice(ctx, args[0])
				if err != nil {
					return err
				}
				changed := false
				set := func(dst *string, v string) {
					if v != "" {
						*dst, changed = v, true
					}
				}
				if status != "" {
					d.Status, changed = hubapi.Status(status), true
				}
				set(&d.StatusReason, reason)
				if upk != "" || usk != "" {
					if d.Authentication.Type != hubapi.AuthSAS {
						return fmt.Errorf("device %s does not use symmetric keys", d.DeviceID)
					}
					set(&d.Authentication.SymmetricKey.PrimaryKey, upk)
					set(&d.Authentication.SymmetricKey.SecondaryKey, usk)
				}
				if utp1 != "" || utp2 != "" {
					if d.Authentication.Type != hubapi.AuthSelfSigned {
						return fmt.Errorf("device %s does not use X.509 thumbprints", d.DeviceID)
					}
					set(&d.Authentication.X509Thumbprint.PrimaryThumbprint, utp1)
					set(&d.Authentication.X509Thumbprint.SecondaryThumbprint, utp2)
				}
				if !changed {
					return usageError{errors.New("nothing to change: give --status, --status-reason, keys or thumbprints")}
				}
				etag := d.ETag
				if uetag != "" {
					etag = uetag
				}
				out, err := c.UpdateDevice(ctx, d, etag)
				if err != nil {
					return err
				}
				return g.printDevice(out)
			})
		},
	}
	f = update.Flags()
	f.StringVar(&status, "status", "", "enabled or disabled")
	f.StringVar(&reason, "status-reason", "", "why the status is what it is")
	f.StringVar(&upk, "primary-key", "", "new primary symmetric key (base64)")
	f.StringVar(&usk, "secondary-key", "", "new secondary symmetric key (base64)")
	f.StringVar(&utp1, "primary-thumbprint", "", "new primary X.509 thumbprint")
	f.StringVar(&utp2, "secondary-thumbprint", "", "new secondary X.509 thumbprint")
	f.StringVar(&uetag, "etag", "", "update only if the device's etag is this (default: the etag just read)")

	var etag string
	del := &cobra.Command{
		Use:   "delete DEVICE_ID",
		Short: "Delete a device",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				return c.DeleteDevice(ctx, args[0], etag)
			})
		},
	}
	del.Flags().StringVar(&etag, "etag", "", "delete only if the device's etag matches (default: unconditional)")

	var secondaryKey bool
	cs := &cobra.Command{
		Use:   "connection-string DEVICE_ID",
		Short: "Print a device connection string (with GatewayHostName for hubsim's MQTT port)",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				d, err := c.GetDevice(ctx, args[0])
				if err != nil {
					return err
				}
				out := connstr.ConnectionString{HostName: c.HostName(), DeviceID: d.DeviceID, GatewayHostName: g.mqttAddress}
				switch {
				case d.Authentication.Type == hubapi.AuthSAS:
					out.SharedAccessKey = d.Authentication.SymmetricKey.PrimaryKey
					if secondaryKey {
						out.SharedAccessKey = d.Authentication.SymmetricKey.SecondaryKey
					}
				default:
					out.X509 = true
				}
				if g.output == "json" {
					return g.printJSON(map[string]string{"connectionString": out.String()})
				}
				_, err = fmt.Fprintln(g.stdout, out.String())
				return err
			})
		},
	}
	cs.Flags().BoolVar(&secondaryKey, "secondary", false, "use the secondary key")

	dev.AddCommand(create, show, list, update, del, cs, keysCommand(g))
	dev.AddCommand(importCommand(g), exportCommand(g))
	return dev
}

// keysCommand is `hubby devices keys show|regenerate` (az iot hub device-identity renew-key).
func keysCommand(g *globals) *cobra.Command {
	keys := &cobra.Command{Use: "keys", Short: "Show or regenerate a device's symmetric keys"}
	show := &cobra.Command{
		Use:   "show DEVICE_ID",
		Short: "Show a device's symmetric keys",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				d, err := c.GetDevice(ctx, args[0])
				if err != nil {
					return err
				}
				k, err := sasKeys(&d)
				if err != nil {
					return err
				}
				return g.printKeys(d.DeviceID, k)
			})
		},
	}
	var which string
	regen := &cobra.Command{
		Use:   "regenerate DEVICE_ID",
		Short: "Replace a device's primary, secondary or both keys with new random ones, or swap them",
		Long: `Replace a device's keys with new random 32-byte keys (--key primary, secondary or both), or
swap them (--key swap). The device is read and written back with its etag, so a concurrent
change fails (412) rather than being lost. Devices using the old key are disconnected at their
next token renewal.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			switch which {
			case "primary", "secondary", "both", "swap":
			default:
				return usageError{fmt.Errorf("--key must be primary, secondary, both or swap, not %q", which)}
			}
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				d, err := c.GetDevice(ctx, args[0])
				if err != nil {
					return err
				}
				k, err := sasKeys(&d)
				if err != nil {
					return err
				}
				switch which {
				case "primary":
					k.PrimaryKey = newKey()
				case "secondary":
					k.SecondaryKey = newKey()
				case "both":
					k.PrimaryKey, k.SecondaryKey = newKey(), newKey()
				case "swap":
					k.PrimaryKey, k.SecondaryKey = k.SecondaryKey, k.PrimaryKey
				}
				out, err := c.UpdateDevice(ctx, d, d.ETag)
				if err != nil {
					return err
				}
				k, err = sasKeys(&out)
				if err != nil {
					return err
				}
				return g.printKeys(out.DeviceID, k)
			})
		},
	}
	regen.Flags().StringVar(&which, "key", "both", "primary, secondary, both or swap")
	keys.AddCommand(show, regen)
	return keys
}

// sasKeys returns d's keys, to read or change in place, or an error when d does not use them.
func sasKeys(d *service.Device) (*service.SymmetricKey, error) {
	if d.Authentication.Type != hubapi.AuthSAS {
		return nil, fmt.Errorf("device %s does not use symmetric keys", d.DeviceID)
	}
	return &d.Authentication.SymmetricKey, nil
}

func newKey() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return base64.StdEncoding.EncodeToString(b)
}

func (g *globals) printKeys(id string, k *service.SymmetricKey) error {
	if g.output == "json" {
		return g.printJSON(map[string]string{"deviceId": id, "primaryKey": k.PrimaryKey, "secondaryKey": k.SecondaryKey})
	}
	return g.table([]string{"DEVICE", "PRIMARY KEY", "SECONDARY KEY"}, [][]string{{id, k.PrimaryKey, k.SecondaryKey}})
}

// printDevice prints one device: an object in JSON.
func (g *globals) printDevice(d service.Device) error {
	if g.output == "json" {
		return g.printJSON(d)
	}
	return g.deviceTable([]service.Device{d})
}

// printDevices prints a list: always an array in JSON, however many.
func (g *globals) printDevices(ds []service.Device) error {
	if g.output == "json" {
		if ds == nil {
			ds = []service.Device{}
		}
		return g.printJSON(ds)
	}
	return g.deviceTable(ds)
}

func (g *globals) deviceTable(ds []service.Device) error {
	rows := make([][]string, 0, len(ds))
	for _, d := range ds {
		last := "-"
		if !d.LastActivityTime.IsZero() {
			last = d.LastActivityTime.UTC().Format(time.RFC3339)
		}
		rows = append(rows, []string{d.DeviceID, string(d.Status), strings.ToLower(string(d.ConnectionState)), string(d.Authentication.Type), last})
	}
	return g.table([]string{"DEVICE", "STATUS", "CONNECTION", "AUTH", "LAST ACTIVITY"}, rows)
}
