package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/hubapi"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/service"
)

// dpsCommand is `hubby dps enrollment|enrollment-group` (az iot dps enrollment, enrollment-group).
func dpsCommand(g *globals) *cobra.Command {
	d := &cobra.Command{Use: "dps", Short: "Device Provisioning Service: individual enrollments and enrollment groups (az iot dps)"}
	d.AddCommand(enrollmentCommand(g, false), enrollmentCommand(g, true), registrationCommand(g))
	return d
}

// enrollmentFlags are what `create` and `update` may set on an enrollment or a group.
type enrollmentFlags struct {
	attestation, primaryKey, secondaryKey, endorsementKey string
	certPath, secondaryCertPath, caName, deviceID         string
	tags, desired, status, reprovision, allocation        string
	hubs                                                  []string
	edge                                                  bool
}

func (e *enrollmentFlags) register(c *cobra.Command, group bool) {
	f := c.Flags()
	if group {
		f.StringVar(&e.attestation, "attestation-type", "", "symmetricKey or x509 (create: default symmetricKey)")
		f.StringVar(&e.certPath, "certificate-path", "", "x509: PEM of the primary signing (root or intermediate) certificate")
		f.StringVar(&e.secondaryCertPath, "secondary-certificate-path", "", "x509: PEM of the secondary signing certificate")
		f.StringVar(&e.caName, "ca-name", "", "x509: name of a CA certificate uploaded to DPS (instead of --certificate-path)")
	} else {
		f.StringVar(&e.attestation, "attestation-type", "", "symmetricKey, x509 or tpm (create: default symmetricKey)")
		f.StringVar(&e.endorsementKey, "endorsement-key", "", "tpm: the TPM's endorsement key (base64)")
		f.StringVar(&e.certPath, "certificate-path", "", "x509: PEM of the device's primary client certificate")
		f.StringVar(&e.secondaryCertPath, "secondary-certificate-path", "", "x509: PEM of the secondary client certificate")
		f.StringVar(&e.deviceID, "device-id", "", "the hub device ID (default: the registration ID)")
	}
	f.StringVar(&e.primaryKey, "primary-key", "", "symmetricKey: primary key (base64; generated when empty)")
	f.StringVar(&e.secondaryKey, "secondary-key", "", "symmetricKey: secondary key (base64; generated when empty)")
	f.StringVar(&e.tags, "initial-twin-tags", "", "JSON object: the twin's initial tags")
	f.StringVar(&e.desired, "initial-twin-properties", "", "JSON object: the twin's initial desired properties")
	f.StringVar(&e.status, "provisioning-status", "", "enabled or disabled")
	f.StringVar(&e.reprovision, "reprovision-policy", "", "reprovisionandmigratedata, reprovisionandresetdata or never")
	f.StringVar(&e.allocation, "allocation-policy", "", "hashed, geoLatency, static or custom")
	f.StringSliceVar(&e.hubs, "iot-hubs", nil, "host names of the hubs the device may be assigned to")
	f.BoolVar(&e.edge, "edge-enabled", false, "the device is an IoT Edge device")
}

