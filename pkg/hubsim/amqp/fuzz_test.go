package amqp

import (
	"io"
	"net"
	"testing"
	"time"

	codec "github.com/iothubby/iothubby/pkg/amqp"
)

// FuzzConn feeds arbitrary frames to a connection after the protocol header and open: the
// server must neither panic nor hang, and Close must finish.
func FuzzConn(f *testing.F) {
	frame := func(ch uint16, p codec.Performative, payload ...byte) []byte {
		b, err := codec.AppendPerformativeFrame(nil, codec.FrameAMQP, ch, p, payload)
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	zero, one := uint32(0), uint32(1)
	msg, _ := (&codec.Message{Data: [][]byte{[]byte("x")}}).MarshalBinary()
	begin := frame(0, &codec.Begin{IncomingWindow: 10, OutgoingWindow: 10, HandleMax: 4})
	attachS := frame(0, &codec.Attach{Name: "s", Role: codec.RoleSender, Target: &codec.Target{Address: "$cbs"}, InitialDeliveryCount: &zero})
	attachR := frame(0, &codec.Attach{Name: "r", Handle: 1, Role: codec.RoleReceiver, Source: &codec.Source{Address: "$cbs"}})
	flow := frame(0, &codec.Flow{IncomingWindow: 10, OutgoingWindow: 10, Handle: &one, DeliveryCount: &zero, LinkCredit: &one, Drain: true, Echo: true})
	transfer := frame(0, &codec.Transfer{Handle: 0, DeliveryID: &zero, DeliveryTag: []byte{0}, More: true}, msg...)
	f.Add(append(append(append(append([]byte{}, begin...), attachS...), attachR...), flow...))
	f.Add(append(append(append([]byte{}, begin...), attachS...), transfer...))
	f.Add(append(append([]byte{}, begin...), frame(0, &codec.Detach{Handle: 0, Closed: true})...))
	f.Add(append(append([]byte{}, begin...), frame(0, &codec.End{})...))
	f.Add([]byte{0, 0, 0, 8, 2, 0, 0, 0})
	open := frame(0, &codec.Open{ContainerID: "fuzz", MaxFrameSize: 4096})
	f.Fuzz(func(t *testing.T, data []byte) {
		s := New(Config{HostName: "localhost", IdleTimeout: time.Second, HandshakeTimeout: time.Second, WriteTimeout: time.Second}, nil)
		client, server := net.Pipe()
		s.ServeConn(server)
		go func() { _, _ = io.Copy(io.Discard, client) }()
		_ = client.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, _ = client.Write(codec.HeaderAMQP[:])
		_, _ = client.Write(open)
		_, _ = client.Write(data)
		_ = client.Close()
		done := make(chan struct{})
		go func() { _ = s.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("Close did not finish")
		}
	})
}
