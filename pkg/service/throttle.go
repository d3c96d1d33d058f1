package service

import (
	"context"
	"net/http"
)

// HubsimThrottle reads hubsim's tier throttle counters (GET /hubsim/throttle, docs/hubsim.md
// "Scale and throttling") into out.
func (c *Client) HubsimThrottle(ctx context.Context, out any) error {
	_, err := c.do(ctx, request{method: http.MethodGet, path: "/hubsim/throttle"}, out)
	return err
}