// apply sets the flags given on doc (an enrollment or group as decoded JSON).
func (e *enrollmentFlags) apply(c *cobra.Command, doc map[string]any, group, creating bool) error {
	changed := func(name string) bool { return c.Flags().Changed(name) }
	if creating && e.attestation == "" {
		e.attestation = "symmetricKey"
	}
	if e.attestation != "" || changed("primary-key") || changed("secondary-key") || changed("certificate-path") || changed("endorsement-key") || changed("ca-name") {
		typ := e.attestation
		if typ == "" {
			att, _ := doc["attestation"].(map[string]any)
			typ, _ = att["type"].(string)
		}
		att := hubapi.AttestationMechanism{Type: typ}
		switch typ {
		case hubapi.AttestationSymmetricKey:
			att.SymmetricKey = &hubapi.SymmetricKeyAttestation{PrimaryKey: e.primaryKey, SecondaryKey: e.secondaryKey}
		case hubapi.AttestationTPM:
			if group {
				return usageError{errors.New("enrollment groups cannot use TPM attestation")}
			}
			if e.endorsementKey == "" {
				return usageError{errors.New("tpm attestation needs --endorsement-key")}
			}
			att.TPM = &hubapi.TPMAttestation{EndorsementKey: e.endorsementKey}
		case hubapi.AttestationX509:
			var certs hubapi.X509Certificates
			for _, p := range []struct {
				slot **hubapi.X509CertificateWithInfo
				path string
			}{{&certs.Primary, e.certPath}, {&certs.Secondary, e.secondaryCertPath}} {
				if p.path == "" {
					continue
				}
				pem, err := readFileLimited(p.path, 64<<10)
				if err != nil {
					return err
				}
				*p.slot = &hubapi.X509CertificateWithInfo{Certificate: string(pem)}
			}
			x := &hubapi.X509Attestation{}
			switch {
			case group && e.caName != "":
				x.CAReferences, _ = json.Marshal(map[string]string{"primary": e.caName})
			case certs.Primary == nil && certs.Secondary == nil:
				return usageError{errors.New("x509 attestation needs --certificate-path" + map[bool]string{true: " or --ca-name"}[group])}
			case group:
				x.SigningCertificates = &certs
			default:
				x.ClientCertificates = &certs
			}
			att.X509 = x
		default:
			return usageError{fmt.Errorf("--attestation-type must be symmetricKey, x509%s, not %q", map[bool]string{false: " or tpm"}[group], typ)}
		}
		doc["attestation"] = att
	}
	if e.deviceID != "" {
		doc["deviceId"] = e.deviceID
	}
	if e.tags != "" || e.desired != "" {
		tw, _ := doc["initialTwin"].(map[string]any)
		if tw == nil {
			tw = map[string]any{}
		}
		if e.tags != "" {
			m, err := jsonObject("--initial-twin-tags", e.tags)
			if err != nil {
				return err
			}
			tw["tags"] = m
		}
		if e.desired != "" {
			m, err := jsonObject("--initial-twin-properties", e.desired)
			if err != nil {
				return err
			}
			tw["properties"] = map[string]any{"desired": m}
		}
		doc["initialTwin"] = tw
	}
	if e.status != "" {
		if e.status != "enabled" && e.status != "disabled" {
			return usageError{fmt.Errorf("--provisioning-status must be enabled or disabled, not %q", e.status)}
		}
		doc["provisioningStatus"] = e.status
	}
	if e.reprovision != "" {
		yes, no := true, false
		pol := map[string]*hubapi.ReprovisionPolicy{
			"reprovisionandmigratedata": {UpdateHubAssignment: &yes, MigrateDeviceData: &yes},
			"reprovisionandresetdata":   {UpdateHubAssignment: &yes, MigrateDeviceData: &no},
			"never":                     {UpdateHubAssignment: &no, MigrateDeviceData: &no},
		}[strings.ToLower(e.reprovision)]
		if pol == nil {
			return usageError{fmt.Errorf("--reprovision-policy must be reprovisionandmigratedata, reprovisionandresetdata or never, not %q", e.reprovision)}
		}
		doc["reprovisionPolicy"] = pol
	}
	if e.allocation != "" {
		switch e.allocation {
		case "hashed", "geoLatency", "static", "custom":
		default:
			return usageError{fmt.Errorf("--allocation-policy must be hashed, geoLatency, static or custom, not %q", e.allocation)}
		}
		doc["allocationPolicy"] = e.allocation
	}
	if len(e.hubs) > 0 {
		doc["iotHubs"] = e.hubs
	}
	if changed("edge-enabled") {
		doc["capabilities"] = hubapi.Capabilities{IoTEdge: e.edge}
	}
	return nil
}

