package images

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/wire"
)

// PathPrefix is where the store is served.
const PathPrefix = "/hubsim/images"

// MaxRate bounds the rate query parameter (bytes per second).
const MaxRate = 1 << 40

// ServeAdmin serves the management requests, after the caller (hubsim's REST API) has checked
// the service SAS token: GET /hubsim/images (list), PUT /hubsim/images/{name} (upload, the body
// is the image) and DELETE /hubsim/images/{name}. seg is the whole path, split and unescaped.
func (s *Store) ServeAdmin(w http.ResponseWriter, r *http.Request, seg []string) {
	switch {
	case len(seg) == 2 && r.Method == http.MethodGet:
		list, total := s.List()
		for i := range list {
			list[i] = s.public(r.Host, list[i])
		}
		writeJSON(w, http.StatusOK, struct {
			Images        []Image `json:"images"`
			TotalBytes    int64   `json:"totalBytes"`
			MaxTotalBytes int64   `json:"maxTotalBytes"`
		}{list, total, s.cfg.MaxTotal})
	case len(seg) == 3 && r.Method == http.MethodPut:
		if r.ContentLength > s.cfg.MaxUpload {
			writeError(w, ErrTooLarge.WithText("image larger than %d bytes", s.cfg.MaxUpload))
			return
		}
		im, replaced, err := s.Put(seg[2], r.Body)
		if err != nil {
			writeError(w, err)
			return
		}
		status := http.StatusCreated
		if replaced {
			status = http.StatusOK
		}
		writeJSON(w, status, s.public(r.Host, im))
	case len(seg) == 3 && r.Method == http.MethodDelete:
		if err := s.Delete(seg[2]); err != nil {
			writeError(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case len(seg) == 2 || len(seg) == 3:
		writeError(w, wire.ServiceError{Status: 405, Code: "MethodNotAllowed", Number: 405000}.WithText("method %s is not allowed on %s", r.Method, r.URL.Path))
	default:
		writeError(w, ErrNotFound.WithText("no such resource: %s %s", r.Method, r.URL.Path))
	}
}

// public is an image as the API shows it: its download URL on host, no blob name.
func (s *Store) public(host string, im Image) Image {
	im.Blob = ""
	im.URL = (&url.URL{Scheme: "https", Host: host, Path: PathPrefix + "/" + im.Name, RawQuery: "sig=" + s.Token(im.Name)}).String()
	return im
}

// IsDownload reports whether r is a download, GET or HEAD of /hubsim/images/{name}: those
// are served by ServeDownload without a service token (the URL's sig authorises them).
func IsDownload(r *http.Request) bool {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return false
	}
	rest, ok := strings.CutPrefix(r.URL.EscapedPath(), PathPrefix+"/")
	return ok && rest != "" && !strings.Contains(strings.TrimSuffix(rest, "/"), "/")
}

// Shaping is what a download's query asks for besides the token.
type Shaping struct {
	// CutAt, when >= 0, ends a response that starts before this byte offset of the image once
	// the offset is reached (the connection closes short of its Content-Length); a request that
	// resumes at or past it is served in full. -1: not cut.
	CutAt int64
	// Rate, when > 0, paces the response to this many bytes per second.
	Rate int64
}

// ParseShaping reads cutAt and rate from a download's query (absent: not cut, not paced).
func ParseShaping(q url.Values) (Shaping, error) {
	sh := Shaping{CutAt: -1}
	if v, ok := q["cutAt"]; ok {
		n, err := strconv.ParseInt(v[0], 10, 64)
		if err != nil || n < 0 || len(v) > 1 {
			return sh, wire.ErrArgumentInvalid.WithText("cutAt must be one byte offset, 0 or more")
		}
		sh.CutAt = n
	}
	if v, ok := q["rate"]; ok {
		n, err := strconv.ParseInt(v[0], 10, 64)
		if err != nil || n < 1 || n > MaxRate || len(v) > 1 {
			return sh, wire.ErrArgumentInvalid.WithText("rate must be one number of bytes per second, 1 to %d", int64(MaxRate))
		}
		sh.Rate = n
	}
	return sh, nil
}

// ServeDownload serves GET and HEAD of /hubsim/images/{name}?sig=TOKEN[&cutAt=N][&rate=B]:
// Range and If-Range are honoured (the ETag is the image's quoted SHA-256). Each request is
// logged ("image download", with its range, status and bytes sent).
func (s *Store) ServeDownload(w http.ResponseWriter, r *http.Request) {
	rec := &recorder{ResponseWriter: w, status: http.StatusOK}
	name, _ := url.PathUnescape(strings.TrimSuffix(strings.TrimPrefix(r.URL.EscapedPath(), PathPrefix+"/"), "/"))
	var sh Shaping
	cut := false
	defer func() {
		s.log.Info("image download", zap.String("method", r.Method), zap.String("image", name),
			zap.String("range", r.Header.Get("Range")), zap.Int("status", rec.status), zap.Int64("sent", rec.sent),
			zap.Int64("cutAt", sh.CutAt), zap.Int64("rate", sh.Rate), zap.Bool("cut", cut), zap.String("remote", r.RemoteAddr))
	}()
	q := r.URL.Query()
	if validName(name) != nil || !s.tokenOK(name, q.Get("sig")) {
		// The same answer for a wrong token and an unknown name: a token-less caller learns nothing.
		writeError(rec, ErrForbidden.WithText("the URL's sig does not authorise this image (take the url from an upload or the list)"))
		return
	}
	var err error
	if sh, err = ParseShaping(q); err != nil {
		writeError(rec, err)
		return
	}
	f, im, err := s.open(name)
	if err != nil {
		writeError(rec, err)
		return
	}
	defer f.Close()
	body := &shaped{f: f, size: im.Size, sh: sh, clock: s.cfg.Clock, ctx: r.Context(), start: -1}
	rec.Header().Set("Content-Type", "application/octet-stream")
	rec.Header().Set("ETag", `"`+im.SHA256+`"`)
	http.ServeContent(rec, r, "", im.Uploaded, body)
	if body.cut {
		cut = true
		// Send what was written, then return short of Content-Length: net/http closes the
		// connection, and the client sees the body end early.
		rec.Flush()
	}
}

// errCut ends a response at its cutAt offset.
var errCut = errors.New("images: download cut at the requested offset")

// shaped is the image as ServeContent reads it: positioned by Seek, cut and paced by Read.
type shaped struct {
	f     io.ReadSeeker
	size  int64
	sh    Shaping
	clock clock.Clock
	ctx   context.Context

	pos, start, sent int64
	t0               time.Time
	cut              bool
}

func (b *shaped) Seek(off int64, whence int) (int64, error) {
	n, err := b.f.Seek(off, whence)
	if err == nil {
		b.pos = n
	}
	return n, err
}

func (b *shaped) Read(p []byte) (int, error) {
	if b.start < 0 {
		b.start, b.t0 = b.pos, b.clock.Now()
	}
	if b.sh.CutAt >= 0 && b.start < b.sh.CutAt {
		left := b.sh.CutAt - b.pos
		if left <= 0 {
			b.cut = true
			return 0, errCut
		}
		if int64(len(p)) > left {
			p = p[:left]
		}
	}
	if b.sh.Rate > 0 {
		chunk := max(b.sh.Rate/10, 1)
		if int64(len(p)) > chunk {
			p = p[:chunk]
		}
	}
	n, err := b.f.Read(p)
	b.pos += int64(n)
	b.sent += int64(n)
	if b.sh.Rate > 0 && n > 0 {
		due := b.t0.Add(time.Duration(float64(b.sent) / float64(b.sh.Rate) * float64(time.Second)))
		if d := due.Sub(b.clock.Now()); d > 0 {
			t := b.clock.NewTimer(d)
			select {
			case <-t.C():
			case <-b.ctx.Done():
				t.Stop()
				return n, b.ctx.Err()
			}
		}
	}
	return n, err
}

type recorder struct {
	http.ResponseWriter
	status int
	sent   int64
}

func (w *recorder) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *recorder) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.sent += int64(n)
	return n, err
}

func (w *recorder) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, wire.ErrServerError.WithText("encoding the response: %v", err))
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func writeError(w http.ResponseWriter, err error) {
	var se wire.ServiceError
	if !errors.As(err, &se) {
		se = wire.ErrServerError.WithText("%v", err)
	}
	b, _ := json.Marshal(se)
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("iothub-errorcode", se.Code)
	w.WriteHeader(se.Status)
	_, _ = w.Write(b)
}
