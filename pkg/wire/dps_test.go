package wire

import (
	"errors"
	"strings"
	"testing"
)

// DPSCases are DPS topics exactly as they cross the wire (protocol-device.md §2.3).
var DPSCases = []struct {
	Name, Topic string
	Want        DPSTopic
}{
	{"register, uuid rid", "$dps/registrations/PUT/iotdps-register/?$rid=0b6a3c6e-1b1a-4f55-9f3e-6f1f1c1f1a2b",
		DPSTopic{Kind: DPSRegister, RequestID: "0b6a3c6e-1b1a-4f55-9f3e-6f1f1c1f1a2b"}},
	{"poll", "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=5.316aac5bdc130deb.b1e02da8",
		DPSTopic{Kind: DPSPoll, RequestID: "2", OperationID: "5.316aac5bdc130deb.b1e02da8"}},
	{"202 with retry-after", "$dps/registrations/res/202/?$rid=1&retry-after=3",
		DPSTopic{Kind: DPSResponse, RequestID: "1", Status: 202, RetryAfter: 3, HasRetryAfter: true}},
	{"200", "$dps/registrations/res/200/?$rid=1", DPSTopic{Kind: DPSResponse, RequestID: "1", Status: 200}},
	{"401", "$dps/registrations/res/401/?$rid=1", DPSTopic{Kind: DPSResponse, RequestID: "1", Status: 401}},
}

func TestDPSTopics(t *testing.T) {
	for _, c := range DPSCases {
		got, err := ParseDPSTopic(c.Topic)
		if err != nil || got != c.Want {
			t.Errorf("%s: ParseDPSTopic(%q) = %+v, %v; want %+v", c.Name, c.Topic, got, err, c.Want)
		}
		var s string
		switch got.Kind {
		case DPSRegister:
			s = DPSRegisterTopic(got.RequestID)
		case DPSPoll:
			s = DPSPollTopic(got.RequestID, got.OperationID)
		case DPSResponse:
			ra := -1
			if got.HasRetryAfter {
				ra = got.RetryAfter
			}
			s = DPSResponseTopic(got.Status, got.RequestID, ra)
		}
		if s != c.Topic {
			t.Errorf("%s: formatted %q, want %q", c.Name, s, c.Topic)
		}
	}
	for _, bad := range []string{
		"$dps/registrations/PUT/iotdps-register/", "$dps/registrations/PUT/iotdps-register/?x=1",
		"$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1", "$dps/registrations/res/20/?$rid=1",
		"$dps/registrations/res/202/?$rid=1&retry-after=-1", "$dps/registrations/res/202?$rid=1",
		"$dps/other", "devices/x/messages/events/", "$dps/registrations/res/abc/?$rid=1",
	} {
		if _, err := ParseDPSTopic(bad); !errors.Is(err, ErrTopic) {
			t.Errorf("ParseDPSTopic(%q) = %v, want ErrTopic", bad, err)
		}
	}
}

func TestDPSUsername(t *testing.T) {
	u := DPSUsernameString("0ne00000001", "dev-1", "iothubby/0.1 (go)")
	if u != "0ne00000001/registrations/dev-1/api-version=2019-03-31&ClientVersion=iothubby%2F0.1%20%28go%29" {
		t.Fatalf("username %q", u)
	}
	d, err := ParseDPSUsername(u)
	if err != nil || d.IDScope != "0ne00000001" || d.RegistrationID != "dev-1" || d.APIVersion != DPSAPIVersion || d.ClientVersion != "iothubby/0.1 (go)" {
		t.Fatalf("%+v %v", d, err)
	}
	node := "0ne00000001/registrations/sym1/api-version=2019-03-31&ClientVersion=azure-iot-provisioning-device%2F1.9.1"
	if !IsDPSUsername(node) {
		t.Fatal("node user name not recognised")
	}
	if d, err := ParseDPSUsername(node); err != nil || d.ClientVersion != "azure-iot-provisioning-device/1.9.1" {
		t.Fatalf("%+v %v", d, err)
	}
	for _, hubName := range []string{"localhost/dev1/?api-version=2021-04-12", "myhub.azure-devices.net/dev1/api-version=2018-06-30", ""} {
		if IsDPSUsername(hubName) {
			t.Errorf("%q taken for DPS", hubName)
		}
	}
	for _, bad := range []string{"s/registrations//api-version=1", "/registrations/a/api-version=1", "s/registrations/a/x=1", "s/registrations/a b/api-version=1"} {
		if _, err := ParseDPSUsername(bad); !errors.Is(err, ErrDPSUsername) {
			t.Errorf("ParseDPSUsername(%q) = %v", bad, err)
		}
	}
}