// jsonObject decodes a flag's JSON object.
func jsonObject(flag, s string) (map[string]any, error) {
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		return nil, usageError{fmt.Errorf("%s is not valid JSON: %v", flag, err)}
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, usageError{fmt.Errorf("%s must be a JSON object, not %s", flag, jsonKind(v))}
	}
	return m, nil
}

func enrollmentCommand(g *globals, group bool) *cobra.Command {
	noun, idName, idKey := "enrollment", "REGISTRATION_ID", "registrationId"
	if group {
		noun, idName, idKey = "enrollment-group", "GROUP_ID", "enrollmentGroupId"
	}
	cmd := &cobra.Command{Use: noun, Short: "Manage individual enrollments"}
	if group {
		cmd.Short = "Manage enrollment groups"
	}
	cmd.Aliases = []string{noun + "s"}

	withDPS := func(c *cobra.Command, f func(ctx context.Context, dc *service.Client) error) error {
		dc, _, err := g.dpsClient()
		if err != nil {
			return err
		}
		defer dc.Close()
		ctx, cancel := context.WithTimeout(c.Context(), g.timeout)
		defer cancel()
		return f(ctx, dc)
	}

	var cf enrollmentFlags
	create := &cobra.Command{
		Use:   "create " + idName,
		Short: "Create (or replace) an " + strings.ReplaceAll(noun, "-", " "),
		Args:  exactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			doc := map[string]any{idKey: args[0]}
			if err := cf.apply(c, doc, group, true); err != nil {
				return err
			}
			return withDPS(c, func(ctx context.Context, dc *service.Client) error {
				var out json.RawMessage
				var err error
				if group {
					out, err = dc.PutEnrollmentGroup(ctx, args[0], doc, "")
				} else {
					out, err = dc.PutEnrollment(ctx, args[0], doc, "")
				}
				if err != nil {
					return err
				}
				return g.printEnrollments([]json.RawMessage{out}, group, true)
			})
		},
	}
	cf.register(create, group)

	var uf enrollmentFlags
	var etag string
	update := &cobra.Command{
		Use:   "update " + idName,
		Short: "Change an " + strings.ReplaceAll(noun, "-", " ") + " (read, change, write with its etag)",
		Args:  exactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			return withDPS(c, func(ctx context.Context, dc *service.Client) error {
				raw, err := dc.GetEnrollment(ctx, args[0], group)
				if err != nil {
					return err
				}
				var doc map[string]any
				if err := json.Unmarshal(raw, &doc); err != nil {
					return fmt.Errorf("enrollment %s: %w", args[0], err)
				}
				if err := uf.apply(c, doc, group, false); err != nil {
					return err
				}
				e, _ := doc["etag"].(string)
				if etag != "" {
					e = etag
				}
				delete(doc, "registrationState")
				var out json.RawMessage
				if group {
					out, err = dc.PutEnrollmentGroup(ctx, args[0], doc, e)
				} else {
					out, err = dc.PutEnrollment(ctx, args[0], doc, e)
				}
				if err != nil {
					return err
				}
				return g.printEnrollments([]json.RawMessage{out}, group, true)
			})
		},
	}
	uf.register(update, group)
	update.Flags().StringVar(&etag, "etag", "", "update only if the etag is this (default: the etag just read)")

	show := &cobra.Command{
		Use:     "show " + idName,
		Aliases: []string{"get"},
		Short:   "Show an " + strings.ReplaceAll(noun, "-", " "),
		Args:    exactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			return withDPS(c, func(ctx context.Context, dc *service.Client) error {
				out, err := dc.GetEnrollment(ctx, args[0], group)
				if err != nil {
					return err
				}
				return g.printEnrollments([]json.RawMessage{out}, group, true)
			})
		},
	}
	list := &cobra.Command{
		Use:   "list",
		Short: "List " + strings.ReplaceAll(noun, "-", " ") + "s",
		Args:  noArgs,
		RunE: func(c *cobra.Command, args []string) error {
			return withDPS(c, func(ctx context.Context, dc *service.Client) error {
				out, err := dc.QueryEnrollments(ctx, group)
				if err != nil {
					return err
				}
				return g.printEnrollments(out, group, false)
			})
		},
	}
	del := &cobra.Command{
		Use:   "delete " + idName,
		Short: "Delete an " + strings.ReplaceAll(noun, "-", " "),
		Args:  exactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			return withDPS(c, func(ctx context.Context, dc *service.Client) error {
				return dc.DeleteEnrollment(ctx, args[0], group)
			})
		},
	}
	cmd.AddCommand(create, show, list, update, del)
	if group {
		var key string
		compute := &cobra.Command{
			Use:   "compute-device-key REGISTRATION_ID",
			Short: "Derive a device's symmetric key from the group's key (no call to DPS)",
			Args:  exactArgs(1),
			RunE: func(c *cobra.Command, args []string) error {
				if key == "" {
					return usageError{errors.New("--key (the group's primary or secondary key) is required")}
				}
				k, err := sas.ParseKey(key)
				if err != nil {
					return usageError{fmt.Errorf("--key: %w", err)}
				}
				dk := sas.DeriveDeviceKey(k, args[0]).Base64()
				if g.output == "json" {
					return g.printJSON(map[string]string{"registrationId": args[0], "key": dk})
				}
				_, err = fmt.Fprintln(g.stdout, dk)
				return err
			},
		}
		compute.Flags().StringVar(&key, "key", "", "the group's symmetric key (base64)")
		cmd.AddCommand(compute)
	}
	return cmd
}

