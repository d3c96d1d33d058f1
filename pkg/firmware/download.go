package firmware

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
)

// Download errors.
var (
	// ErrTooLarge means the server sent more bytes than the manifest's size.
	ErrTooLarge = errors.New("firmware: image larger than the manifest says")
	// ErrVerify means the image does not match the manifest's size and SHA-256.
	ErrVerify = errors.New("firmware: image does not match the manifest")
)

// Download fetches m.URL into path, resuming from the bytes path already holds (an HTTP Range
// request; a server that ignores it sends the whole image again and the file starts over). It
// never writes more than m.Size bytes: a server that sends more fails with ErrTooLarge. A
// connection that ends early returns an error wrapping io.ErrUnexpectedEOF, and a later call
// resumes. progress gets the bytes held so far.
func Download(ctx context.Context, hc *http.Client, m Manifest, path string, progress func(done int64)) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	have := fi.Size()
	if have > m.Size {
		have = 0
	}
	if have == m.Size {
		return nil
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.URL, nil)
	if err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	if have > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(have, 10)+"-")
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("firmware: download: %w", err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusPartialContent && have > 0 && rangeStart(resp.Header.Get("Content-Range")) == have:
	case resp.StatusCode == http.StatusOK:
		have = 0
	default:
		return &HTTPError{Status: resp.StatusCode, Text: resp.Status}
	}
	if err := f.Truncate(have); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	if _, err := f.Seek(have, io.SeekStart); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	w := &progressWriter{w: f, done: have, report: progress}
	n, err := io.Copy(w, io.LimitReader(resp.Body, m.Size-have))
	if err != nil {
		return fmt.Errorf("firmware: download: %w", err)
	}
	if have+n < m.Size {
		return fmt.Errorf("firmware: download: %w after %d of %d bytes", io.ErrUnexpectedEOF, have+n, m.Size)
	}
	// Anything past the announced size is refused, not silently dropped.
	var one [1]byte
	if k, _ := resp.Body.Read(one[:]); k > 0 {
		return ErrTooLarge
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	return nil
}

// HTTPError is an unexpected HTTP status from the image server.
type HTTPError struct {
	Status int
	Text   string
}

func (e *HTTPError) Error() string { return "firmware: download: HTTP " + e.Text }

// Retryable reports whether another attempt may succeed: 5xx, 408 and 429, not other 4xx.
func (e *HTTPError) Retryable() bool {
	return e.Status >= 500 || e.Status == http.StatusRequestTimeout || e.Status == http.StatusTooManyRequests
}

// rangeStart reads the first byte position of "bytes START-END/TOTAL"; -1 if malformed.
func rangeStart(h string) int64 {
	rest, ok := strings.CutPrefix(h, "bytes ")
	if !ok {
		return -1
	}
	start, _, ok := strings.Cut(rest, "-")
	if !ok {
		return -1
	}
	n, err := strconv.ParseInt(start, 10, 64)
	if err != nil {
		return -1
	}
	return n
}

type progressWriter struct {
	w      io.Writer
	done   int64
	report func(int64)
}

func (p *progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.done += int64(n)
	if p.report != nil {
		p.report(p.done)
	}
	return n, err
}

// VerifyFile checks that path holds exactly the image m describes.
func VerifyFile(path string, m Manifest) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(f, m.Size+1))
	if err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	if n != m.Size {
		return fmt.Errorf("%w: %d bytes, manifest says %d", ErrVerify, n, m.Size)
	}
	if got := hex.EncodeToString(h.Sum(nil)); !strings.EqualFold(got, m.SHA256) {
		return fmt.Errorf("%w: sha256 %s, manifest says %s", ErrVerify, got, strings.ToLower(m.SHA256))
	}
	return nil
}
