package hubapi

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestDeviceReadsWhatClientsSend: the minimal bodies Microsoft's Node SDK sends (protocol-service.md
// §1.3) read as the device they describe; nulls and missing slots read as empty; an
// unparseable time reads as never.
func TestDeviceReadsWhatClientsSend(t *testing.T) {
	for _, c := range []struct {
		body string
		want Device
	}{
		{`{"deviceId":"dev1","status":"enabled","authentication":{"type":"sas","symmetricKey":{"primaryKey":"","secondaryKey":""}}}`,
			Device{DeviceID: "dev1", Status: StatusEnabled, Authentication: Authentication{Type: AuthSAS}}},
		{`{"deviceId":"dev2","authentication":{"x509Thumbprint":{"primaryThumbprint":"AB","secondaryThumbprint":"CD"},"type":"selfSigned"}}`,
			Device{DeviceID: "dev2", Authentication: Authentication{Type: AuthSelfSigned, X509Thumbprint: X509Thumbprint{"AB", "CD"}}}},
		{`{"deviceId":"d3","statusReason":null,"authentication":null,"capabilities":{"iotEdge":true},"lastActivityTime":"yesterday","extra":[1]}`,
			Device{DeviceID: "d3", Capabilities: Capabilities{IoTEdge: true}}},
		{`{"deviceId":"d4","lastActivityTime":"0001-01-01T00:00:00Z","connectionStateUpdatedTime":"2026-12-02T04:05:06.1234567Z"}`,
			Device{DeviceID: "d4", ConnectionStateUpdatedTime: time.Date(2026, 12, 2, 4, 5, 6, 123456700, time.UTC)}},
	} {
		var got Device
		if err := json.Unmarshal([]byte(c.body), &got); err != nil {
			t.Fatalf("%s: %v", c.body, err)
		}
		if !got.ConnectionStateUpdatedTime.Equal(c.want.ConnectionStateUpdatedTime) {
			t.Errorf("%s: connectionStateUpdatedTime %v, want %v", c.body, got.ConnectionStateUpdatedTime, c.want.ConnectionStateUpdatedTime)
		}
		got.ConnectionStateUpdatedTime, c.want.ConnectionStateUpdatedTime = time.Time{}, time.Time{}
		if got != c.want {
			t.Errorf("%s:\n got %+v\nwant %+v", c.body, got, c.want)
		}
	}
	for _, bad := range []string{`[]`, `{"deviceId":1}`, `{"authentication":{"type":7}}`, `{"capabilities":"x"}`} {
		var d Device
		if err := json.Unmarshal([]byte(bad), &d); err == nil {
			t.Errorf("%s: read as %+v, want an error", bad, d)
		}
	}
}

// TestAuthenticationAlone: a bulk row carries an authentication on its own; it renders Azure's
// full mechanism, nulls for the slots it does not use.
func TestAuthenticationAlone(t *testing.T) {
	b, err := json.Marshal(struct {
		A *Authentication `json:"authentication,omitempty"`
	}{&Authentication{Type: AuthSAS, SymmetricKey: SymmetricKey{PrimaryKey: "k1"}}})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"authentication":{"symmetricKey":{"primaryKey":"k1","secondaryKey":null},"x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"type":"sas"}}`
	if string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
}

// FuzzDevice: any JSON that reads as a device renders to JSON that reads back to the same
// device, and that rendering is stable.
func FuzzDevice(f *testing.F) {
	f.Add(`{"deviceId":"dev1","status":"enabled","authentication":{"type":"sas","symmetricKey":{"primaryKey":"","secondaryKey":""}}}`)
	f.Add(`{"deviceId":"d","generationId":"1","etag":"MQ==","connectionState":"Connected","status":"disabled","statusReason":"r","connectionStateUpdatedTime":"2026-12-02T04:05:06.1234567Z","statusUpdatedTime":"2026-12-02T04:05:06+02:00","lastActivityTime":"0001-01-01T00:00:00Z","cloudToDeviceMessageCount":3,"authentication":{"symmetricKey":null,"x509Thumbprint":{"primaryThumbprint":"AB","secondaryThumbprint":null},"type":"selfSigned"},"capabilities":{"iotEdge":true}}`)
	f.Add(`{"deviceId":"\u00e9","lastActivityTime":"9999-12-31T23:59:59.9999999Z"}`)
	f.Fuzz(func(t *testing.T, s string) {
		var d Device
		if json.Unmarshal([]byte(s), &d) != nil {
			return
		}
		b1, err := json.Marshal(d)
		if err != nil {
			if strings.Contains(err.Error(), "year outside of range") {
				return
			}
			t.Fatalf("marshal %+v: %v", d, err)
		}
		var back Device
		if err := json.Unmarshal(b1, &back); err != nil {
			t.Fatalf("%s does not read back: %v", b1, err)
		}
		b2, _ := json.Marshal(back)
		if string(b1) != string(b2) {
			t.Fatalf("unstable rendering:\n%s\n%s", b1, b2)
		}
	})
}
