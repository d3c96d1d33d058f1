package service

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"

	"github.com/iothubby/iothubby/pkg/hubapi"
)

// The twin's service view is hubapi's, shared with hubsim.
type (
	// Twin is a device twin as the service sees it. Properties keep $version and $metadata.
	Twin = hubapi.Twin
	// TwinProperties are the desired and reported sections.
	TwinProperties = hubapi.TwinProperties
)

// TwinPatch is a service-side twin change: tags and desired properties (null deletes).
type TwinPatch struct {
	Tags       map[string]any `json:"tags,omitempty"`
	Properties struct {
		Desired map[string]any `json:"desired,omitempty"`
	} `json:"properties"`
}

func twinPath(id string) string { return "/twins/" + url.PathEscape(id) }

// GetTwin reads a device's twin.
func (c *Client) GetTwin(ctx context.Context, id string) (Twin, error) {
	var out Twin
	_, err := c.do(ctx, request{method: http.MethodGet, path: twinPath(id)}, &out)
	return out, err
}

// UpdateTwin merges patch (any JSON object with "tags" and/or "properties.desired") into the
// twin when etag matches ("" or "*": unconditional) and returns the updated twin.
func (c *Client) UpdateTwin(ctx context.Context, id string, patch any, etag string) (Twin, error) {
	return c.changeTwin(ctx, http.MethodPatch, id, patch, etag)
}

// ReplaceTwin replaces the twin's tags and desired properties wholesale.
func (c *Client) ReplaceTwin(ctx context.Context, id string, twin any, etag string) (Twin, error) {
	return c.changeTwin(ctx, http.MethodPut, id, twin, etag)
}

func (c *Client) changeTwin(ctx context.Context, method, id string, body any, etag string) (Twin, error) {
	if etag == "" {
		etag = "*"
	}
	if raw, ok := body.([]byte); ok {
		body = json.RawMessage(raw)
	}
	var out Twin
	_, err := c.do(ctx, request{method: method, path: twinPath(id), body: body, ifMatch: strings.TrimSpace(etag)}, &out)
	return out, err
}
