package hubsim_test

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/wire"
)

// TestConcurrentDevices runs many devices at once (telemetry, cloud-to-device, takeovers,
// REST reads) to give the race detector something to chew on. Every device must end with all of
// its telemetry recorded and all of its cloud-to-device messages completed.
func TestConcurrentDevices(t *testing.T) {
	e := newEnv(t)
	const devices, msgs = 40, 20
	devs := make([]registry.Device, devices)
	for i := range devs {
		devs[i] = e.createSAS(fmt.Sprintf("stress-%02d", i))
	}
	var wg sync.WaitGroup
	errs := make(chan error, devices*4)
	for i, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := runDevice(e, d, msgs, i%4 == 0); err != nil {
				errs <- fmt.Errorf("%s: %w", d.DeviceID, err)
			}
		}()
		if i%5 == 0 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range 3 {
					if _, err := e.srv.Broker().SendC2D(d.DeviceID, broker.C2DMessage{Body: []byte("c2d")}); err != nil {
						errs <- err
					}
					_ = e.srv.Broker().Connections()
					_, _ = e.srv.Registry().Get(d.DeviceID)
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, d := range devs {
		msgsGot, err := e.srv.Broker().Telemetry(d.DeviceID)
		if err != nil || len(msgsGot) < msgs {
			t.Errorf("%s: %d messages recorded, %v", d.DeviceID, len(msgsGot), err)
		}
	}
}

// runDevice connects, subscribes to C2D, sends msgs QoS 1 messages (waiting for every PUBACK),
// acknowledging any C2D that arrives; with takeover it then connects a second time and sends
// one more message on the new connection.
func runDevice(e *env, d registry.Device, msgs int, takeover bool) error {
	session := func() (*tls.Conn, *bufio.Reader, error) {
		c, err := tls.Dial("tcp", e.srv.Endpoints().MQTTAddress, e.srv.ClientTLSConfig())
		if err != nil {
			return nil, nil, err
		}
		_ = c.SetDeadline(time.Now().Add(waitTimeout))
		r := bufio.NewReader(c)
		if _, err := c.Write(connectPkt(4, d.DeviceID, e.host+"/"+d.DeviceID+"/?api-version=2021-04-12", e.token(d), false)); err != nil {
			return nil, nil, err
		}
		ack := make([]byte, 4)
		if _, err := io.ReadFull(r, ack); err != nil || ack[3] != 0 {
			return nil, nil, fmt.Errorf("CONNACK %x %v", ack, err)
		}
		return c, r, nil
	}
	send := func(c *tls.Conn, r *bufio.Reader, first uint16, n int) error {
		if _, err := c.Write(subscribePkt(first, wire.C2DFilter(d.DeviceID))); err != nil {
			return err
		}
		pending := map[uint16]bool{first: true}
		for i := range n {
			pid := first + 1 + uint16(i)
			pending[pid] = true
			if _, err := c.Write(publishPkt(wire.Telemetry(d.DeviceID, wire.Properties{{Key: "i", Value: fmt.Sprint(i)}}), []byte("x"), 1, pid, false)); err != nil {
				return err
			}
		}
		for len(pending) > 0 {
			p, err := readPkt(r)
			if err != nil {
				return fmt.Errorf("%d acks missing: %w", len(pending), err)
			}
			body := p.body
			switch p.typ {
			case 4, 9: // PUBACK, SUBACK
				delete(pending, binary.BigEndian.Uint16(body))
			case 3: // C2D: acknowledge
				n := int(binary.BigEndian.Uint16(body))
				if _, err := c.Write(pubackPkt(binary.BigEndian.Uint16(body[2+n:]))); err != nil {
					return err
				}
			default:
				return fmt.Errorf("unexpected packet type %d", p.typ)
			}
		}
		return nil
	}
	c, r, err := session()
	if err != nil {
		return err
	}
	defer c.Close()
	if err := send(c, r, 1, msgs); err != nil {
		return err
	}
	if takeover {
		c2, r2, err := session()
		if err != nil {
			return err
		}
		defer c2.Close()
		if err := send(c2, r2, 100, 1); err != nil {
			return err
		}
	}
	return nil
}
