package hub_test

import (
	"context"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hub/hubtest"
	"github.com/iothubby/iothubby/pkg/wire"
)

// The shared topic table, byte for byte, into a real session: every hub-to-device topic of
// wire.Cases (cloud-to-device, desired patch, method request) that the broker sends reaches the
// session's callbacks with the fields the table says. hubsim's tests run the device-to-hub half.
func TestWireCasesReachTheSession(t *testing.T) {
	for _, c := range wire.Cases {
		w := c.Want
		switch w.Kind {
		case wire.KindC2D, wire.KindTwinDesired, wire.KindMethodRequest:
		default:
			continue
		}
		t.Run(c.Name, func(t *testing.T) {
			b := hubtest.NewBroker(t)
			id := w.DeviceID
			if id == "" {
				id = "dev1"
			}
			c2d := make(chan *hub.C2DMessage, 1)
			desired := make(chan *hub.DesiredPatch, 1)
			methods := make(chan *hub.MethodRequest, 1)
			s, err := hub.New(hub.Config{Host: hubtest.Host, Address: b.Addr, DeviceID: id, Signer: b.Key, RootCAs: b.CAPool,
				OnC2D:     func(_ context.Context, m *hub.C2DMessage) { c2d <- m },
				OnDesired: func(_ context.Context, p *hub.DesiredPatch) { desired <- p },
				OnMethod:  func(_ context.Context, r *hub.MethodRequest) { methods <- r },
			})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			defer func() { _ = s.Close(ctx) }()
			if err := s.WaitConnected(ctx); err != nil {
				t.Fatal(err)
			}
			b.Publish(c.Topic, []byte(`{}`), 1)
			select {
			case m := <-c2d:
				if m.Topic != c.Topic {
					t.Errorf("topic %q, want %q", m.Topic, c.Topic)
				}
				for _, p := range w.Properties {
					var got string
					switch p.Key {
					case wire.PropMessageID:
						got = m.MessageID
					case wire.PropCorrelationID:
						got = m.CorrelationID
					case wire.PropUserID:
						got = m.UserID
					case wire.PropTo:
						got = m.To
					case wire.PropContentType:
						got = m.ContentType
					case wire.PropContentEncoding:
						got = m.ContentEncoding
					default:
						v, ok := m.Properties.Get(p.Key)
						if !ok {
							t.Errorf("property %q missing from %v", p.Key, m.Properties)
						}
						got = v
					}
					if got != p.Value {
						t.Errorf("property %q = %q, want %q", p.Key, got, p.Value)
					}
				}
			case p := <-desired:
				if p.Version != w.Version {
					t.Errorf("desired version %d, want %d", p.Version, w.Version)
				}
			case r := <-methods:
				if r.Name != w.Method || r.RequestID != w.RequestID {
					t.Errorf("method %q $rid %q, want %q %q", r.Name, r.RequestID, w.Method, w.RequestID)
				}
			case <-ctx.Done():
				t.Fatalf("%s: nothing reached the session", c.Topic)
			}
		})
	}
}
