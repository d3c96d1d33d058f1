package hub

// The log messages a Session writes when its status changes, which tests and operators' log
// filters wait for (field "status" carries the Status.State, "reason" the Status.Reason). The text
// is quoted in README.md and docs: change it only together with them.
const (
	// MsgConnected: the session is connected (State Connected).
	MsgConnected = "connected"
	// MsgDisconnectedRetrying: the connection was lost and the supervisor will reconnect.
	MsgDisconnectedRetrying = "disconnected, retrying"
	// MsgDisconnected: the session gave up (State Disconnected); it does not reconnect.
	MsgDisconnected = "disconnected"
	// MsgClosed: the session was closed by its owner (State Disabled).
	MsgClosed = "closed"
	// MsgIdentityInUse: the hub keeps closing this device's connections right after accepting
	// them, the pattern of two clients sharing one device identity (a warning, rate-limited).
	MsgIdentityInUse = "another client is connected with this device identity (IoT Hub allows one connection per device; the newer one wins)"
)