func TestValidateRegistrationID(t *testing.T) {
	for _, ok := range []string{"a", "dev-1", "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6", "a.b_c:d", strings.Repeat("x", 128), "x-"} {
		if err := ValidateRegistrationID(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".a", "a.", "a/b", "a b", strings.Repeat("x", 129), "é"} {
		if err := ValidateRegistrationID(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestParseDPSReply(t *testing.T) {
	op, err := ParseDPSReply(202, []byte(`{"operationId":"op1","status":"assigning"}`))
	if err != nil || op.OperationID != "op1" || op.Status != DPSStatusAssigning {
		t.Fatalf("%+v %v", op, err)
	}
	op, err = ParseDPSReply(200, []byte(`{"operationId":"op1","status":"assigned","registrationState":{"registrationId":"r","assignedHub":"h","deviceId":"d","status":"assigned","substatus":"initialAssignment","payload":{"a":1}}}`))
	if err != nil || op.RegistrationState.AssignedHub != "h" || string(op.RegistrationState.Payload) != `{"a":1}` {
		t.Fatalf("%+v %v", op, err)
	}
	if _, err := ParseDPSReply(200, []byte(`{"operationId":"op1","status":"assigned","registrationState":{"status":"assigned"}}`)); err == nil {
		t.Fatal("assigned without hub accepted")
	}
	if _, err := ParseDPSReply(200, []byte(`{"status":"assigning"}`)); err == nil {
		t.Fatal("no operationId accepted")
	}
	if _, err := ParseDPSReply(200, []byte(`{"operationId":"o","status":"weird"}`)); err == nil {
		t.Fatal("unknown status accepted")
	}
	_, err = ParseDPSReply(401, []byte(`{"errorCode":401002,"trackingId":"t","message":"Unauthorized"}`))
	var de *DPSError
	if !errors.As(err, &de) || de.ErrorCode != 401002 || de.Retryable() {
		t.Fatalf("%v", err)
	}
	_, err = ParseDPSReply(503, []byte(`garbage`))
	if !errors.As(err, &de) || de.ErrorCode != 503000 || !de.Retryable() {
		t.Fatalf("%v", err)
	}
}

// FuzzParseDPSTopic: never panics; accepted topics format back to themselves' meaning.
func FuzzParseDPSTopic(f *testing.F) {
	for _, c := range DPSCases {
		f.Add(c.Topic)
	}
	f.Add("$dps/registrations/res/202/?$rid=%ZZ")
	f.Fuzz(func(t *testing.T, topic string) {
		got, err := ParseDPSTopic(topic)
		if err != nil {
			return
		}
		if got.RequestID == "" || got.Kind == DPSUnknown {
			t.Fatalf("%q accepted as %+v", topic, got)
		}
		if got.Kind == DPSPoll && got.OperationID == "" {
			t.Fatalf("%q: poll without operation", topic)
		}
	})
}

// FuzzParseDPSReply: the agent's DPS reply parser never panics, and what it accepts is usable.
func FuzzParseDPSReply(f *testing.F) {
	f.Add(200, []byte(`{"operationId":"o","status":"assigned","registrationState":{"assignedHub":"h","deviceId":"d","status":"assigned"}}`))
	f.Add(202, []byte(`{"operationId":"o","status":"assigning"}`))
	f.Add(429, []byte(`{"errorCode":429001,"message":"throttled"}`))
	f.Add(401, []byte(``))
	f.Fuzz(func(t *testing.T, status int, body []byte) {
		op, err := ParseDPSReply(status, body)
		if err != nil {
			var de *DPSError
			if errors.As(err, &de) && de.Status != status {
				t.Fatalf("status %d reported as %d", status, de.Status)
			}
			return
		}
		if op.OperationID == "" {
			t.Fatal("accepted without operationId")
		}
		if op.Status == DPSStatusAssigned && (op.RegistrationState == nil || op.RegistrationState.AssignedHub == "") {
			t.Fatal("assigned without hub")
		}
	})
}
