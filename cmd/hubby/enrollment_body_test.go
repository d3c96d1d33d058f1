package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/spf13/cobra"
)

// TestEnrollmentRequestBody pins the exact JSON hubby sends to create individual enrollments and
// enrollment groups (the client side of the DPS enrollment shape).
func TestEnrollmentRequestBody(t *testing.T) {
	pem := filepath.Join(t.TempDir(), "dev.pem")
	if err := os.WriteFile(pem, []byte("-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
	for _, c := range []struct {
		name  string
		group bool
		id    string
		args  []string
	}{
		{"enrollment-body-symkey", false, "reg-1", []string{"--primary-key", key, "--secondary-key", key, "--device-id", "dev-1",
			"--initial-twin-tags", `{"site":"lab"}`, "--initial-twin-properties", `{"interval":5}`, "--provisioning-status", "disabled",
			"--reprovision-policy", "reprovisionandresetdata", "--allocation-policy", "hashed", "--iot-hubs", "a.example,b.example", "--edge-enabled"}},
		{"enrollment-body-tpm", false, "tpm-1", []string{"--attestation-type", "tpm", "--endorsement-key", "AToAAQALAAMAsgAg"}},
		{"enrollment-body-x509", false, "dev-x", []string{"--attestation-type", "x509", "--certificate-path", pem}},
		{"group-body-symkey", true, "grp-1", []string{"--reprovision-policy", "never"}},
		{"group-body-x509-ca", true, "grp-x", []string{"--attestation-type", "x509", "--ca-name", "my-ca"}},
		{"group-body-x509-certs", true, "grp-y", []string{"--attestation-type", "x509", "--certificate-path", pem, "--secondary-certificate-path", pem}},
	} {
		var f enrollmentFlags
		cmd := &cobra.Command{Use: "create"}
		f.register(cmd, c.group)
		if err := cmd.Flags().Parse(c.args); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		idKey := "registrationId"
		if c.group {
			idKey = "enrollmentGroupId"
		}
		doc := map[string]any{idKey: c.id}
		if err := f.apply(cmd, doc, c.group, true); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		b, err := json.Marshal(doc)
		if err != nil {
			t.Fatal(err)
		}
		golden(t, c.name, string(b)+"\n")
	}
}
