package eventhubs

import (
	"strings"
	"testing"
	"time"
)

func TestParseConnectionString(t *testing.T) {
	c, err := ParseConnectionString("Endpoint=sb://localhost:5671/;SharedAccessKeyName=iothubowner;SharedAccessKey=a=b+c/;EntityPath=hub1")
	if err != nil {
		t.Fatal(err)
	}
	if c.Host != "localhost" || c.Port != "5671" || c.SharedAccessKeyName != "iothubowner" || c.SharedAccessKey != "a=b+c/" ||
		c.EntityPath != "hub1" || c.endpoint() != "sb://localhost:5671/" {
		t.Fatalf("%+v", c)
	}
	c, err = ParseConnectionString("endpoint=sb://ihsuprod.servicebus.windows.net/;sharedaccesskeyname=service;sharedaccesskey=k;entitypath=iothub-ehub-x;UseDevelopmentEmulator=true")
	if err != nil || c.Port != "" || c.Host != "ihsuprod.servicebus.windows.net" || !c.UseDevelopmentEmulator || c.endpoint() != "sb://ihsuprod.servicebus.windows.net/" {
		t.Fatalf("%+v %v", c, err)
	}
	for _, bad := range []string{
		"", "Endpoint=https://x/;SharedAccessKeyName=a;SharedAccessKey=secretkey;EntityPath=e",
		"Endpoint=sb:///;SharedAccessKeyName=a;SharedAccessKey=secretkey;EntityPath=e",
		"Endpoint=sb://x/;SharedAccessKey=secretkey;EntityPath=e",
		"Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=secretkey",
		"Endpoint=sb://x/;garbage;SharedAccessKey=secretkey",
	} {
		_, err := ParseConnectionString(bad)
		if err == nil {
			t.Errorf("%q accepted", bad)
		} else if strings.Contains(err.Error(), "secretkey") {
			t.Errorf("error shows the key: %v", err)
		}
	}
}

func TestPositions(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{Earliest().String(), "amqp.annotation.x-opt-offset > '-1'"},
		{Latest().String(), "amqp.annotation.x-opt-offset > '@latest'"},
		{FromEnqueuedTime(time.UnixMilli(1700000000123)).String(), "amqp.annotation.x-opt-enqueued-time > '1700000000123'"},
		{FromSequenceNumber(5, true).String(), "amqp.annotation.x-opt-sequence-number >= '5'"},
		{FromSequenceNumber(5, false).String(), "amqp.annotation.x-opt-sequence-number > '5'"},
		{FromOffset("42").String(), "amqp.annotation.x-opt-offset > '42'"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
}

func FuzzParseConnectionString(f *testing.F) {
	f.Add("Endpoint=sb://localhost:5671/;SharedAccessKeyName=iothubowner;SharedAccessKey=k;EntityPath=hub1")
	f.Add("Endpoint=sb://[::1]:5671/;SharedAccessKeyName=a;SharedAccessKey=b;EntityPath=c;UseDevelopmentEmulator=true")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseConnectionString(s)
		if err != nil {
			if c.SharedAccessKey != "" && len(c.SharedAccessKey) > 3 && strings.Contains(err.Error(), c.SharedAccessKey) {
				t.Fatalf("error shows the key: %v", err)
			}
			return
		}
		if c.Host == "" || c.EntityPath == "" || c.SharedAccessKey == "" || c.SharedAccessKeyName == "" {
			t.Fatalf("accepted without a required part: %+v", c)
		}
	})
}
