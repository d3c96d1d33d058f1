package hub

import (
	"errors"
	"fmt"
	"time"
)

// ConnState is the connection status, named as Microsoft's device SDKs name it.
type ConnState uint8

// Connection states.
const (
	// Connected: the session is connected and subscribed.
	Connected ConnState = iota + 1
	// DisconnectedRetrying: the connection is down and the session is reconnecting by itself
	// (including the planned reconnect that renews a SAS token).
	DisconnectedRetrying
	// Disconnected: the session has stopped for a reason it cannot recover from (bad
	// credentials, TLS verification, retry expired). The application owns recovery.
	Disconnected
	// Disabled: the session was closed by the application.
	Disabled
)

var stateNames = [...]string{"", "Connected", "Disconnected_Retrying", "Disconnected", "Disabled"}

func (s ConnState) String() string {
	if int(s) < len(stateNames) && s != 0 {
		return stateNames[s]
	}
	return fmt.Sprintf("ConnState(%d)", s)
}

// Reason says why the status changed, as in Microsoft's SDKs.
type Reason uint8

// Reasons for a status change.
const (
	ConnectionOK Reason = iota + 1
	ExpiredSASToken
	DeviceDisabled
	BadCredential
	RetryExpired
	NoNetwork
	CommunicationError
	ClientClose
	// IdentityInUse is ours, not the SDKs': connections closed by the hub right after they were
	// accepted, again and again, as when another client uses the same device identity (IoT Hub
	// allows one connection per device and closes the older one). The SDKs say
	// Communication_Error here.
	IdentityInUse
)

var reasonNames = [...]string{"", "Connection_Ok", "Expired_SAS_Token", "Device_Disabled",
	"Bad_Credential", "Retry_Expired", "No_Network", "Communication_Error", "Client_Close", "Identity_In_Use"}

func (r Reason) String() string {
	if int(r) < len(reasonNames) && r != 0 {
		return reasonNames[r]
	}
	return fmt.Sprintf("Reason(%d)", r)
}

// Status is a connection status change.
type Status struct {
	State  ConnState
	Reason Reason
	// Err is the error behind a disconnect, if any (nil for planned renewals and Close).
	Err error
	// Attempt counts consecutive failed connection attempts (DisconnectedRetrying).
	Attempt int
	// RetryIn is how long the session waits before its next attempt (DisconnectedRetrying).
	RetryIn time.Duration
	// At is when the change happened.
	At time.Time
}

// Errors. Match them with errors.Is.
var (
	// ErrConfig wraps every configuration error returned by New.
	ErrConfig = errors.New("hub: invalid configuration")
	// ErrNotAuthorized means the hub refused the credentials (CONNACK 4 or 5). The session
	// stops; retrying with the same credentials cannot succeed.
	ErrNotAuthorized = errors.New("hub: not authorized")
	// ErrConnectionRefused means the hub refused the connection for a reason other than
	// credentials or availability (CONNACK 1 or 2). The session stops.
	ErrConnectionRefused = errors.New("hub: connection refused")
	// ErrTLSVerify means the server certificate was not trusted for the configured name. The
	// session stops: check CAFile and Host.
	ErrTLSVerify = errors.New("hub: TLS server certificate verification failed")
	// ErrRetryExpired means reconnecting failed for longer than Config.RetryTimeout.
	ErrRetryExpired = errors.New("hub: retry timeout expired")
	// ErrClosed means the session was closed (or is closing) before the operation completed.
	ErrClosed = errors.New("hub: session closed")
	// ErrQueueFull means the telemetry queue is at Config.QueueCapacity.
	ErrQueueFull = errors.New("hub: telemetry queue full")
	// ErrMessageTooLarge means a message exceeds IoT Hub's size limit; it was not sent.
	ErrMessageTooLarge = errors.New("hub: message too large")
	// ErrInvalidMessage means a message cannot be encoded (e.g. an application property named
	// like a system property).
	ErrInvalidMessage = errors.New("hub: invalid message")
	// ErrMessageExpired means a message's deadline passed before the hub acknowledged it.
	ErrMessageExpired = errors.New("hub: message expired before delivery")
	// ErrCanceled means the caller gave up on a message before it was published.
	ErrCanceled = errors.New("hub: message canceled")
	// ErrConnectionLost means the connection a request was sent on dropped before the answer
	// came; the request may or may not have reached the hub.
	ErrConnectionLost = errors.New("hub: connection lost before response")
	// ErrStaleRequest means a method $rid is not pending on the current connection (it came on
	// an earlier connection, or was already answered).
	ErrStaleRequest = errors.New("hub: method request is not pending on the current connection")
	// ErrNotConnected means the session has no live connection at the moment (a method answer
	// cannot wait for one: its request died with the connection that delivered it).
	ErrNotConnected = errors.New("hub: not connected")
	// ErrTooManyRequests means too many twin requests are already waiting for answers.
	ErrTooManyRequests = errors.New("hub: too many pending requests")
)

// ConnackError is a refused CONNACK. It matches ErrNotAuthorized (codes 4 and 5) or
// ErrConnectionRefused (1 and 2) with errors.Is; code 3 (server unavailable) is retried.
type ConnackError struct{ Code byte }

func (e *ConnackError) Error() string {
	text := map[byte]string{1: "unacceptable protocol version", 2: "identifier rejected",
		3: "server unavailable", 4: "bad user name or password", 5: "not authorized"}[e.Code]
	if text == "" {
		text = "unknown return code"
	}
	return fmt.Sprintf("hub: connection refused by CONNACK %d (%s)", e.Code, text)
}

// Is matches the sentinel that says whether to retry.
func (e *ConnackError) Is(target error) bool {
	switch e.Code {
	case 4, 5:
		return target == ErrNotAuthorized
	case 1, 2:
		return target == ErrConnectionRefused
	}
	return false
}

// StatusError is a non-2xx twin response.
type StatusError struct {
	Status int
	// Code and Message come from the body's {"errorCode":...,"message":...} when present.
	Code    int
	Message string
}

func (e *StatusError) Error() string {
	if e.Message != "" {
		return fmt.Sprintf("hub: twin request failed with status %d (%d: %s)", e.Status, e.Code, e.Message)
	}
	return fmt.Sprintf("hub: twin request failed with status %d", e.Status)
}
