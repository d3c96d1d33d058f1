package service

import (
	"context"
	"net/http"
)

// HubsimFaults calls hubsim's fault injection API (/hubsim/faults): GET (body nil) returns its
// status, POST a fault request, DELETE clears every rule. out receives the JSON answer.
func (c *Client) HubsimFaults(ctx context.Context, method string, body, out any) error {
	_, err := c.do(ctx, request{method: method, path: "/hubsim/faults", body: body}, out)
	return err
}

// Methods for HubsimFaults.
const (
	FaultsGet    = http.MethodGet
	FaultsPost   = http.MethodPost
	FaultsDelete = http.MethodDelete
)
