package hub

import (
	"bytes"
	"testing"
)

func FuzzDecodeSpooled(f *testing.F) {
	f.Add(encodeSpooled("devices/d/messages/events/%24.mid=1", []byte(`{"a":1}`)))
	f.Add([]byte{})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 'x'})
	f.Add([]byte{0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		topic, body, err := decodeSpooled(b)
		if err != nil {
			return
		}
		if topic == "" {
			t.Fatal("decoded an empty topic")
		}
		if re := encodeSpooled(topic, body); !bytes.Equal(re, b) {
			t.Fatalf("re-encoding differs")
		}
	})
}
