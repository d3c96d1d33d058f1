package mqttpkt

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

const testLimit = 64 * 1024

func TestConnectCases(t *testing.T) {
	for _, c := range ConnectCases {
		t.Run(c.Name, func(t *testing.T) {
			// A byte after a good packet must stay unread: the broker replays the CONNECT to
			// mochi and mochi reads on from the connection.
			in := c.Raw
			if c.Err == "" {
				in = append(bytes.Clone(c.Raw), 0xee)
			}
			r := bytes.NewReader(in)
			pkt, ci, remaining, err := Screen(r, testLimit)
			if c.Err == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if !bytes.Equal(pkt, c.Raw) || r.Len() != 1 {
					t.Fatalf("read %x, %d bytes left, want the packet and 1 byte left", pkt, r.Len())
				}
				checkDecodes(t, c)
				w := c.Want.Connect
				want := ConnectInfo{ClientID: w.ClientIdentifier, Username: string(w.Username), HasUsername: w.UsernameFlag,
					HasPassword: w.PasswordFlag, Clean: w.Clean, KeepAlive: w.Keepalive, WillFlag: w.WillFlag, WillTopic: w.WillTopic,
					WillQoS: w.WillQos, WillRetain: w.WillRetain, PayloadLen: len(w.WillPayload)}
				if ci != want {
					t.Fatalf("ConnectInfo %+v, want %+v", ci, want)
				}
				if p := ConnectPassword(pkt); !bytes.Equal(p, w.Password) {
					t.Fatalf("password %q, want %q", p, w.Password)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.Err) {
				t.Fatalf("error %v, want one containing %q", err, c.Err)
			}
			var ve *VersionError
			if isVersion := errors.As(err, &ve); isVersion != c.Version {
				t.Fatalf("%v: a VersionError is %v, want %v", err, isVersion, c.Version)
			}
			if !c.Version && !errors.Is(err, ErrMalformedConnect) {
				t.Fatalf("%v does not wrap ErrMalformedConnect", err)
			}
			if c.Version && r.Len() > remaining {
				t.Fatalf("%d bytes of the packet left unread, but remaining says %d", r.Len(), remaining)
			}
			// The same verdict from ParseConnect on the whole packet, where it is whole.
			if _, perr := ParseConnect(c.Raw); perr == nil {
				t.Fatalf("ParseConnect accepts what Screen refuses (%v)", err)
			}
		})
	}
}

func TestCases(t *testing.T) {
	var stream []byte
	var want []packets.Packet
	for _, c := range Cases {
		t.Run(c.Name, func(t *testing.T) {
			if c.Err == "" {
				checkDecodes(t, c)
				stream = append(stream, c.Raw...)
				want = append(want, c.Want)
				return
			}
			_, err := Decode(c.Raw)
			if err == nil || !strings.Contains(err.Error(), c.Err) {
				t.Fatalf("error %v, want one containing %q", err, c.Err)
			}
			var ve *VersionError
			if isVersion := errors.As(err, &ve); isVersion != c.Version {
				t.Fatalf("%v: a VersionError is %v, want %v", err, isVersion, c.Version)
			}
			if !c.Version && !errors.Is(err, ErrMalformed) {
				t.Fatalf("%v does not wrap ErrMalformed", err)
			}
		})
	}
	// Read takes the good packets one after the other from a stream and then reports io.EOF.
	r := bytes.NewReader(stream)
	for i, w := range want {
		got, err := Read(r, testLimit)
		if err != nil || !reflect.DeepEqual(got, w) {
			t.Fatalf("packet %d: %+v %v, want %+v", i, got, err, w)
		}
	}
	if _, err := Read(r, testLimit); err != io.EOF {
		t.Fatalf("after the last packet: %v, want io.EOF", err)
	}
}

// checkDecodes checks that c.Raw decodes to c.Want and that c.Want encodes to c.Raw.
func checkDecodes(t *testing.T, c Case) {
	t.Helper()
	got, err := Decode(c.Raw)
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	if !reflect.DeepEqual(got, c.Want) {
		t.Fatalf("Decode:\n got %+v\nwant %+v", got, c.Want)
	}
	b, err := Encode(c.Want)
	if err != nil || !bytes.Equal(b, c.Raw) {
		t.Fatalf("Encode: %x %v\nwant %x", b, err, c.Raw)
	}
}

// ParseConnect on a packet that is not whole or not alone (Screen never hands it one).
func TestParseConnectFraming(t *testing.T) {
	good := ConnectCases.Get("SAS device, clean session").Raw
	for name, b := range map[string][]byte{
		"empty":                 nil,
		"PUBLISH":               {0x30, 0},
		"a byte after":          append(bytes.Clone(good), 0),
		"a byte short":          good[:len(good)-1],
		"length cut":            {0x10, 0x80},
		"length of five bytes":  {0x10, 0x80, 0x80, 0x80, 0x80, 0x01},
		"name length of 5":      {0x10, 8, 0, 5, 'M', 'Q', 'T', 'T', 'x', 4},
		"no room for the level": {0x10, 6, 0, 4, 'M', 'Q', 'T', 'T'},
	} {
		if ci, err := ParseConnect(b); err == nil || !errors.Is(err, ErrMalformedConnect) {
			t.Errorf("%s: %+v, %v; want a malformed-CONNECT error", name, ci, err)
		}
		if p := ConnectPassword(b); p != nil {
			t.Errorf("%s: password %q from a refused packet", name, p)
		}
	}
}

