package hubsim

import (
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"time"

	hubamqp "github.com/iothubby/iothubby/pkg/hubsim/amqp"
	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/eventhubs"
)

// EventsFile holds the Event Hubs-compatible endpoint's events and consumer groups.
const EventsFile = "eventhubs.db"

// EventsConfig configures the Event Hubs-compatible endpoint's store; zero values take
// eventhubs' defaults (4 partitions, 100000 events and 256 MiB per partition, one day).
type EventsConfig struct {
	Partitions int
	MaxEvents  int
	MaxBytes   int64
	Retention  time.Duration
	// ConsumerGroups are created at start if missing ($Default always exists).
	ConsumerGroups []string
}

func (s *Server) openEvents() error {
	c := s.cfg.Events
	st, err := eventhubs.Open(eventhubs.Config{
		Path: filepath.Join(s.cfg.StateDir, EventsFile), Partitions: c.Partitions,
		MaxEvents: c.MaxEvents, MaxBytes: c.MaxBytes, Retention: c.Retention, Logger: s.log.Named("eventhubs"),
	})
	if err != nil {
		return err
	}
	s.events = st
	for _, g := range c.ConsumerGroups {
		if st.HasConsumerGroup(g) {
			continue
		}
		if err := st.CreateConsumerGroup(g); err != nil {
			return err
		}
	}
	return nil
}

// EventHubs is the Event Hubs-compatible endpoint's event store.
func (s *Server) EventHubs() *eventhubs.Store { return s.events }

// EventHubName is the built-in endpoint's Event Hub name (EntityPath): the hub's name, the first
// label of its host name.
func (s *Server) EventHubName() string {
	name, _, _ := strings.Cut(s.cfg.HostName, ".")
	return name
}

// amqpProperties are the system properties that travel in an AMQP message's properties section;
// the others (iothub-*, dt-*, ...) are message annotations.
var amqpProperties = map[string]bool{
	"message-id": true, "correlation-id": true, "user-id": true, "to": true, "content-type": true,
	"content-encoding": true, "absolute-expiry-time": true, "creation-time": true,
}

// recordEvent is the broker's telemetry feed into the built-in endpoint.
func (s *Server) recordEvent(deviceID string, m broker.Message) {
	e := eventhubs.Event{
		Body:        m.Body,
		System:      make(map[string]string, 4),
		Annotations: make(map[string]string, 8),
	}
	for _, p := range m.Properties {
		e.Properties = append(e.Properties, eventhubs.Property{Key: p.Key, Value: p.Value, Null: p.Null})
	}
	for k, v := range m.SystemProperties {
		if amqpProperties[k] {
			e.System[k] = v
		} else {
			e.Annotations[k] = v
		}
	}
	e.Annotations["iothub-message-source"] = "Telemetry"
	s.events.Append(deviceID, e)
}

// serveEventHubs plugs the built-in endpoint into the AMQP server and puts its connection
// string (with the given policy) into the endpoints.
func (s *Server) serveEventHubs(keyName, key string) error {
	name := s.EventHubName()
	if err := s.amqp.ServeEventHubs(hubamqp.EventHubsConfig{Store: s.events, Name: name, CreatedAt: s.events.CreatedAt()}); err != nil {
		return err
	}
	_, port, _ := net.SplitHostPort(s.amqp.Addr().String())
	s.endpoints.EventHubsCompatibleName = name
	s.endpoints.EventHubsCompatibleConnectionString = fmt.Sprintf("Endpoint=sb://%s/;SharedAccessKeyName=%s;SharedAccessKey=%s;EntityPath=%s",
		net.JoinHostPort(s.cfg.HostName, port), keyName, key, name)
	return nil
}
