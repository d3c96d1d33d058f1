// Package service is a client for IoT Hub's service REST API, as Microsoft's service SDKs call
// it: the device identity registry now, twins, methods, jobs and DPS enrollments as they land. It
// works against a real hub and against hubsim, and also reaches hubsim's documented additions
// (recorded telemetry, cloud-to-device send, connections) under /hubsim/.
//
// Errors from the service are wire.ServiceError values, so callers can test them with
// errors.Is(err, wire.ErrDeviceNotFound).
package service

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/iothubby/iothubby/pkg/connstr"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// APIVersion is the service API version Microsoft's Node service SDK sends.
const APIVersion = "2021-04-12"

// maxResponse bounds how much of a response body is read.
const maxResponse = 16 << 20

// tokenTTL is the lifetime of the service tokens the client signs; they are reused until half of
// it has passed.
const tokenTTL = time.Hour

// Config configures a Client.
type Config struct {
	// ConnectionString is a service (policy) connection string:
	// HostName=...;SharedAccessKeyName=...;SharedAccessKey=...
	ConnectionString string
	// Address overrides where requests go (host:port); by default HostName on 443. hubsim's
	// endpoints.json gives it as httpsAddress.
	Address string
	// CAFile, when set, is the only CA trusted for the service's certificate (hubsim's ca.pem).
	CAFile string
	// HTTPClient replaces the default client (whose timeout is 60 s). Its transport must trust
	// the service.
	HTTPClient *http.Client
}

// Client calls the service REST API. It is safe for concurrent use.
type Client struct {
	host    string // HostName: the SAS audience
	base    string // https://address
	keyName string
	key     sas.Key
	http    *http.Client

	mu       sync.Mutex
	token    string
	tokenExp time.Time
}

// New makes a Client.
func New(cfg Config) (*Client, error) {
	cs, err := connstr.Parse(cfg.ConnectionString)
	if err != nil {
		return nil, err
	}
	if !cs.IsService() {
		return nil, errors.New("service: connection string is not a service policy string (needs SharedAccessKeyName)")
	}
	key, err := sas.ParseKey(cs.SharedAccessKey)
	if err != nil {
		return nil, fmt.Errorf("service: %w", err)
	}
	addr := cfg.Address
	if addr == "" {
		addr = cs.HostName
	}
	hc := cfg.HTTPClient
	if hc == nil {
		tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if cfg.CAFile != "" {
			pem, err := os.ReadFile(cfg.CAFile)
			if err != nil {
				return nil, fmt.Errorf("service: read CA file: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("service: no certificate in %s", cfg.CAFile)
			}
			tlsCfg.RootCAs = pool
		}
		if host, _, ok := strings.Cut(cs.HostName, ":"); ok {
			tlsCfg.ServerName = host
		} else {
			tlsCfg.ServerName = cs.HostName
		}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = tlsCfg
		tr.MaxIdleConnsPerHost = 64
		hc = &http.Client{Transport: tr, Timeout: 60 * time.Second}
	}
	return &Client{host: cs.HostName, base: "https://" + addr, keyName: cs.SharedAccessKeyName, key: key, http: hc}, nil
}

// HostName is the hub's host name as given in the connection string.
func (c *Client) HostName() string { return c.host }

// Close releases idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

func (c *Client) authorization(ctx context.Context) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if c.token != "" && now.Before(c.tokenExp.Add(-tokenTTL/2)) {
		return c.token, nil
	}
	exp := now.Add(tokenTTL)
	tok, err := sas.Build(ctx, c.key, sas.Params{Resource: c.host, KeyName: c.keyName, Expiry: exp, RawResource: true})
	if err != nil {
		return "", err
	}
	c.token, c.tokenExp = tok, exp
	return tok, nil
}

// request describes one REST call.
type request struct {
	method  string
	path    string // already escaped
	query   url.Values
	body    any
	ifMatch string
	header  map[string]string
	// timeout, when set, replaces the HTTP client's own timeout (long-running calls).
	timeout time.Duration
	// errOut, when set, also receives the JSON body of an error response (the bulk registry
	// operation answers 400 with its result document).
	errOut any
}

// do performs r and decodes a JSON response into out (unless nil). Non-2xx statuses become
// wire.ServiceError.
func (c *Client) do(ctx context.Context, r request, out any) (http.Header, error) {
	var body io.Reader
	if r.body != nil {
		b, err := json.Marshal(r.body)
		if err != nil {
			return nil, fmt.Errorf("service: encode %s %s: %w", r.method, r.path, err)
		}
		body = bytes.NewReader(b)
	}
	q := r.query
	if q == nil {
		q = url.Values{}
	}
	q.Set("api-version", APIVersion)
	req, err := http.NewRequestWithContext(ctx, r.method, c.base+r.path+"?"+q.Encode(), body)
	if err != nil {
		return nil, fmt.Errorf("service: %w", err)
	}
	auth, err := c.authorization(ctx)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", auth)
	req.Header.Set("Accept", "application/json")
	if r.body != nil {
		req.Header.Set("Content-Type", "application/json; charset=utf-8")
	}
	if r.ifMatch != "" {
		req.Header.Set("If-Match", quoteETag(r.ifMatch))
	}
	for k, v := range r.header {
		req.Header.Set(k, v)
	}
	hc := c.http
	if r.timeout > 0 {
		long := *c.http
		long.Timeout = r.timeout
		hc = &long
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("service: %s %s: %w", r.method, r.path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return nil, fmt.Errorf("service: %s %s: read body: %w", r.method, r.path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		if r.errOut != nil {
			_ = json.Unmarshal(data, r.errOut)
		}
		return resp.Header, wire.ParseServiceError(resp.StatusCode, data)
	}
	if out != nil && len(bytes.TrimSpace(data)) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return resp.Header, fmt.Errorf("service: %s %s: decode response: %w", r.method, r.path, err)
		}
	}
	return resp.Header, nil
}

// quoteETag adds the quotes Microsoft's SDK sends around an etag (and around "*").
func quoteETag(e string) string {
	if strings.HasPrefix(e, `"`) {
		return e
	}
	return `"` + e + `"`
}
