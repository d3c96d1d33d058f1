package broker

import (
	"errors"
	"strings"
	"testing"

	"github.com/iothubby/iothubby/pkg/wire"
)

func TestParseUsername(t *testing.T) {
	ok := []struct {
		user, client string
		want         Username
	}{
		{"hub.azure-devices.net/dev1/?api-version=2021-04-12", "dev1",
			Username{Host: "hub.azure-devices.net", DeviceID: "dev1", APIVersion: "2021-04-12"}},
		{"localhost:8883/dev1/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4%20(node)&model-id=dtmi%3Acom%3Aa%3B1", "dev1",
			Username{Host: "localhost:8883", DeviceID: "dev1", APIVersion: "2021-04-12", ClientType: "azure-iot-device/1.18.4 (node)", ModelID: "dtmi:com:a;1"}},
		{"h/dev1/api-version=2016-11-14", "dev1", Username{Host: "h", DeviceID: "dev1", APIVersion: "2016-11-14"}},
		{"h/dev1/", "dev1", Username{Host: "h", DeviceID: "dev1"}},
		{"h/dev1/DeviceUpdate/?api-version=2020-09-30&DeviceClientType=iothubclient%2f1.9.0", "dev1/DeviceUpdate",
			Username{Host: "h", DeviceID: "dev1", ModuleID: "DeviceUpdate", APIVersion: "2020-09-30", ClientType: "iothubclient/1.9.0"}},
		{"h/a?b/?api-version=1&x&=y&bad=%zz", "a?b", Username{Host: "h", DeviceID: "a?b", APIVersion: "1"}},
		{"h/dev1/?api-version=a+b", "dev1", Username{Host: "h", DeviceID: "dev1", APIVersion: "a+b"}},
	}
	for _, c := range ok {
		got, err := ParseUsername(c.user, c.client)
		if err != nil || got != c.want {
			t.Errorf("ParseUsername(%q, %q) = %+v, %v; want %+v", c.user, c.client, got, err, c.want)
		}
	}
	bad := []struct{ user, client string }{
		{"", "dev1"},
		{"/dev1/?api-version=1", "dev1"},
		{"h/dev1?api-version=1", "dev1"},
		{"h/dev2/?api-version=1", "dev1"},
		{"h/dev1", "dev1"},
		{"h/dev1/?", ""},
		{"h/dev 1/", "dev 1"},
		{"h/dev1/m 1/", "dev1/m 1"},
		{"h/dev1/mod/?x", "dev1"},
	}
	for _, c := range bad {
		if _, err := ParseUsername(c.user, c.client); !errors.Is(err, ErrUsername) && c.user != "h/dev1/mod/?x" {
			t.Errorf("ParseUsername(%q, %q) = %v, want ErrUsername", c.user, c.client, err)
		}
	}
	// "h/dev1/mod/?x" for client dev1 parses (the query is "mod/?x"), with no parameters.
	if u, err := ParseUsername("h/dev1/mod/?x", "dev1"); err != nil || u.DeviceID != "dev1" || u.ModuleID != "" {
		t.Errorf("%+v %v", u, err)
	}
}

func TestHostMatches(t *testing.T) {
	for _, c := range []struct {
		got, hub string
		want     bool
	}{
		{"localhost", "localhost", true},
		{"LocalHost:8883", "localhost", true},
		{"localhost", "localhost:443", true},
		{"otherhost", "localhost", false},
		{"localhost.evil", "localhost", false},
	} {
		if hostMatches(c.got, c.hub) != c.want {
			t.Errorf("hostMatches(%q, %q) != %v", c.got, c.hub, c.want)
		}
	}
}

func FuzzParseUsername(f *testing.F) {
	f.Add("hub/dev1/?api-version=2021-04-12&model-id=dtmi%3Aa%3B1", "dev1")
	f.Add("hub/dev1/mod/?api-version=2020-09-30", "dev1/mod")
	f.Add("hub/dev1/api-version=2016-11-14", "dev1")
	f.Add("h//", "/")
	f.Add("h/%/?%", "%")
	f.Fuzz(func(t *testing.T, user, client string) {
		u, err := ParseUsername(user, client)
		if err != nil {
			return
		}
		if u.Host == "" || strings.Contains(u.Host, "/") {
			t.Fatalf("host %q", u.Host)
		}
		if wire.ValidateDeviceID(u.DeviceID) != nil {
			t.Fatalf("device id %q", u.DeviceID)
		}
		if u.ModuleID != "" && wire.ValidateDeviceID(u.ModuleID) != nil {
			t.Fatalf("module id %q", u.ModuleID)
		}
		id := u.DeviceID
		if u.ModuleID != "" {
			id += "/" + u.ModuleID
		}
		if id != client || !strings.HasPrefix(user, u.Host+"/"+client+"/") {
			t.Fatalf("parsed %+v from %q for client %q", u, user, client)
		}
	})
}
