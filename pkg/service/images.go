package service

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"

	"github.com/iothubby/iothubby/pkg/hubsim/images"
	"github.com/iothubby/iothubby/pkg/wire"
)

// Image is a firmware image in hubsim's image store (an addition; a real hub answers 404).
type Image = images.Image

// UploadImage stores the size bytes r holds under name in hubsim's image store, replacing an
// image of that name, and returns it with its download URL. The upload is bounded by ctx, not
// by the client's own timeout (images can be large).
func (c *Client) UploadImage(ctx context.Context, name string, r io.Reader, size int64) (Image, error) {
	var out Image
	path := images.PathPrefix + "/" + url.PathEscape(name)
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, c.base+path, r)
	if err != nil {
		return out, fmt.Errorf("service: %w", err)
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	auth, err := c.authorization(ctx)
	if err != nil {
		return out, err
	}
	req.Header.Set("Authorization", auth)
	long := *c.http
	long.Timeout = 0
	resp, err := long.Do(req)
	if err != nil {
		return out, fmt.Errorf("service: PUT %s: %w", path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return out, fmt.Errorf("service: PUT %s: read body: %w", path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return out, wire.ParseServiceError(resp.StatusCode, data)
	}
	if err := json.Unmarshal(data, &out); err != nil {
		return out, fmt.Errorf("service: PUT %s: decode response: %w", path, err)
	}
	return out, nil
}

// ImageList is hubsim's image store listing.
type ImageList struct {
	Images        []Image `json:"images"`
	TotalBytes    int64   `json:"totalBytes"`
	MaxTotalBytes int64   `json:"maxTotalBytes"`
}

// ListImages lists hubsim's image store.
func (c *Client) ListImages(ctx context.Context) (ImageList, error) {
	var out ImageList
	_, err := c.do(ctx, request{method: http.MethodGet, path: images.PathPrefix}, &out)
	return out, err
}

// DeleteImage removes an image from hubsim's image store.
func (c *Client) DeleteImage(ctx context.Context, name string) error {
	_, err := c.do(ctx, request{method: http.MethodDelete, path: images.PathPrefix + "/" + url.PathEscape(name)}, nil)
	return err
}
