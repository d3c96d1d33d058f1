package wire

// Case is one entry of the shared topic table: a topic exactly as it crosses the wire and what
// it means. Canonical cases round-trip (Format(Parse(Topic)) == Topic); ParseOnly cases are
// spellings that real clients send and the hub must accept, but that we never emit.
type Case struct {
	Name      string
	Topic     string
	Want      Topic
	ParseOnly bool
	// Source says where the spelling was seen (protocol-device.md keys).
	Source string
}

// BadCase is a topic that must be refused.
type BadCase struct {
	Name  string
	Topic string
}

// Cases is the byte-exact topic table shared by the agent's and hubsim's tests.
var Cases = []Case{
	{Name: "telemetry, empty bag", Topic: "devices/dev1/messages/events/",
		Want: Topic{Kind: KindTelemetry, DeviceID: "dev1"}, Source: "DOC-MQTT"},
	{Name: "telemetry, system and app properties", Topic: "devices/dev1/messages/events/%24.mid=m%201&%24.ct=application%2Fjson&%24.ce=utf-8&temp=21.5",
		Want: Topic{Kind: KindTelemetry, DeviceID: "dev1", Properties: Properties{
			{Key: PropMessageID, Value: "m 1"}, {Key: PropContentType, Value: "application/json"},
			{Key: PropContentEncoding, Value: "utf-8"}, {Key: "temp", Value: "21.5"}}}, Source: "NODE-MQTT (checked here)"},
	{Name: "telemetry, null and empty values", Topic: "devices/dev1/messages/events/prop1&prop2=&prop3=a%20string",
		Want: Topic{Kind: KindTelemetry, DeviceID: "dev1", Properties: Properties{
			{Key: "prop1", Null: true}, {Key: "prop2"}, {Key: "prop3", Value: "a string"}}}, Source: "DOC-MQTT"},
	{Name: "telemetry, docs spelling with raw $", Topic: "devices/dev1/messages/events/$.ct=application%2Fjson&$.ce=utf-8",
		Want: Topic{Kind: KindTelemetry, DeviceID: "dev1", Properties: Properties{
			{Key: PropContentType, Value: "application/json"}, {Key: PropContentEncoding, Value: "utf-8"}}},
		ParseOnly: true, Source: "DOC-MQTT"},
	{Name: "telemetry, no trailing slash", Topic: "devices/dev1/messages/events",
		Want: Topic{Kind: KindTelemetry, DeviceID: "dev1"}, ParseOnly: true, Source: "MQTT clients that omit the empty bag"},
	{Name: "module telemetry with trailing slash after bag", Topic: "devices/dev1/modules/m1/messages/events/%24.on=out1/",
		Want:      Topic{Kind: KindTelemetry, DeviceID: "dev1", ModuleID: "m1", Properties: Properties{{Key: PropOutputName, Value: "out1"}}},
		ParseOnly: true, Source: "NODE-MQTT sendOutputEvent"},
	{Name: "module telemetry", Topic: "devices/dev1/modules/m1/messages/events/a=b",
		Want: Topic{Kind: KindTelemetry, DeviceID: "dev1", ModuleID: "m1", Properties: Properties{{Key: "a", Value: "b"}}}, Source: "DOC-MQTT"},
	{Name: "c2d from the C SDK tests", Topic: "devices/myDeviceId/messages/devicebound/iothub-ack=Full&%24.to=%2Fdevices%2FmyDeviceId%2Fmessages%2FdeviceBound&%24.cid=123&%24.uid=456",
		Want: Topic{Kind: KindC2D, DeviceID: "myDeviceId", Properties: Properties{
			{Key: "iothub-ack", Value: "Full"}, {Key: PropTo, Value: "/devices/myDeviceId/messages/deviceBound"},
			{Key: PropCorrelationID, Value: "123"}, {Key: PropUserID, Value: "456"}}}, Source: "C-MQTT-UT"},
	{Name: "c2d with bare null system keys", Topic: "devices/d/messages/devicebound/%24.cid&%24.uid",
		Want: Topic{Kind: KindC2D, DeviceID: "d", Properties: Properties{{Key: PropCorrelationID, Null: true}, {Key: PropUserID, Null: true}}}, Source: "C-MQTT-UT"},
	{Name: "twin get", Topic: "$iothub/twin/GET/?$rid=1",
		Want: Topic{Kind: KindTwinGet, RequestID: "1"}, Source: "DOC-MQTT"},
	{Name: "twin get, uuid rid", Topic: "$iothub/twin/GET/?$rid=5f0e4b2c-8c1a-4f5e-9a57-1c2d3e4f5a6b",
		Want: Topic{Kind: KindTwinGet, RequestID: "5f0e4b2c-8c1a-4f5e-9a57-1c2d3e4f5a6b"}, Source: "NODE-TWIN"},
	{Name: "reported patch", Topic: "$iothub/twin/PATCH/properties/reported/?$rid=42",
		Want: Topic{Kind: KindTwinPatchReported, RequestID: "42"}, Source: "DOC-MQTT"},
	{Name: "twin response 200", Topic: "$iothub/twin/res/200/?$rid=1",
		Want: Topic{Kind: KindTwinResponse, Status: 200, RequestID: "1"}, Source: "DOC-MQTT"},
	{Name: "twin response 204 with version", Topic: "$iothub/twin/res/204/?$rid=1&$version=6",
		Want: Topic{Kind: KindTwinResponse, Status: 204, RequestID: "1", Version: 6, HasVersion: true}, Source: "DOC-MQTT"},
	{Name: "twin response 429", Topic: "$iothub/twin/res/429/?$rid=b",
		Want: Topic{Kind: KindTwinResponse, Status: 429, RequestID: "b"}, Source: "DOC-MQTT"},
	{Name: "desired notification", Topic: "$iothub/twin/PATCH/properties/desired/?$version=1",
		Want: Topic{Kind: KindTwinDesired, Version: 1, HasVersion: true}, Source: "PY tests"},
	{Name: "method request", Topic: "$iothub/methods/POST/reboot/?$rid=1",
		Want: Topic{Kind: KindMethodRequest, Method: "reboot", RequestID: "1"}, Source: "DOC-MQTT"},
	{Name: "method response", Topic: "$iothub/methods/res/200/?$rid=1",
		Want: Topic{Kind: KindMethodResponse, Status: 200, RequestID: "1"}, Source: "DOC-MQTT"},
	{Name: "method response, error status", Topic: "$iothub/methods/res/500/?$rid=ab",
		Want: Topic{Kind: KindMethodResponse, Status: 500, RequestID: "ab"}, Source: "DOC-METH"},
	{Name: "twin get, unknown parameter ignored", Topic: "$iothub/twin/GET/?$rid=7&extra=1",
		Want: Topic{Kind: KindTwinGet, RequestID: "7"}, ParseOnly: true, Source: "forward compatibility"},
}

