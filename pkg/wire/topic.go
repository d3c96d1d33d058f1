// Package wire is the IoT Hub device MQTT grammar: topic names and filters for telemetry,
// cloud-to-device messages, device twins and direct methods, property bags with percent-encoded
// system keys, and Azure's error bodies. It is shared by the agent and hubsim and does no I/O.
//
// Every function is pure. [Cases] is the table of byte-exact topics that both sides' tests use.
package wire

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Subscription filters a device uses. A device may hold at most five subscriptions.
const (
	TwinResponseFilter = "$iothub/twin/res/#"
	TwinDesiredFilter  = "$iothub/twin/PATCH/properties/desired/#"
	MethodsFilter      = "$iothub/methods/POST/#"
)

// MaxTopicLength is MQTT's limit on a topic name (a length-prefixed string of at most 65,535
// bytes), the only limit on a topic IoT Hub applies; Parse refuses longer ones.
const MaxTopicLength = 65535

// ErrTopic is wrapped by every topic and filter parsing error.
var ErrTopic = errors.New("wire: unknown or malformed topic")

// Kind says which IoT Hub operation a topic carries.
type Kind uint8

// Topic kinds. The comment gives the direction.
const (
	KindUnknown           Kind = iota
	KindTelemetry              // device to hub: devices/{id}[/modules/{m}]/messages/events/{bag}
	KindC2D                    // hub to device: devices/{id}/messages/devicebound/{bag}
	KindTwinGet                // device to hub: $iothub/twin/GET/?$rid={rid}
	KindTwinPatchReported      // device to hub: $iothub/twin/PATCH/properties/reported/?$rid={rid}
	KindTwinResponse           // hub to device: $iothub/twin/res/{status}/?$rid={rid}[&$version={v}]
	KindTwinDesired            // hub to device: $iothub/twin/PATCH/properties/desired/?$version={v}
	KindMethodRequest          // hub to device: $iothub/methods/POST/{name}/?$rid={rid}
	KindMethodResponse         // device to hub: $iothub/methods/res/{status}/?$rid={rid}
)