func registrationCommand(g *globals) *cobra.Command {
	r := &cobra.Command{Use: "registration", Short: "Device registration states"}
	show := &cobra.Command{
		Use:   "show REGISTRATION_ID",
		Short: "Show a device's registration state",
		Args:  exactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			dc, _, err := g.dpsClient()
			if err != nil {
				return err
			}
			defer dc.Close()
			ctx, cancel := context.WithTimeout(c.Context(), g.timeout)
			defer cancel()
			out, err := dc.RegistrationState(ctx, args[0])
			if err != nil {
				return err
			}
			if g.output == "json" {
				return g.printJSON(out)
			}
			var st map[string]any
			_ = json.Unmarshal(out, &st)
			return g.table([]string{"REGISTRATION", "STATUS", "DEVICE", "HUB"}, [][]string{{str(st["registrationId"]), str(st["status"]), str(st["deviceId"]), str(st["assignedHub"])}})
		},
	}
	r.AddCommand(show)
	return r
}

func str(v any) string {
	switch x := v.(type) {
	case nil:
		return "-"
	case string:
		if x == "" {
			return "-"
		}
		return x
	}
	b, _ := json.Marshal(v)
	return string(b)
}

func (g *globals) printEnrollments(items []json.RawMessage, group, single bool) error {
	if g.output == "json" {
		if single && len(items) == 1 {
			return g.printJSON(items[0])
		}
		if items == nil {
			items = []json.RawMessage{}
		}
		return g.printJSON(items)
	}
	var rows [][]string
	for _, raw := range items {
		var e hubapi.Enrollment
		if err := json.Unmarshal(raw, &e); err != nil {
			return err
		}
		att := ""
		if e.Attestation != nil {
			att = e.Attestation.Type
		}
		if group {
			rows = append(rows, []string{e.EnrollmentGroupID, att, str(e.ProvisioningStatus)})
			continue
		}
		reg := "-"
		if e.RegistrationState != nil {
			reg = str(e.RegistrationState.Status)
		}
		rows = append(rows, []string{e.RegistrationID, att, str(e.ProvisioningStatus), str(e.DeviceID), reg})
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i][0] < rows[j][0] })
	if group {
		return g.table([]string{"GROUP", "ATTESTATION", "STATUS"}, rows)
	}
	return g.table([]string{"REGISTRATION", "ATTESTATION", "STATUS", "DEVICE", "REGISTRATION STATE"}, rows)
}
