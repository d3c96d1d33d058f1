package service

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
)

// DPS service API (use a Client made from a provisioningserviceowner connection string). The
// enrollment documents are Azure's JSON (IndividualEnrollment, EnrollmentGroup), typed once as
// hubapi.Enrollment, which hubsim serves. Bodies go out as given (a hubapi.Enrollment, or a
// decoded document that a read-change-write keeps whole) and answers come back as raw JSON, so
// that every field Azure defines survives a round trip, including ones hubapi does not name.

// PutEnrollment creates or updates an individual enrollment (PUT /enrollments/{id}); etag, when
// set, is sent as If-Match.
func (c *Client) PutEnrollment(ctx context.Context, registrationID string, enrollment any, etag string) (json.RawMessage, error) {
	var out json.RawMessage
	_, err := c.do(ctx, request{method: http.MethodPut, path: "/enrollments/" + url.PathEscape(registrationID), body: enrollment, ifMatch: etag}, &out)
	return out, err
}

// PutEnrollmentGroup creates or updates an enrollment group (PUT /enrollmentGroups/{id}).
func (c *Client) PutEnrollmentGroup(ctx context.Context, groupID string, group any, etag string) (json.RawMessage, error) {
	var out json.RawMessage
	_, err := c.do(ctx, request{method: http.MethodPut, path: "/enrollmentGroups/" + url.PathEscape(groupID), body: group, ifMatch: etag}, &out)
	return out, err
}

// GetEnrollment reads an individual enrollment (group false) or an enrollment group.
func (c *Client) GetEnrollment(ctx context.Context, id string, group bool) (json.RawMessage, error) {
	var out json.RawMessage
	_, err := c.do(ctx, request{method: http.MethodGet, path: enrollmentPath(id, group)}, &out)
	return out, err
}

// DeleteEnrollment deletes an individual enrollment or an enrollment group.
func (c *Client) DeleteEnrollment(ctx context.Context, id string, group bool) error {
	_, err := c.do(ctx, request{method: http.MethodDelete, path: enrollmentPath(id, group)}, nil)
	return err
}

// QueryEnrollments lists every individual enrollment or enrollment group (query "*"), following
// continuation tokens.
func (c *Client) QueryEnrollments(ctx context.Context, group bool) ([]json.RawMessage, error) {
	path := "/enrollments/query"
	if group {
		path = "/enrollmentGroups/query"
	}
	var all []json.RawMessage
	cont := ""
	for {
		hdr := map[string]string{"x-ms-max-item-count": "100"}
		if cont != "" {
			hdr["x-ms-continuation"] = cont
		}
		var page []json.RawMessage
		h, err := c.do(ctx, request{method: http.MethodPost, path: path, body: map[string]string{"query": "*"}, header: hdr}, &page)
		if err != nil {
			return nil, err
		}
		all = append(all, page...)
		if cont = h.Get("x-ms-continuation"); cont == "" {
			return all, nil
		}
	}
}

// RegistrationState reads a device registration state (GET /registrations/{id}).
func (c *Client) RegistrationState(ctx context.Context, registrationID string) (json.RawMessage, error) {
	var out json.RawMessage
	_, err := c.do(ctx, request{method: http.MethodGet, path: "/registrations/" + url.PathEscape(registrationID)}, &out)
	return out, err
}

// DPSStats reads hubsim's DPS counters (GET /hubsim/dps/stats, a hubsim addition).
func (c *Client) DPSStats(ctx context.Context) (map[string]int64, error) {
	var out map[string]int64
	_, err := c.do(ctx, request{method: http.MethodGet, path: "/hubsim/dps/stats"}, &out)
	return out, err
}

func enrollmentPath(id string, group bool) string {
	if group {
		return "/enrollmentGroups/" + url.PathEscape(id)
	}
	return "/enrollments/" + url.PathEscape(id)
}
