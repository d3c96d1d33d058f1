package hubapi

// MaxBulkDevices is the most devices one bulk registry call (POST /devices) may carry.
const MaxBulkDevices = 100

// BulkResult is IoT Hub's BulkRegistryOperationResult, the answer to POST /devices.
type BulkResult struct {
	IsSuccessful bool          `json:"isSuccessful"`
	Errors       []BulkError   `json:"errors"`
	Warnings     []BulkWarning `json:"warnings"`
}

// BulkError is one device's failure in a bulk registry operation.
type BulkError struct {
	DeviceID    string `json:"deviceId"`
	ModuleID    string `json:"moduleId,omitempty"`
	Operation   string `json:"operation,omitempty"`
	ErrorCode   string `json:"errorCode"`
	ErrorStatus string `json:"errorStatus"`
}

// BulkWarning is one device's warning in a bulk registry operation.
type BulkWarning struct {
	DeviceID      string `json:"deviceId"`
	WarningCode   string `json:"warningCode"`
	WarningStatus string `json:"warningStatus"`
}
