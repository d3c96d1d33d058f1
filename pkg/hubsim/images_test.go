package hubsim_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

// The image store as hubsim wires it: management needs a service token, a download needs only
// the URL (its token), over the same HTTPS listener and certificate; images survive a restart.
func TestImageStoreWiring(t *testing.T) {
	dir := t.TempDir()
	cfg := hubsim.Config{StateDir: dir, MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0", ImagesMaxTotal: 1 << 20}
	srv, err := hubsim.Start(context.Background(), cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Close() }()
	c, _, err := service.ForHubsim(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	data := bytes.Repeat([]byte("firmware"), 1000)
	im, err := c.UploadImage(ctx, "fw-2.bin", bytes.NewReader(data), int64(len(data)))
	if err != nil || im.Size != int64(len(data)) || !strings.HasPrefix(im.URL, "https://"+srv.Endpoints().HTTPSAddress+"/hubsim/images/fw-2.bin?sig=") {
		t.Fatalf("upload: %+v %v", im, err)
	}
	if _, err := c.UploadImage(ctx, "huge.bin", bytes.NewReader(make([]byte, 2<<20)), 2<<20); !errors.Is(err, wire.ServiceError{Code: "ImageStoreFull"}) {
		t.Fatalf("over --image-max-total: %v", err)
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: srv.ClientTLSConfig()}}
	defer hc.CloseIdleConnections()
	// without a service token: listing and uploading are refused, the download is served
	for _, r := range []*http.Request{
		must(http.NewRequest(http.MethodGet, "https://"+srv.Endpoints().HTTPSAddress+"/hubsim/images", nil)),
		must(http.NewRequest(http.MethodPut, "https://"+srv.Endpoints().HTTPSAddress+"/hubsim/images/x.bin", strings.NewReader("x"))),
		must(http.NewRequest(http.MethodDelete, "https://"+srv.Endpoints().HTTPSAddress+"/hubsim/images/fw-2.bin", nil)),
	} {
		resp, err := hc.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("%s %s without a token: %d", r.Method, r.URL.Path, resp.StatusCode)
		}
	}
	download := func(u string) []byte {
		t.Helper()
		resp, err := hc.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("download: %d %s", resp.StatusCode, b)
		}
		return b
	}
	if b := download(im.URL); !bytes.Equal(b, data) {
		t.Fatalf("downloaded %d bytes", len(b))
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	srv, err = hubsim.Start(context.Background(), cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	c2, _, err := service.ForHubsim(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if list, err := c2.ListImages(ctx); err != nil || len(list.Images) != 1 || list.TotalBytes != int64(len(data)) || list.MaxTotalBytes != 1<<20 {
		t.Fatalf("list after restart: %+v %v", list, err)
	}
	list, _ := c2.ListImages(ctx)
	if b := download(list.Images[0].URL); !bytes.Equal(b, data) {
		t.Fatalf("after restart: downloaded %d bytes", len(b))
	}
	if err := c2.DeleteImage(ctx, "fw-2.bin"); err != nil {
		t.Fatal(err)
	}
	if err := c2.DeleteImage(ctx, "fw-2.bin"); !errors.Is(err, wire.ServiceError{Code: "ImageNotFound"}) {
		t.Fatalf("second delete: %v", err)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