var kindNames = [...]string{"unknown", "telemetry", "c2d", "twin-get", "twin-patch-reported",
	"twin-response", "twin-desired", "method-request", "method-response"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// FromDevice reports whether devices publish topics of this kind (as opposed to the hub).
func (k Kind) FromDevice() bool {
	switch k {
	case KindTelemetry, KindTwinGet, KindTwinPatchReported, KindMethodResponse:
		return true
	}
	return false
}

// Topic is a parsed IoT Hub topic. Which fields are meaningful depends on Kind.
type Topic struct {
	Kind Kind
	// DeviceID and ModuleID: telemetry and cloud-to-device topics.
	DeviceID string
	ModuleID string
	// Properties: the property bag of telemetry and cloud-to-device topics.
	Properties Properties
	// RequestID is $rid: twin requests and responses, method requests and responses.
	RequestID string
	// Status: twin responses and method responses.
	Status int
	// Version is $version: twin desired notifications, and twin responses when HasVersion.
	Version    int64
	HasVersion bool
	// Method is the direct method's name.
	Method string
}

// Telemetry returns the topic a device publishes telemetry to.
func Telemetry(deviceID string, props Properties) string {
	return "devices/" + deviceID + "/messages/events/" + EncodeProperties(props)
}

// ModuleTelemetry returns the topic a module publishes telemetry to.
func ModuleTelemetry(deviceID, moduleID string, props Properties) string {
	return "devices/" + deviceID + "/modules/" + moduleID + "/messages/events/" + EncodeProperties(props)
}

// C2D returns the topic the hub delivers a cloud-to-device message on.
func C2D(deviceID string, props Properties) string {
	return "devices/" + deviceID + "/messages/devicebound/" + EncodeProperties(props)
}

// C2DFilter is the filter a device subscribes to for cloud-to-device messages.
func C2DFilter(deviceID string) string { return "devices/" + deviceID + "/messages/devicebound/#" }

// TwinGet returns the topic of a full twin request.
func TwinGet(rid string) string { return "$iothub/twin/GET/?$rid=" + rid }

// TwinPatchReported returns the topic of a reported-properties patch.
func TwinPatchReported(rid string) string {
	return "$iothub/twin/PATCH/properties/reported/?$rid=" + rid
}

// TwinResponse returns the topic of a twin response. version < 0 leaves $version out.
func TwinResponse(status int, rid string, version int64) string {
	s := "$iothub/twin/res/" + strconv.Itoa(status) + "/?$rid=" + rid
	if version >= 0 {
		s += "&$version=" + strconv.FormatInt(version, 10)
	}
	return s
}

// TwinDesired returns the topic of a desired-properties notification.
func TwinDesired(version int64) string {
	return "$iothub/twin/PATCH/properties/desired/?$version=" + strconv.FormatInt(version, 10)
}

// MethodRequest returns the topic a direct-method call is delivered on.
func MethodRequest(method, rid string) string {
	return "$iothub/methods/POST/" + method + "/?$rid=" + rid
}

// MethodResponse returns the topic a device answers a direct method on.
func MethodResponse(status int, rid string) string {
	return "$iothub/methods/res/" + strconv.Itoa(status) + "/?$rid=" + rid
}

// Format renders t; it is the inverse of Parse for the canonical forms.
func Format(t Topic) (string, error) {
	switch t.Kind {
	case KindTelemetry:
		if t.ModuleID != "" {
			return ModuleTelemetry(t.DeviceID, t.ModuleID, t.Properties), nil
		}
		return Telemetry(t.DeviceID, t.Properties), nil
	case KindC2D:
		return C2D(t.DeviceID, t.Properties), nil
	case KindTwinGet:
		return TwinGet(t.RequestID), nil
	case KindTwinPatchReported:
		return TwinPatchReported(t.RequestID), nil
	case KindTwinResponse:
		v := int64(-1)
		if t.HasVersion {
			v = t.Version
		}
		return TwinResponse(t.Status, t.RequestID, v), nil
	case KindTwinDesired:
		return TwinDesired(t.Version), nil
	case KindMethodRequest:
		return MethodRequest(t.Method, t.RequestID), nil
	case KindMethodResponse:
		return MethodResponse(t.Status, t.RequestID), nil
	}
	return "", fmt.Errorf("%w: cannot format kind %v", ErrTopic, t.Kind)
}

// Parse parses any topic of the IoT Hub device grammar, in either direction. It tolerates what
// Microsoft's SDKs send (a trailing '/' after a property bag, un-encoded '$' in system keys) and
// rejects everything else with an error wrapping ErrTopic or ErrPropertyBag.
func Parse(topic string) (Topic, error) {
	if len(topic) > MaxTopicLength {
		return Topic{}, fmt.Errorf("%w: %d bytes", ErrTopic, len(topic))
	}
	if rest, ok := strings.CutPrefix(topic, "devices/"); ok {
		return parseDevices(rest)
	}
	if rest, ok := strings.CutPrefix(topic, "$iothub/"); ok {
		return parseIoTHub(rest, topic)
	}
	return Topic{}, fmt.Errorf("%w: %q", ErrTopic, clip(topic))
}

func parseDevices(rest string) (Topic, error) {
	dev, rest, ok := strings.Cut(rest, "/")
	if !ok || validMQTTID(dev) != nil {
		return Topic{}, fmt.Errorf("%w: bad device id in %q", ErrTopic, clip(rest))
	}
	t := Topic{DeviceID: dev}
	if r, ok := strings.CutPrefix(rest, "modules/"); ok {
		mod, r2, ok := strings.Cut(r, "/")
		if !ok || validMQTTID(mod) != nil {
			return Topic{}, fmt.Errorf("%w: bad module id", ErrTopic)
		}
		t.ModuleID, rest = mod, r2
	}
	var bag string
	switch {
	case strings.HasPrefix(rest, "messages/events/"):
		t.Kind, bag = KindTelemetry, rest[len("messages/events/"):]
	case rest == "messages/events":
		t.Kind = KindTelemetry
	case strings.HasPrefix(rest, "messages/devicebound/") && t.ModuleID == "":
		t.Kind, bag = KindC2D, rest[len("messages/devicebound/"):]
	default:
		return Topic{}, fmt.Errorf("%w: devices/%s/%s", ErrTopic, dev, clip(rest))
	}
	// Node's sendOutputEvent appends '/' after the bag; some clients send "/?" before it.
	bag = strings.TrimSuffix(bag, "/")
	bag = strings.TrimPrefix(bag, "?")
	if strings.Contains(bag, "/") {
		return Topic{}, fmt.Errorf("%w: extra path segment after %s", ErrTopic, t.Kind)
	}
	props, err := DecodeProperties(bag)
	if err != nil {
		return Topic{}, err
	}
	t.Properties = props
	return t, nil
}

func parseIoTHub(rest, full string) (Topic, error) {
	path, query, ok := strings.Cut(rest, "/?")
	if !ok {
		return Topic{}, fmt.Errorf("%w: %q has no parameters", ErrTopic, clip(full))
	}
	params, err := parseParams(query)
	if err != nil {
		return Topic{}, err
	}
	var t Topic
	needRID := true
	switch {
	case path == "twin/GET":
		t.Kind = KindTwinGet
	case path == "twin/PATCH/properties/reported":
		t.Kind = KindTwinPatchReported
	case path == "twin/PATCH/properties/desired":
		t.Kind, needRID = KindTwinDesired, false
		v, ok := params["$version"]
		if !ok {
			return Topic{}, fmt.Errorf("%w: desired notification without $version", ErrTopic)
		}
		if t.Version, err = parseVersion(v); err != nil {
			return Topic{}, err
		}
		t.HasVersion = true
	case strings.HasPrefix(path, "twin/res/"):
		t.Kind = KindTwinResponse
		if t.Status, err = parseStatus(path[len("twin/res/"):]); err != nil {
			return Topic{}, err
		}
		if v, ok := params["$version"]; ok {
			if t.Version, err = parseVersion(v); err != nil {
				return Topic{}, err
			}
			t.HasVersion = true
		}
	case strings.HasPrefix(path, "methods/POST/"):
		t.Kind = KindMethodRequest
		t.Method = path[len("methods/POST/"):]
		if err := ValidateMethodName(t.Method); err != nil {
			return Topic{}, err
		}
	case strings.HasPrefix(path, "methods/res/"):
		t.Kind = KindMethodResponse
		if t.Status, err = parseStatus(path[len("methods/res/"):]); err != nil {
			return Topic{}, err
		}
	default:
		return Topic{}, fmt.Errorf("%w: %q", ErrTopic, clip(full))
	}
	if rid, ok := params["$rid"]; ok {
		t.RequestID = rid
	}
	if needRID && t.RequestID == "" {
		return Topic{}, fmt.Errorf("%w: %v without $rid", ErrTopic, t.Kind)
	}
	return t, nil
}

// parseParams reads "$rid=1&$version=2". Unknown parameters are ignored; a repeated one is an
// error, since the two values could disagree.
func parseParams(q string) (map[string]string, error) {
	m := make(map[string]string, 2)
	for seg := range strings.SplitSeq(q, "&") {
		if seg == "" {
			continue
		}
		k, v, _ := strings.Cut(seg, "=")
		dk, err := unescape(k)
		if err != nil {
			return nil, fmt.Errorf("%w: parameter %q: %v", ErrTopic, clip(k), err)
		}
		dv, err := unescape(v)
		if err != nil {
			return nil, fmt.Errorf("%w: parameter %q: %v", ErrTopic, dk, err)
		}
		if _, dup := m[dk]; dup {
			return nil, fmt.Errorf("%w: parameter %q repeated", ErrTopic, dk)
		}
		m[dk] = dv
	}
	return m, nil
}

func parseStatus(s string) (int, error) {
	if len(s) != 3 {
		return 0, fmt.Errorf("%w: status %q is not three digits", ErrTopic, clip(s))
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 100 {
		return 0, fmt.Errorf("%w: status %q", ErrTopic, s)
	}
	return n, nil
}

func parseVersion(s string) (int64, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%w: $version %q", ErrTopic, clip(s))
	}
	return n, nil
}

// DeviceIDSpecials are the characters besides ASCII letters and digits that IoT Hub's identity
// registry documentation allows in device and module IDs (current revision; the 2018 one lacked
// ':'). '+' and '#' are listed as not supported (MQTT wildcards: the device SDKs cannot use them,
// and they must never appear raw in a topic name); ';' separates connection-string fields and
// '/' path segments, so neither is ever allowed.
const DeviceIDSpecials = "-.%_*?!(),:=@$'"

// ValidateDeviceID checks a device or module ID against IoT Hub's rules: 1 to 128 characters,
// ASCII letters and digits and DeviceIDSpecials.
func ValidateDeviceID(id string) error {
	if id == "" || len(id) > 128 {
		return fmt.Errorf("wire: device id must be 1 to 128 characters, got %d", len(id))
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			strings.IndexByte(DeviceIDSpecials, c) >= 0 {
			continue
		}
		if c == '+' || c == '#' {
			return fmt.Errorf("wire: device id has %q, which IoT Hub does not support (an MQTT wildcard)", c)
		}
		return fmt.Errorf("wire: device id has invalid character %q (allowed: letters, digits and %s)", c, DeviceIDSpecials)
	}
	return nil
}

// validMQTTID is ValidateDeviceID for IDs inside MQTT topics and filters, where '+' and '#'
// are wildcards: a device whose ID contains them cannot use MQTT.
func validMQTTID(id string) error {
	if strings.ContainsAny(id, "+#") {
		return fmt.Errorf("wire: device id %q contains an MQTT wildcard", clip(id))
	}
	return ValidateDeviceID(id)
}

// ValidateMethodName checks a direct method name: printable US-ASCII excluding
// $ ( ) < > @ , ; : \ " / [ ] ? = { }, space and tab; at most 128 characters.
func ValidateMethodName(name string) error {
	if name == "" || len(name) > 128 {
		return fmt.Errorf("%w: method name must be 1 to 128 characters", ErrTopic)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; !methodNameByte(c) {
			return fmt.Errorf("%w: method name has invalid character %q", ErrTopic, c)
		}
	}
	return nil
}

// methodNameOK is ValidateMethodName without the error, for ParseQuick.
func methodNameOK(name string) bool {
	if name == "" || len(name) > 128 {
		return false
	}
	for i := 0; i < len(name); i++ {
		if !methodNameByte(name[i]) {
			return false
		}
	}
	return true
}

// methodNameByte reports whether c may appear in a direct method's name: printable US-ASCII
// except HTTP token separators and the MQTT wildcards (the name goes raw into a topic name).
func methodNameByte(c byte) bool {
	return c > ' ' && c < 0x7f && strings.IndexByte(`$()<>@,;:\"/[]?={}+#`, c) < 0
}

// FilterKind says what a subscription filter subscribes to.
type FilterKind uint8

// Filter kinds a device may subscribe to.
const (
	FilterUnknown FilterKind = iota
	FilterC2D
	FilterModuleInputs
	FilterTwinResponse
	FilterTwinDesired
	FilterMethods
)

// Filter is a parsed subscription filter.
type Filter struct {
	Kind     FilterKind
	DeviceID string
	ModuleID string
}

// ParseFilter accepts only the documented subscription filters: devicebound for a device,
// inputs for a module (both spellings in use), twin responses, desired notifications and
// methods. Anything else, including other wildcards, is an error: IoT Hub closes the connection
// rather than refusing one filter.
func ParseFilter(f string) (Filter, error) {
	switch f {
	case TwinResponseFilter:
		return Filter{Kind: FilterTwinResponse}, nil
	case TwinDesiredFilter:
		return Filter{Kind: FilterTwinDesired}, nil
	case MethodsFilter:
		return Filter{Kind: FilterMethods}, nil
	}
	rest, ok := strings.CutPrefix(f, "devices/")
	if !ok {
		return Filter{}, fmt.Errorf("%w: filter %q", ErrTopic, clip(f))
	}
	dev, rest, _ := strings.Cut(rest, "/")
	if validMQTTID(dev) != nil {
		return Filter{}, fmt.Errorf("%w: filter %q", ErrTopic, clip(f))
	}
	if rest == "messages/devicebound/#" {
		return Filter{Kind: FilterC2D, DeviceID: dev}, nil
	}
	if r, ok := strings.CutPrefix(rest, "modules/"); ok {
		mod, r2, _ := strings.Cut(r, "/")
		if validMQTTID(mod) == nil && (r2 == "inputs/#" || r2 == "#") {
			return Filter{Kind: FilterModuleInputs, DeviceID: dev, ModuleID: mod}, nil
		}
	}
	return Filter{}, fmt.Errorf("%w: filter %q", ErrTopic, clip(f))
}

func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}
