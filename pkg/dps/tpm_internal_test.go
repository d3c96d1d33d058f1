package dps

import (
	"context"
	"errors"
	"strings"
	"testing"
)

type nopTPM struct{}

func (nopTPM) EndorsementKey() []byte                         { return []byte{0, 1, 0} }
func (nopTPM) StorageRootKey() []byte                         { return []byte{0, 1, 0} }
func (nopTPM) ImportActivation(context.Context, []byte) error { return nil }
func (nopTPM) Sign(context.Context, []byte) ([]byte, error)   { return make([]byte, 32), nil }

func TestTPMOverMQTTRefusedBeforeSending(t *testing.T) {
	_, err := Register(context.Background(), Config{
		Endpoint: "127.0.0.1:1", IDScope: "0ne000", RegistrationID: "dev", Transport: MQTT, TPM: nopTPM{},
	})
	if !errors.Is(err, ErrTPMOverMQTT) {
		t.Fatalf("got %v, want ErrTPMOverMQTT", err)
	}
	cfg := Config{IDScope: "0ne000", RegistrationID: "dev", TPM: nopTPM{}}
	if err := cfg.defaults(); err != nil || cfg.Transport != HTTPS {
		t.Fatalf("TPM without a transport: %v, transport %q (want https)", err, cfg.Transport)
	}
	if tok, err := cfg.token(context.Background()); err != nil || tok != "" {
		t.Fatalf("before the challenge a TPM registration must carry no token; got %q, %v", tok, err)
	}
	cfg.tpmReady = true
	if tok, err := cfg.token(context.Background()); err != nil || !strings.Contains(tok, "skn=registration") {
		t.Fatalf("after the challenge: %q, %v", tok, err)
	}
}
