package service

import (
	"context"
)

// HubsimThrottle calls hubsim's tier throttle API (/hubsim/throttle, docs/hubsim.md "Scale and
// throttling"): GET (body nil) reads the counters, POST {"tier","units"} throttles as that tier
// from now on, DELETE stops throttling. out receives the status.
func (c *Client) HubsimThrottle(ctx context.Context, method string, body, out any) error {
	_, err := c.do(ctx, request{method: method, path: "/hubsim/throttle", body: body}, out)
	return err
}
