package hubsim_test

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/hubsim/rest"
)

// A request whose Content-Length is over the body limit is answered at once, without waiting
// for a body the client may never send (before, it was held until the 60 s read timeout).
func TestOversizeContentLengthRefusedAtOnce(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		name, method, path string
		status             int
		text               string
	}{
		{"hub", "PUT", "/devices/d1?api-version=2021-04-12", 400, "larger than"},
		{"dps", "PUT", "/" + e.srv.DPS().IDScope() + "/registrations/r1/register?api-version=2021-06-01", 413, "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := tls.Dial("tcp", e.srv.Endpoints().HTTPSAddress, e.srv.ClientTLSConfig())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			// The deadline only bounds the test; the answer must come without any body sent.
			_ = conn.SetDeadline(time.Now().Add(waitTimeout))
			_, err = fmt.Fprintf(conn, "%s %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
				tc.method, tc.path, e.host, e.serviceToken("iothubowner", time.Now().Add(time.Hour)), 10*rest.MaxBodySize)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatalf("no answer before any body was sent: %v", err)
			}
			defer resp.Body.Close()
			var b strings.Builder
			_, _ = bufio.NewReader(resp.Body).WriteTo(&b)
			if resp.StatusCode != tc.status || !strings.Contains(b.String(), tc.text) {
				t.Fatalf("got %d %s, want %d mentioning %q", resp.StatusCode, b.String(), tc.status, tc.text)
			}
		})
	}
}
