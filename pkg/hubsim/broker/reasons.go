package broker

// Why hubsim closes a device connection: the Reason of an EventDisconnected and the "reason" of
// the "closing device connection" log line. Tests compare against these names, not copies.
const (
	ReasonQoS2Publish          = "QoS 2 publish"
	ReasonWildcardTopic        = "wildcard in a topic name"
	ReasonBadPropertyBag       = "telemetry with a malformed property bag" // followed by " (the parse error)"
	ReasonNotDeviceTopic       = "publish to a topic devices may not publish to"
	ReasonOtherDeviceTelemetry = "publish to another device's telemetry topic"
	ReasonTelemetryTooLarge    = "telemetry message over 256 KB"
	ReasonUndocumentedFilter   = "subscription to an undocumented filter"
	ReasonOtherDeviceFilter    = "subscription to another device's filter"
	ReasonTooManySubscriptions = "more than 5 subscriptions"
	ReasonQoS2Flow             = "QoS 2 flow packet"
	ReasonAuthPacket           = "AUTH packet"
	ReasonDeviceDeleted        = "device deleted"
	ReasonDeviceDisabled       = "device disabled"
	ReasonClosedByHubsim       = "closed by hubsim"
	ReasonTokenExpired         = "SAS token expired"
)
