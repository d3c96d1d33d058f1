package service

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
)

// MaxQueryPageSize is the most rows IoT Hub returns in one query page; larger page sizes are
// clamped by the service.
const MaxQueryPageSize = 100

// Query paging headers, as IoT Hub and Microsoft's SDKs name them.
const (
	HeaderContinuation = "x-ms-continuation"
	HeaderMaxItemCount = "x-ms-max-item-count"
	HeaderItemType     = "x-ms-item-type"
)

// QuerySpec is the body of POST /devices/query.
type QuerySpec struct {
	Query string `json:"query"`
}

// QueryOptions page a query.
type QueryOptions struct {
	// PageSize is the most rows wanted in the page (x-ms-max-item-count); 0 means the service's
	// default.
	PageSize int
	// Continuation is the token of the previous page ("" for the first page).
	Continuation string
}

// QueryPage is one page of query results.
type QueryPage struct {
	// Items are the rows as the service sent them: twins for SELECT *, objects of the projected
	// fields otherwise, device job rows for devices.jobs.
	Items []json.RawMessage
	// Continuation is the token for the next page; "" on the last page.
	Continuation string
	// Type is the x-ms-item-type header (e.g. "Twin", "DeviceJob", "Raw"), when sent.
	Type string
}

// Query runs one page of an IoT Hub query (POST /devices/query), e.g.
// SELECT * FROM devices WHERE tags.site = 'a'.
func (c *Client) Query(ctx context.Context, sql string, opt QueryOptions) (QueryPage, error) {
	if sql == "" {
		return QueryPage{}, errors.New("service: a query is required")
	}
	h := map[string]string{}
	if opt.PageSize > 0 {
		h[HeaderMaxItemCount] = strconv.Itoa(opt.PageSize)
	}
	if opt.Continuation != "" {
		h[HeaderContinuation] = opt.Continuation
	}
	var items []json.RawMessage
	hdr, err := c.do(ctx, request{method: http.MethodPost, path: "/devices/query", body: QuerySpec{Query: sql}, header: h}, &items)
	if err != nil {
		return QueryPage{}, err
	}
	return QueryPage{Items: items, Continuation: hdr.Get(HeaderContinuation), Type: hdr.Get(HeaderItemType)}, nil
}

// QueryAll runs a query to its last page, calling fn for every row in order; an error from fn
// stops it and is returned.
func (c *Client) QueryAll(ctx context.Context, sql string, pageSize int, fn func(json.RawMessage) error) error {
	opt := QueryOptions{PageSize: pageSize}
	for {
		p, err := c.Query(ctx, sql, opt)
		if err != nil {
			return err
		}
		for _, it := range p.Items {
			if err := fn(it); err != nil {
				return err
			}
		}
		if p.Continuation == "" {
			return nil
		}
		if p.Continuation == opt.Continuation {
			return errors.New("service: query continuation token did not advance")
		}
		opt.Continuation = p.Continuation
	}
}

// QueryTwins runs SELECT * query to its last page and decodes every row as a twin.
func (c *Client) QueryTwins(ctx context.Context, sql string, pageSize int) ([]Twin, error) {
	var out []Twin
	err := c.QueryAll(ctx, sql, pageSize, func(m json.RawMessage) error {
		var t Twin
		if err := json.Unmarshal(m, &t); err != nil {
			return err
		}
		out = append(out, t)
		return nil
	})
	return out, err
}