// BadCases are topics the grammar refuses.
var BadCases = []BadCase{
	{"empty", ""},
	{"plain topic", "sensors/temp"},
	{"devices without rest", "devices/dev1"},
	{"unknown device path", "devices/dev1/messages/other/"},
	{"c2d for a module", "devices/d/modules/m/messages/devicebound/"},
	{"invalid device id char", "devices/d~v/messages/events/"},
	{"device id too long", "devices/" + longID + "/messages/events/"},
	{"extra segment after bag", "devices/d/messages/events/a=b/c=d"},
	{"bad escape in bag", "devices/d/messages/events/a=%zz"},
	{"duplicate key in bag", "devices/d/messages/events/a=1&a=2"},
	{"empty key in bag", "devices/d/messages/events/=1"},
	{"invalid utf-8 in bag", "devices/d/messages/events/a=%FF"},
	{"twin get without rid", "$iothub/twin/GET/"},
	{"twin get, empty rid", "$iothub/twin/GET/?$rid="},
	{"twin response, bad status", "$iothub/twin/res/2x0/?$rid=1"},
	{"twin response, 4-digit status", "$iothub/twin/res/2000/?$rid=1"},
	{"desired without version", "$iothub/twin/PATCH/properties/desired/?$rid=1"},
	{"desired, negative version", "$iothub/twin/PATCH/properties/desired/?$version=-1"},
	{"repeated rid", "$iothub/twin/GET/?$rid=1&$rid=2"},
	{"method name with slash", "$iothub/methods/POST/a/b/?$rid=1"},
	{"method name with space", "$iothub/methods/POST/a b/?$rid=1"},
	{"unknown iothub topic", "$iothub/other/?$rid=1"},
	{"dps topic on the hub", "$dps/registrations/PUT/iotdps-register/?$rid=1"},
}

const longID = "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789"
