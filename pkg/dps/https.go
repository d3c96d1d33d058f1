package dps

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"

	"github.com/iothubby/iothubby/pkg/wire"
)

// httpsTransport is the DPS REST device API.
type httpsTransport struct {
	cfg    *Config
	client *http.Client
	tr     *http.Transport
	base   string
}

func newHTTPS(cfg *Config) (*httpsTransport, error) {
	_, addr := cfg.endpointHostPort()
	tr := &http.Transport{TLSClientConfig: cfg.tlsConfig(), ForceAttemptHTTP2: false, MaxIdleConns: 1}
	return &httpsTransport{
		cfg: cfg, tr: tr, client: &http.Client{Transport: tr, Timeout: cfg.RequestTimeout},
		base: "https://" + addr + "/" + url.PathEscape(cfg.IDScope) + "/registrations/" + url.PathEscape(cfg.RegistrationID),
	}, nil
}

func (t *httpsTransport) do(ctx context.Context, method, u string, body []byte) (exchange, error) {
	ctx, cancel := context.WithTimeout(ctx, t.cfg.RequestTimeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u+"?api-version="+wire.DPSAPIVersion, rd)
	if err != nil {
		return exchange{}, err
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", t.cfg.ClientVersion)
	if body != nil {
		req.Header.Set("Content-Type", "application/json; charset=utf-8")
	}
	tok, err := t.cfg.token(ctx)
	if err != nil {
		return exchange{}, err
	}
	if tok != "" {
		req.Header.Set("Authorization", tok)
	}
	resp, err := t.client.Do(req)
	if err != nil {
		return exchange{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, wire.MaxDPSReplySize+1))
	if err != nil {
		return exchange{}, fmt.Errorf("reading the reply: %w", err)
	}
	ex := exchange{status: resp.StatusCode, body: b}
	if ra := resp.Header.Get("Retry-After"); ra != "" {
		if n, err := strconv.Atoi(ra); err == nil && n >= 0 {
			ex.retryAfter, ex.hasRA = n, true
		}
	}
	return ex, nil
}

func (t *httpsTransport) register(ctx context.Context, body []byte) (exchange, error) {
	return t.do(ctx, http.MethodPut, t.base+"/register", body)
}

func (t *httpsTransport) poll(ctx context.Context, op string) (exchange, error) {
	return t.do(ctx, http.MethodGet, t.base+"/operations/"+url.PathEscape(op), nil)
}

func (t *httpsTransport) close() { t.tr.CloseIdleConnections() }
