package service_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/wire"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// startHub runs hubsim in-process on free ports; the client talks to it over real HTTPS.
func startHub(t *testing.T) (*hubsim.Server, *service.Client) {
	t.Helper()
	srv, err := hubsim.Start(context.Background(), hubsim.Config{StateDir: t.TempDir(), MQTTAddr: "127.0.0.1:0", HTTPSAddr: "127.0.0.1:0"}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	c, ep, err := service.ForHubsim(srv.StateDir())
	if err != nil {
		t.Fatal(err)
	}
	if ep.HTTPSAddress != srv.Endpoints().HTTPSAddress {
		t.Fatalf("endpoints %+v", ep)
	}
	t.Cleanup(c.Close)
	return srv, c
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestRegistryCRUD(t *testing.T) {
	_, c := startHub(t)
	d, err := c.CreateDevice(ctx(t), service.Device{DeviceID: "dev-1"})
	if err != nil {
		t.Fatal(err)
	}
	if d.Authentication.Type != "sas" || len(d.Authentication.SymmetricKey.PrimaryKey) != 44 || d.ETag == "" {
		t.Fatalf("created %+v", d)
	}
	if _, err := c.CreateDevice(ctx(t), service.Device{DeviceID: "dev-1"}); !errors.Is(err, wire.ErrDeviceAlreadyExists) {
		t.Fatalf("second create: %v", err)
	}
	got, err := c.GetDevice(ctx(t), "dev-1")
	if err != nil || got.Authentication.SymmetricKey.PrimaryKey != d.Authentication.SymmetricKey.PrimaryKey {
		t.Fatalf("get: %+v %v", got, err)
	}
	got.Status = "disabled"
	if _, err := c.UpdateDevice(ctx(t), got, `"not-the-etag"`); !errors.Is(err, wire.ErrPreconditionFailed) {
		t.Fatalf("update with a stale etag: %v", err)
	}
	upd, err := c.UpdateDevice(ctx(t), got, got.ETag)
	if err != nil || upd.Status != "disabled" || upd.ETag == got.ETag {
		t.Fatalf("update: %+v %v", upd, err)
	}
	list, err := c.ListDevices(ctx(t), 0)
	if err != nil || len(list) != 1 || list[0].DeviceID != "dev-1" {
		t.Fatalf("list: %+v %v", list, err)
	}
	st, err := c.Statistics(ctx(t))
	if err != nil || st.TotalDeviceCount != 1 || st.DisabledDeviceCount != 1 {
		t.Fatalf("statistics: %+v %v", st, err)
	}
	if err := c.DeleteDevice(ctx(t), "dev-1", ""); err != nil {
		t.Fatal(err)
	}
	_, err = c.GetDevice(ctx(t), "dev-1")
	var se wire.ServiceError
	if !errors.As(err, &se) || se.Status != 404 || se.Number != 404001 || !errors.Is(err, wire.ErrDeviceNotFound) {
		t.Fatalf("get after delete: %#v", err)
	}
}

func TestHubsimAdditionsAndErrors(t *testing.T) {
	_, c := startHub(t)
	if _, err := c.SendC2D(ctx(t), "nobody", service.C2DMessage{Body: "x"}); !errors.Is(err, wire.ErrDeviceNotFound) {
		t.Fatalf("c2d to an unknown device: %v", err)
	}
	if _, err := c.CreateDevice(ctx(t), service.Device{DeviceID: "dev-2"}); err != nil {
		t.Fatal(err)
	}
	id, err := c.SendC2D(ctx(t), "dev-2", service.C2DMessage{Body: "hello", MessageID: "m-1", Properties: map[string]string{"a": "b"}})
	if err != nil || id != "m-1" {
		t.Fatalf("c2d: %q %v", id, err)
	}
	msgs, err := c.Telemetry(ctx(t), "dev-2")
	if err != nil || len(msgs) != 0 {
		t.Fatalf("telemetry: %v %v", msgs, err)
	}
	conns, err := c.Connections(ctx(t))
	if err != nil || len(conns) != 0 {
		t.Fatalf("connections: %v %v", conns, err)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, cs := range []string{
		"",
		"HostName=h;DeviceId=d;SharedAccessKey=AAAA",            // a device string
		"HostName=h;SharedAccessKeyName=p;SharedAccessKey=!!!!", // bad key
	} {
		if _, err := service.New(service.Config{ConnectionString: cs}); err == nil {
			t.Errorf("New(%q) succeeded", cs)
		} else if strings.Contains(err.Error(), "AAAA") || strings.Contains(err.Error(), "!!!!") {
			t.Errorf("error leaks the key: %v", err)
		}
	}
	if _, err := service.New(service.Config{ConnectionString: "HostName=h;SharedAccessKeyName=p;SharedAccessKey=AAAA", CAFile: "/nonexistent"}); err == nil {
		t.Error("missing CA file accepted")
	}
}

func TestWrongPolicyKeyIsUnauthorized(t *testing.T) {
	srv, _ := startHub(t)
	ep := srv.Endpoints()
	c, err := service.New(service.Config{ConnectionString: "HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		Address: ep.HTTPSAddress, CAFile: ep.CAFile})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.ListDevices(ctx(t), 0)
	if !errors.Is(err, wire.ErrUnauthorized) {
		t.Fatalf("err = %v, want 401 IotHubUnauthorizedAccess", err)
	}
}
