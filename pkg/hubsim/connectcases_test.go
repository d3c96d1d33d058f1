package hubsim_test

import (
	"bytes"
	"crypto/tls"
	"strings"
	"testing"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/mqttpkt"
)

// The codec's CONNECT table, byte for byte, as the first packet of a TLS connection to hubsim's
// device endpoint. A refused case is closed (after CONNACK 1 for a protocol level) and the
// rejected event gives the table's reason; a well-formed CONNECT passes the screen and is judged
// on its credentials (none of the table's are valid: CONNACK 5, a refused event, no rejected one).
func TestConnectCasesOnTheDeviceEndpoint(t *testing.T) {
	e := newEnv(t)
	connack1 := mqttpkt.Cases.Get("CONNACK unacceptable protocol version").Raw
	connack5 := mqttpkt.Cases.Get("CONNACK not authorized").Raw
	for _, c := range mqttpkt.ConnectCases {
		t.Run(c.Name, func(t *testing.T) {
			mark := e.ev.mark()
			rc := e.dial()
			rc.send(c.Raw)
			_ = rc.c.(*tls.Conn).CloseWrite()
			p, err := rc.read()
			got := append([]byte{p.typ<<4 | p.flags, byte(len(p.body))}, p.body...)
			switch {
			case c.Err == "":
				if err != nil || !bytes.Equal(got, connack5) {
					t.Fatalf("want CONNACK 5 (the screen passed, the credentials did not), got %x, %v", got, err)
				}
				rc.expectClosed()
				ev := e.ev.waitFrom(t, mark, "refused or rejected", func(ev broker.Event) bool {
					return ev.Kind == broker.EventRefused || ev.Kind == broker.EventRejected
				})
				if ev.Kind != broker.EventRefused {
					t.Fatalf("the screen rejected a good CONNECT: %s", ev.Reason)
				}
				return
			case c.Version:
				if err != nil || !bytes.Equal(got, connack1) {
					t.Fatalf("want CONNACK 1, got %x, %v", got, err)
				}
			default:
				if err == nil {
					t.Fatalf("want a close, got %x", got)
				}
			}
			rc.expectClosed()
			ev := e.ev.waitFrom(t, mark, "rejected", func(ev broker.Event) bool { return ev.Kind == broker.EventRejected })
			if !strings.Contains(ev.Reason, c.Err) {
				t.Fatalf("rejected for %q, want a reason naming %q", ev.Reason, c.Err)
			}
		})
	}
}
