package images

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/wire"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func image(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}

func blobs(t *testing.T, dir string) int {
	t.Helper()
	e, err := os.ReadDir(filepath.Join(dir, blobDir))
	if err != nil {
		t.Fatal(err)
	}
	return len(e)
}

func TestStorePersistsAndBounds(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(Config{Dir: dir, MaxTotal: 1000, MaxUpload: 600})
	if err != nil {
		t.Fatal(err)
	}
	a := image(500)
	im, replaced, err := s.Put("fw-1.bin", bytes.NewReader(a))
	sum := sha256.Sum256(a)
	if err != nil || replaced || im.Size != 500 || im.SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("put: %+v %v %v", im, replaced, err)
	}
	// over one upload's bound: refused, nothing kept
	if _, _, err := s.Put("big.bin", bytes.NewReader(image(601))); !errors.Is(err, wire.ErrMessageTooLarge) {
		t.Fatalf("oversize upload: %v", err)
	}
	// over the total: refused with the reason, nothing kept
	if _, _, err := s.Put("fw-2.bin", bytes.NewReader(image(501))); !errors.Is(err, ErrStoreFull) || !strings.Contains(err.Error(), "500 of 1000") {
		t.Fatalf("store full: %v", err)
	}
	// replacing counts the replaced image out
	if _, replaced, err := s.Put("fw-1.bin", bytes.NewReader(image(600))); err != nil || !replaced {
		t.Fatalf("replace: %v %v", replaced, err)
	}
	for _, bad := range []string{"", ".hidden", "a/b", "a b", strings.Repeat("x", 129), "é"} {
		if _, _, err := s.Put(bad, bytes.NewReader(a)); !errors.Is(err, wire.ErrArgumentInvalid) {
			t.Fatalf("name %q: %v", bad, err)
		}
	}
	if _, _, err := s.Put("empty", bytes.NewReader(nil)); !errors.Is(err, wire.ErrArgumentInvalid) {
		t.Fatalf("empty image: %v", err)
	}
	if n := blobs(t, dir); n != 1 {
		t.Fatalf("%d blob files after refusals and a replace, want 1", n)
	}
	// reopened: the same images and total; a stray blob (a crash mid-upload) is removed
	if err := os.WriteFile(filepath.Join(dir, blobDir, "blob-stray"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	tok := s.Token("fw-1.bin")
	s, err = Open(Config{Dir: dir, MaxTotal: 1000, MaxUpload: 600})
	if err != nil {
		t.Fatal(err)
	}
	list, total := s.List()
	if len(list) != 1 || list[0].Name != "fw-1.bin" || list[0].Size != 600 || total != 600 || blobs(t, dir) != 1 {
		t.Fatalf("after reopen: %+v total %d, %d blobs", list, total, blobs(t, dir))
	}
	if s.Token("fw-1.bin") != tok {
		t.Fatal("the URL token changed across a restart")
	}
	if err := s.Delete("fw-1.bin"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("fw-1.bin"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}
	if _, total := s.List(); total != 0 || blobs(t, dir) != 0 {
		t.Fatalf("after delete: total %d, %d blobs", total, blobs(t, dir))
	}
}

func TestCorruptIndexIsAnError(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(Config{Dir: dir}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, indexFile), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(Config{Dir: dir}); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("corrupt index: %v", err)
	}
}

// testServer serves the store as hubsim routes it (downloads unauthenticated, the rest as if
// the service token had been checked).
func testServer(t *testing.T, s *Store) *httptest.Server {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if IsDownload(r) {
			s.ServeDownload(w, r)
			return
		}
		seg := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
		s.ServeAdmin(w, r, seg)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func get(t *testing.T, c *http.Client, u, rng string) (*http.Response, []byte, error) {
	t.Helper()
	req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, u, nil)
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, b, err
}

func TestDownloadRangeCutAndToken(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	s, err := Open(Config{Dir: t.TempDir(), Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	srv := testServer(t, s)
	c := srv.Client()
	data := image(100_000)
	req, _ := http.NewRequest(http.MethodPut, srv.URL+"/hubsim/images/fw.bin", bytes.NewReader(data))
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("upload: %d", resp.StatusCode)
	}
	im, _ := s.Get("fw.bin")
	u := s.public(strings.TrimPrefix(srv.URL, "https://"), im).URL

	// whole, and a range
	if resp, b, err := get(t, c, u, ""); err != nil || resp.StatusCode != 200 || !bytes.Equal(b, data) || resp.Header.Get("ETag") != `"`+im.SHA256+`"` {
		t.Fatalf("whole: %d %d bytes %v", resp.StatusCode, len(b), err)
	}
	if resp, b, err := get(t, c, u, "bytes=99990-"); err != nil || resp.StatusCode != 206 || !bytes.Equal(b, data[99990:]) ||
		resp.Header.Get("Content-Range") != "bytes 99990-99999/100000" {
		t.Fatalf("range: %d %q %v", resp.StatusCode, b, err)
	}

	// cut at half: the body ends early; resuming at the offset, with the same URL, completes
	cutURL := u + "&cutAt=50000"
	resp, b, err := get(t, c, cutURL, "")
	if !errors.Is(err, io.ErrUnexpectedEOF) || resp.StatusCode != 200 || len(b) != 50000 || !bytes.Equal(b, data[:50000]) {
		t.Fatalf("cut: %d, %d bytes, %v", resp.StatusCode, len(b), err)
	}
	resp, rest, err := get(t, c, cutURL, "bytes=50000-")
	if err != nil || resp.StatusCode != 206 || !bytes.Equal(append(b, rest...), data) {
		t.Fatalf("resume: %d, %d bytes, %v", resp.StatusCode, len(rest), err)
	}
	// every download is logged with its range; the cut one says so
	var sawCut, sawResume bool
	for _, e := range logs.FilterMessage("image download").All() {
		f := e.ContextMap()
		sawCut = sawCut || f["cut"] == true && f["sent"] == int64(50000)
		sawResume = sawResume || f["range"] == "bytes=50000-" && f["status"] == int64(206)
	}
	if !sawCut || !sawResume {
		t.Fatalf("download log lines: %v", logs.FilterMessage("image download").All())
	}

	// a missing token, another name's token, a bad name: 403; a deleted image's valid token: 404
	other := s.Token("other.bin")
	if resp, b, _ := get(t, c, srv.URL+"/hubsim/images/other.bin?sig="+other, ""); resp.StatusCode != 404 || !strings.Contains(string(b), "ImageNotFound") {
		t.Fatalf("no such image: %d %s", resp.StatusCode, b)
	}
	for _, bad := range []string{
		srv.URL + "/hubsim/images/fw.bin",
		srv.URL + "/hubsim/images/fw.bin?sig=" + other,
		srv.URL + "/hubsim/images/..%2Fx?sig=" + other,
	} {
		if resp, b, _ := get(t, c, bad, ""); resp.StatusCode != 403 || !strings.Contains(string(b), "ImageTokenInvalid") {
			t.Fatalf("%s: %d %s", bad, resp.StatusCode, b)
		}
	}
	// bad knobs are refused, not ignored
	for _, q := range []string{"&cutAt=-1", "&cutAt=x", "&rate=0", "&rate=1&rate=2"} {
		if resp, b, _ := get(t, c, u+q, ""); resp.StatusCode != 400 || !strings.Contains(string(b), "ArgumentInvalid") {
			t.Fatalf("%s: %d %s", q, resp.StatusCode, b)
		}
	}
	// the list shows the URL
	resp, b, _ = get(t, c, srv.URL+"/hubsim/images", "")
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"url":"`+strings.ReplaceAll(u, "&", `\u0026`)) || strings.Contains(string(b), "blob") {
		t.Fatalf("list: %s", b)
	}
	// an upload over the bound is refused from its Content-Length
	s.cfg.MaxUpload = 10
	req, _ = http.NewRequest(http.MethodPut, srv.URL+"/hubsim/images/big.bin", bytes.NewReader(data))
	if resp, err := c.Do(req); err != nil || resp.StatusCode != 413 {
		t.Fatalf("oversize upload: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
}

// The rate knob paces a download: 10 000 bytes at 1 000 B/s take 10 s of (bubble) time.
func TestRatePacesTheBody(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		data := image(10_000)
		b := &shaped{f: bytes.NewReader(data), size: int64(len(data)), sh: Shaping{CutAt: -1, Rate: 1000}, clock: clock.Real(), ctx: context.Background(), start: -1}
		start := time.Now()
		got, err := io.ReadAll(b)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read: %d bytes, %v", len(got), err)
		}
		if d := time.Since(start); d != 10*time.Second {
			t.Fatalf("took %v, want 10s", d)
		}
		// a cancelled request stops waiting
		ctx, cancel := context.WithCancel(context.Background())
		b = &shaped{f: bytes.NewReader(data), size: int64(len(data)), sh: Shaping{CutAt: -1, Rate: 1}, clock: clock.Real(), ctx: ctx, start: -1}
		go func() { time.Sleep(time.Second); cancel() }()
		if _, err := io.ReadAll(b); !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled: %v", err)
		}
	})
}

func FuzzParseShaping(f *testing.F) {
	for _, s := range []string{"", "cutAt=10", "rate=5&cutAt=0", "cutAt=-1", "rate=99999999999999999999", "cutAt=1&cutAt=2", "%zz"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		q, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		sh, err := ParseShaping(q)
		if err != nil {
			if !errors.Is(err, wire.ErrArgumentInvalid) {
				t.Fatalf("error %v is not ArgumentInvalid", err)
			}
			return
		}
		if sh.CutAt < -1 || sh.Rate < 0 || sh.Rate > MaxRate {
			t.Fatalf("out of range: %+v", sh)
		}
		if _, ok := q["cutAt"]; !ok && sh.CutAt != -1 {
			t.Fatalf("cutAt absent but %d", sh.CutAt)
		}
		_ = fmt.Sprint(sh)
	})
}

func FuzzValidName(f *testing.F) {
	for _, s := range []string{"fw.bin", "", ".x", "a/b", "..", "a%2Fb"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if validName(name) != nil {
			return
		}
		if filepath.Base(name) != name || name == ".." || strings.ContainsAny(name, "/\\\x00") || len(name) > maxNameLen {
			t.Fatalf("unsafe name accepted: %q", name)
		}
	})
}
