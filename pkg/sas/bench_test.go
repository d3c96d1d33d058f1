package sas

import (
	"context"
	"testing"
	"time"
)

// BenchmarkBuild measures one device token (HMAC + encoding). BenchmarkHMACBaseline is the bare
// HMAC-SHA256 over the same string-to-sign, the floor Build is compared against:
// `make bench` prints both, and their ratio is the encoding and parsing overhead.
func BenchmarkBuild(b *testing.B) {
	k, _ := ParseKey(devKey)
	p := Params{Resource: DeviceResource("hub.example.net", "device-000123"), Expiry: time.Unix(1900000000, 0)}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Build(ctx, k, p); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseVerify(b *testing.B) {
	k, _ := ParseKey(devKey)
	exp := time.Unix(1900000000, 0)
	tok, _ := Build(context.Background(), k, Params{Resource: DeviceResource("hub.example.net", "device-000123"), Expiry: exp})
	now := exp.Add(-time.Hour)
	b.ReportAllocs()
	for b.Loop() {
		t, err := Parse(tok)
		if err != nil {
			b.Fatal(err)
		}
		if err := t.Verify(k, now); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkHMACBaseline(b *testing.B) {
	k, _ := ParseKey(devKey)
	msg := StringToSign(Encode(DeviceResource("hub.example.net", "device-000123")), "1900000000")
	b.ReportAllocs()
	for b.Loop() {
		_ = k.mac(msg)
	}
}
