package hub_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/internal/waitfor"
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
			id := deviceOf(w)
			c2d := make(chan *hub.C2DMessage, 1)
			desired := make(chan *hub.DesiredPatch, 1)
			methods := make(chan *hub.MethodRequest, 1)
			_, ctx := connected(t, b, hub.Config{DeviceID: id,
				OnC2D:     func(_ context.Context, m *hub.C2DMessage) { c2d <- m },
				OnDesired: func(_ context.Context, p *hub.DesiredPatch) { desired <- p },
				OnMethod:  func(_ context.Context, r *hub.MethodRequest) { methods <- r },
			})
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

// The device-to-hub half of the table on the agent's side: every canonical telemetry topic that
// a Message can express (an application property cannot be null) and every method response is
// what the session publishes, byte for byte. hubsim's tests check that the same topics are
// accepted.
func TestWireCasesTheSessionPublishes(t *testing.T) {
	for _, c := range wire.Cases {
		w := c.Want
		if c.ParseOnly || (w.Kind != wire.KindTelemetry && w.Kind != wire.KindMethodResponse) {
			continue
		}
		var m hub.Message
		expressible := true
		for _, p := range w.Properties {
			switch {
			case p.Null:
				expressible = false
			case p.Key == wire.PropMessageID:
				m.MessageID = p.Value
			case p.Key == wire.PropCorrelationID:
				m.CorrelationID = p.Value
			case p.Key == wire.PropContentType:
				m.ContentType = p.Value
			case p.Key == wire.PropContentEncoding:
				m.ContentEncoding = p.Value
			case wire.System(p.Key):
				expressible = false
			default:
				if m.Properties == nil {
					m.Properties = map[string]string{}
				}
				m.Properties[p.Key] = p.Value
			}
		}
		if !expressible {
			continue
		}
		t.Run(c.Name, func(t *testing.T) {
			b := hubtest.NewBroker(t)
			id := deviceOf(w)
			methods := make(chan *hub.MethodRequest, 1)
			s, ctx := connected(t, b, hub.Config{DeviceID: id, ModuleID: w.ModuleID,
				OnMethod: func(_ context.Context, r *hub.MethodRequest) { methods <- r }})
			if w.Kind == wire.KindTelemetry {
				m.Body = []byte(`{}`)
				if err := s.Send(ctx, &m); err != nil {
					t.Fatalf("send: %v", err)
				}
			} else {
				b.Publish(wire.MethodRequest("m", w.RequestID), []byte(`{}`), 1)
				select {
				case r := <-methods:
					if err := s.RespondMethod(ctx, r.RequestID, w.Status, []byte(`{}`)); err != nil {
						t.Fatalf("respond: %v", err)
					}
				case <-ctx.Done():
					t.Fatal("the method request did not reach the session")
				}
			}
			client := id
			if w.ModuleID != "" {
				client = id + "/" + w.ModuleID
			}
			waitfor.True(t, "the broker to log "+c.Topic, func() bool { return slices.Contains(b.ClientLog(client), "pub:"+c.Topic) })
		})
	}
}

// The refused half on the agent's side: every topic of wire.BadCases that the session's
// subscriptions would deliver is dropped and counted, and reaches no callback; the session goes
// on to deliver the next message.
func TestWireBadCasesNeverReachTheSession(t *testing.T) {
	b := hubtest.NewBroker(t)
	const id = "d"
	events := make(chan string, 16)
	s, ctx := connected(t, b, hub.Config{DeviceID: id,
		OnC2D:     func(_ context.Context, m *hub.C2DMessage) { events <- "c2d " + m.Topic },
		OnDesired: func(_ context.Context, p *hub.DesiredPatch) { events <- fmt.Sprintf("desired %d", p.Version) },
		OnMethod:  func(_ context.Context, r *hub.MethodRequest) { events <- "method " + r.Name + " " + r.RequestID },
	})
	subscribed := []string{wire.C2DFilter(id), wire.TwinResponseFilter, wire.TwinDesiredFilter, wire.MethodsFilter}
	tried := 0
	for i, c := range wire.BadCases {
		delivered := slices.ContainsFunc(subscribed, func(f string) bool { return strings.HasPrefix(c.Topic, strings.TrimSuffix(f, "#")) })
		if !delivered {
			continue
		}
		tried++
		before := s.Stats().BadTopics
		b.Publish(c.Topic, []byte(`{}`), 1)
		// A good desired patch after it: once that arrives, the bad one has been handled.
		version := int64(100 + i)
		b.Publish(wire.TwinDesired(version), []byte(`{}`), 1)
		select {
		case ev := <-events:
			if want := fmt.Sprintf("desired %d", version); ev != want {
				t.Fatalf("%s (%q) reached the session as %q", c.Name, c.Topic, ev)
			}
		case <-ctx.Done():
			t.Fatalf("%s: the next message did not arrive", c.Name)
		}
		if got := s.Stats().BadTopics; got != before+1 {
			t.Fatalf("%s (%q): BadTopics %d, want %d", c.Name, c.Topic, got, before+1)
		}
	}
	if tried < 5 {
		t.Fatalf("only %d bad topics fall under the session's subscriptions; the filter list is wrong", tried)
	}
}

// connected starts a session with cfg against b and waits until it is connected; ctx ends (and
// the session closes) with the test.
func connected(t *testing.T, b *hubtest.Broker, cfg hub.Config) (*hub.Session, context.Context) {
	t.Helper()
	cfg.Host, cfg.Address, cfg.Signer, cfg.RootCAs = hubtest.Host, b.Addr, b.Key, b.CAPool
	cfg.LeanMQTT = *lean
	s, err := hub.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(func() {
		_ = s.Close(ctx)
		cancel()
	})
	if err := s.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	return s, ctx
}

// deviceOf is the device a table topic names, dev1 for the $iothub topics that name none.
func deviceOf(w wire.Topic) string {
	if w.DeviceID == "" {
		return "dev1"
	}
	return w.DeviceID
}
