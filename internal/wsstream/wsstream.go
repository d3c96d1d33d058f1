// Package wsstream carries a byte stream (MQTT) in binary WebSocket messages, as IoT Hub's
// MQTT-over-WebSockets does: the agent's mqtt-ws transport and hubsim's WebSocket listener share
// it.
package wsstream

import (
	"errors"
	"io"
	"sync"

	"github.com/gorilla/websocket"
)

// ErrText is returned by Read when the peer sends a text message: MQTT needs binary ones.
var ErrText = errors.New("websocket: text message (MQTT needs binary messages)")

// Stream reads and writes the bytes of binary WebSocket messages. Read is called from one
// goroutine; writes are serialised. A close frame from the peer reads as io.EOF.
type Stream struct {
	c   *websocket.Conn
	r   io.Reader // the message being read
	wmu sync.Mutex
}

// New returns a Stream over c.
func New(c *websocket.Conn) *Stream { return &Stream{c: c} }

// Conn is the underlying WebSocket connection.
func (s *Stream) Conn() *websocket.Conn { return s.c }

func (s *Stream) Read(p []byte) (int, error) {
	for {
		if s.r == nil {
			typ, r, err := s.c.NextReader()
			if err != nil {
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					return 0, io.EOF
				}
				return 0, err
			}
			if typ != websocket.BinaryMessage {
				return 0, ErrText
			}
			s.r = r
		}
		n, err := s.r.Read(p)
		if errors.Is(err, io.EOF) {
			s.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

// Write sends p as one binary message.
func (s *Stream) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := s.c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}
