package connstr

import (
	"strings"
	"testing"
)

func TestParseDevice(t *testing.T) {
	c, err := Parse("HostName=hub.example;DeviceId=dev1;SharedAccessKey=abc=;GatewayHostName=localhost:8883")
	if err != nil {
		t.Fatal(err)
	}
	if c.HostName != "hub.example" || c.DeviceID != "dev1" || c.SharedAccessKey != "abc=" || c.GatewayHostName != "localhost:8883" || c.IsService() {
		t.Fatalf("%+v", c)
	}
	if got := c.String(); got != "HostName=hub.example;DeviceId=dev1;SharedAccessKey=abc=;GatewayHostName=localhost:8883" {
		t.Fatalf("String = %s", got)
	}
	if strings.Contains(c.Redacted(), "abc") {
		t.Fatalf("Redacted leaks: %s", c.Redacted())
	}
}

func TestParseServiceAndX509(t *testing.T) {
	c, err := Parse(" hostname=localhost;sharedaccesskeyname=iothubowner;sharedaccesskey=k== ")
	if err != nil || !c.IsService() || c.SharedAccessKeyName != "iothubowner" || c.SharedAccessKey != "k==" {
		t.Fatalf("%+v %v", c, err)
	}
	c, err = Parse("HostName=h;DeviceId=d;x509=true")
	if err != nil || !c.X509 || c.String() != "HostName=h;DeviceId=d;x509=true" {
		t.Fatalf("%+v %v", c, err)
	}
}

func TestParseErrors(t *testing.T) {
	for _, s := range []string{
		"",
		"DeviceId=d;SharedAccessKey=k",
		"HostName=h;SharedAccessKey=k",
		"HostName=h;DeviceId=d",
		"HostName=h;DeviceId=d;SharedAccessKey=k;Bogus=1",
		"HostName=h;DeviceId=d;DeviceId=e;SharedAccessKey=k",
		"HostName=h;DeviceId;SharedAccessKey=k",
	} {
		if _, err := Parse(s); err == nil {
			t.Errorf("Parse(%q) succeeded", s)
		} else if strings.Contains(err.Error(), "k") && strings.Contains(s, "SharedAccessKey=k;") && strings.Contains(err.Error(), "=k") {
			t.Errorf("error leaks the key: %v", err)
		}
	}
}
