package service

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/iothubby/iothubby/pkg/hubapi"
)

// MaxBulkDevices is the most devices one bulk registry call may carry.
const MaxBulkDevices = hubapi.MaxBulkDevices

// Import modes of a bulk registry operation. IoT Hub's enum is lower camel case; Microsoft's
// Node SDK sends some capitalised ("Update", "DeleteIfMatchETag"), and the service compares
// them case-insensitively.
const (
	ImportCreate            = "create"
	ImportUpdate            = "update"
	ImportUpdateIfMatchETag = "updateIfMatchETag"
	ImportDelete            = "delete"
	ImportDeleteIfMatchETag = "deleteIfMatchETag"
)

// BulkDevice is one row of a bulk registry operation (ExportImportDevice).
type BulkDevice struct {
	// ID is the device ID (the field is "id", not "deviceId").
	ID         string `json:"id"`
	ImportMode string `json:"importMode"`
	// ETag is matched by the *IfMatchETag modes.
	ETag           string          `json:"eTag,omitempty"`
	Status         string          `json:"status,omitempty"`
	StatusReason   string          `json:"statusReason,omitempty"`
	Authentication *Authentication `json:"authentication,omitempty"`
	Capabilities   *Capabilities   `json:"capabilities,omitempty"`
}

// The bulk operation's answer is hubapi's, shared with hubsim.
type (
	// BulkResult is IoT Hub's BulkRegistryOperationResult.
	BulkResult = hubapi.BulkResult
	// BulkError is one device's failure in a bulk operation.
	BulkError = hubapi.BulkError
	// BulkWarning is one device's warning in a bulk operation.
	BulkWarning = hubapi.BulkWarning
)

// BulkDevices runs one bulk registry operation (POST /devices) over 1 to MaxBulkDevices rows,
// each with its own import mode. Rows that fail are listed in the result's Errors and
// IsSuccessful is false; the others took effect. A create row without authentication gets
// generated symmetric keys. The error is non-nil only when the call as a whole failed.
func (c *Client) BulkDevices(ctx context.Context, devs []BulkDevice) (*BulkResult, error) {
	if len(devs) == 0 || len(devs) > MaxBulkDevices {
		return nil, fmt.Errorf("service: a bulk operation takes 1 to %d devices, not %d", MaxBulkDevices, len(devs))
	}
	body := make([]BulkDevice, len(devs))
	for i, d := range devs {
		if d.ID == "" {
			return nil, fmt.Errorf("service: bulk row %d has no device ID", i)
		}
		if d.ImportMode == "" {
			return nil, fmt.Errorf("service: bulk row %d (%s) has no import mode", i, d.ID)
		}
		if strings.EqualFold(d.ImportMode, ImportCreate) && d.Authentication == nil {
			d.Authentication = &Authentication{Type: hubapi.AuthSAS}
		}
		body[i] = d
	}
	var out BulkResult
	_, err := c.do(ctx, request{method: http.MethodPost, path: "/devices", body: body, errOut: &out}, &out)
	if err != nil {
		// IoT Hub answers a batch with failed rows 400 and the result document.
		if len(out.Errors) > 0 {
			return &out, nil
		}
		return nil, err
	}
	if !out.IsSuccessful && len(out.Errors) == 0 {
		return &out, errors.New("service: bulk operation reported failure without errors")
	}
	return &out, nil
}