func TestFrame(t *testing.T) {
	for _, c := range append(append(Table{}, ConnectCases...), Cases...) {
		first, body, err := ReadRaw(bytes.NewReader(c.Raw), 1<<20)
		if err != nil {
			continue // not framed well: nothing to compare
		}
		if got := Frame(first, body); !bytes.Equal(got, c.Raw) && c.Name != "remaining length over the limit" {
			t.Errorf("%s: Frame gives %x, want %x", c.Name, got, c.Raw)
		}
	}
	// Every first byte; remaining lengths of one, two, three and four bytes.
	for first := range 256 {
		for _, n := range []int{0, 127, 128, 16383, 16384, 2097152} {
			if n > 16384 && first != 0x30 {
				continue
			}
			b := Frame(byte(first), make([]byte, n))
			f, body, err := ReadRaw(bytes.NewReader(b), n)
			if err != nil || f != byte(first) || len(body) != n {
				t.Fatalf("Frame(0x%02x, %d bytes) reads back as 0x%02x, %d bytes, %v", first, n, f, len(body), err)
			}
		}
	}
}

func TestSizeLimits(t *testing.T) {
	big, err := Encode(Publish("t", 0, 0, make([]byte, testLimit)))
	if err != nil {
		t.Fatal(err)
	}
	// The limit is on the remaining length, checked before the body is read.
	r := bytes.NewReader(big[:5])
	if _, err := Read(r, testLimit); err == nil || !strings.Contains(err.Error(), "65539 bytes, limit 65536") || !errors.Is(err, ErrMalformed) {
		t.Fatalf("oversize PUBLISH: %v", err)
	}
	if _, err := Read(bytes.NewReader(big), testLimit+3); err != nil {
		t.Fatalf("PUBLISH at the limit: %v", err)
	}
	cn, err := Encode(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
		ClientIdentifier: "d", UsernameFlag: true, Username: bytes.Repeat([]byte("u"), 1000)}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := Screen(bytes.NewReader(cn), 1000); err == nil || !strings.Contains(err.Error(), "1015 bytes, limit 1000") {
		t.Fatalf("oversize CONNECT: %v", err)
	}
	if _, _, _, err := Screen(bytes.NewReader(cn), 1015); err != nil {
		t.Fatalf("CONNECT at the limit: %v", err)
	}
}

func TestEncodeRefusesWhatItCannotWrite(t *testing.T) {
	if _, err := Encode(Publish("t", 1, 0, nil)); err == nil {
		t.Fatal("a QoS 1 PUBLISH without a packet ID was encoded")
	}
	if _, err := Encode(Bare(packets.Auth)); err == nil || !strings.Contains(err.Error(), "packet type 15") {
		t.Fatalf("AUTH: %v", err)
	}
}

// FuzzDecode: the decoder never panics; whatever it accepts encodes to a packet it decodes the
// same way; a CONNECT it accepts mochi accepts too (that is what the screen is for).
func FuzzDecode(f *testing.F) {
	for _, c := range append(append(Table{}, ConnectCases...), Cases...) {
		f.Add(c.Raw)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		pk, err := Decode(b)
		if err != nil {
			return
		}
		enc, err := Encode(pk)
		if err != nil {
			t.Fatalf("accepted %x but cannot encode it: %v", b, err)
		}
		again, err := Decode(enc)
		if err != nil || !reflect.DeepEqual(again, pk) {
			t.Fatalf("%x decodes to %+v, its encoding %x to %+v (%v)", b, pk, enc, again, err)
		}
		if pk.FixedHeader.Type != packets.Connect {
			return
		}
		if pkt, _, _, err := Screen(bytes.NewReader(b), len(b)); err != nil || !bytes.Equal(pkt, b) {
			t.Fatalf("Decode accepts a CONNECT that Screen refuses: %v", err)
		}
		if code := pk.ConnectValidate(); code != packets.CodeSuccess {
			t.Fatalf("accepted a CONNECT that mochi's validation refuses: %v", code)
		}
	})
}

// FuzzScreen: the CONNECT screen never panics on what a connection sends first, never claims
// bytes it did not read, and what it lets through mochi decodes to the same CONNECT without
// panicking and validates (mochi's decoder can crash on malformed input, which is why the
// screen exists).
func FuzzScreen(f *testing.F) {
	for _, c := range ConnectCases {
		f.Add(c.Raw)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		pkt, ci, _, err := Screen(bytes.NewReader(b), testLimit)
		if err != nil {
			return
		}
		if !bytes.HasPrefix(b, pkt) {
			t.Fatalf("Screen returned bytes that were not read")
		}
		_, body, err := ReadRaw(bytes.NewReader(pkt), testLimit)
		if err != nil {
			t.Fatalf("accepted a CONNECT whose framing does not read back: %v", err)
		}
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect, Remaining: len(body)}}
		if err := pk.ConnectDecode(body); err != nil {
			t.Fatalf("accepted a CONNECT that mochi refuses: %v", err)
		}
		if pk.ProtocolVersion != Level || pk.Connect.ClientIdentifier != ci.ClientID || string(pk.Connect.Username) != ci.Username {
			t.Fatalf("mochi reads %+v, the screen read %+v", pk.Connect, ci)
		}
		if code := pk.ConnectValidate(); code != packets.CodeSuccess {
			t.Fatalf("accepted a CONNECT that mochi's validation refuses: %v", code)
		}
	})
}
