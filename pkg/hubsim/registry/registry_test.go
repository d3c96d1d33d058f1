package registry

import (
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/iothubby/iothubby/pkg/wire"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func open(t *testing.T, path string) *Registry {
	t.Helper()
	r, err := Open(path, zaptest.NewLogger(t), Options{FlushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

func TestETagMatches(t *testing.T) {
	for _, c := range []struct {
		ifMatch, etag string
		want          bool
	}{
		{"*", "MQ==", true}, {`"*"`, "MQ==", true}, {`"MQ=="`, "MQ==", true}, {"MQ==", "MQ==", true},
		{`""MQ==""`, "MQ==", false}, {`"MA=="`, "MQ==", false}, {`""`, "MQ==", false}, {" * ", "x", true},
	} {
		if got := ETagMatches(c.ifMatch, c.etag); got != c.want {
			t.Errorf("ETagMatches(%q, %q) = %v", c.ifMatch, c.etag, got)
		}
	}
}

func TestRights(t *testing.T) {
	all := RegistryRead | RegistryWrite | ServiceConnect | DeviceConnect
	if all.String() != "RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect" {
		t.Fatal(all.String())
	}
	r, err := ParseRights("serviceconnect,RegistryRead")
	if err != nil || r != ServiceConnect|RegistryRead {
		t.Fatal(r, err)
	}
	if _, err := ParseRights("Everything"); err == nil {
		t.Fatal("unknown right accepted")
	}
}

func TestCreateUpdateDeleteAndPersistence(t *testing.T) {
	path := filepath.Join(t.TempDir(), "reg.db")
	r := open(t, path)
	var changes []Change
	r.Watch(func(c Change) { changes = append(changes, c) })

	d, err := r.Create(Device{DeviceID: "d1"})
	if err != nil {
		t.Fatal(err)
	}
	if d.Authentication.Type != AuthSAS || len(d.Authentication.SymmetricKey.PrimaryKey) != 44 || d.Status != StatusEnabled || d.ETag == "" {
		t.Fatalf("%+v", d)
	}
	if _, err := r.Create(Device{DeviceID: "d1"}); !errors.Is(err, wire.ErrDeviceAlreadyExists) {
		t.Fatal(err)
	}
	for _, bad := range []Device{
		{DeviceID: "bad id"},
		{DeviceID: "d", Status: "sleepy"},
		{DeviceID: "d", Authentication: Authentication{Type: AuthSelfSigned}},
		{DeviceID: "d", Authentication: Authentication{Type: AuthSelfSigned, X509Thumbprint: X509Thumbprint{PrimaryThumbprint: "xyz"}}},
		{DeviceID: "d", Authentication: Authentication{SymmetricKey: SymmetricKey{PrimaryKey: "c2hvcnQ="}}},
		{DeviceID: "d", Authentication: Authentication{Type: AuthCertificateAuthority, SymmetricKey: SymmetricKey{PrimaryKey: GenerateKey()}}},
	} {
		if _, err := r.Create(bad); !errors.Is(err, wire.ErrArgumentInvalid) {
			t.Errorf("%+v: %v", bad, err)
		}
	}
	if _, err := r.Update(Device{DeviceID: "d1", Status: StatusDisabled}, `"stale"`); !errors.Is(err, wire.ErrPreconditionFailed) {
		t.Fatal(err)
	}
	u, err := r.Update(Device{DeviceID: "d1", Status: StatusDisabled}, `"`+d.ETag+`"`)
	if err != nil || u.ETag == d.ETag || u.Authentication.SymmetricKey != d.Authentication.SymmetricKey || u.StatusUpdatedTime.IsZero() {
		t.Fatalf("%+v %v", u, err)
	}

	now := time.Now().UTC().Truncate(time.Millisecond)
	r.SetConnectionState("d1", "stale-generation", true, now)
	if got, _ := r.Get("d1"); got.ConnectionState != Disconnected {
		t.Fatal("a stale generation changed the state")
	}
	r.SetConnectionState("d1", d.GenerationID, true, now)
	r.RecordActivity("d1", d.GenerationID, now.Add(time.Second))
	r.SetCloudToDeviceMessageCount("d1", d.GenerationID, 3)
	got, _ := r.Get("d1")
	if got.ConnectionState != Connected || !got.LastActivityTime.Equal(now.Add(time.Second)) || got.CloudToDeviceMessageCount != 3 {
		t.Fatalf("%+v", got)
	}
	if c := r.ConnectedCount(); c != 1 {
		t.Fatal(c)
	}
	if _, err := r.Create(Device{DeviceID: "d2"}); err != nil {
		t.Fatal(err)
	}
	if err := r.Delete("d2", `"nope"`); !errors.Is(err, wire.ErrPreconditionFailed) {
		t.Fatal(err)
	}
	if err := r.Delete("d2", ""); err != nil {
		t.Fatal(err)
	}
	if len(changes) != 4 || changes[3].New != nil || changes[0].Old != nil {
		t.Fatalf("changes %+v", changes)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}

	r2 := open(t, path)
	got, err = r2.Get("d1")
	if err != nil || got.ETag != u.ETag || got.Status != StatusDisabled || got.ConnectionState != Disconnected ||
		!got.LastActivityTime.Equal(now.Add(time.Second)) || got.CloudToDeviceMessageCount != 0 {
		t.Fatalf("after reopen: %+v %v", got, err)
	}
	if _, err := r2.Get("d2"); !errors.Is(err, wire.ErrDeviceNotFound) {
		t.Fatal(err)
	}
	if s := r2.Stats(); s != (Stats{TotalDeviceCount: 1, DisabledDeviceCount: 1}) {
		t.Fatalf("%+v", s)
	}
	d3, _ := r2.Create(Device{DeviceID: "d3"})
	if d3.ETag == u.ETag || d3.GenerationID <= d.GenerationID {
		t.Fatalf("etag or generation repeated: %+v", d3)
	}
}

func TestDeviceJSON(t *testing.T) {
	var d Device
	in := `{"deviceId":"x","status":"disabled","statusReason":null,"authentication":{"symmetricKey":{"primaryKey":null},"x509Thumbprint":{"primaryThumbprint":"AB"},"type":"selfSigned"},"capabilities":{"iotEdge":true},"lastActivityTime":"2021-04-21T11:30:16.5465465Z","unknown":[1]}`
	if err := json.Unmarshal([]byte(in), &d); err != nil {
		t.Fatal(err)
	}
	if d.DeviceID != "x" || d.Status != StatusDisabled || d.Authentication.X509Thumbprint.PrimaryThumbprint != "AB" || !d.Capabilities.IoTEdge || d.LastActivityTime.Nanosecond() != 546546500 {
		t.Fatalf("%+v", d)
	}
	b, _ := json.Marshal(Device{DeviceID: "y"})
	for _, want := range []string{`"statusReason":null`, `"primaryKey":null`, `"primaryThumbprint":null`, `"connectionState":"Disconnected"`,
		`"lastActivityTime":"0001-01-01T00:00:00Z"`, `"capabilities":{"iotEdge":false}`, `"cloudToDeviceMessageCount":0`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("%s lacks %s", b, want)
		}
	}
}

func TestCACertificates(t *testing.T) {
	r := open(t, filepath.Join(t.TempDir(), "reg.db"))
	if _, err := r.AddCACertificate("x", []byte("junk")); !errors.Is(err, wire.ErrArgumentInvalid) {
		t.Fatal(err)
	}
	if err := r.DeleteCACertificate("nope"); err == nil {
		t.Fatal("deleted a missing CA")
	}
	if len(r.CACertificates()) != 0 || r.CAPool() == nil {
		t.Fatal("fresh registry has CAs")
	}
}

func stored(t *testing.T, r *Registry, id string) Device {
	t.Helper()
	var d Device
	if err := r.db.View(func(tx *bolt.Tx) error {
		return json.Unmarshal(tx.Bucket(bucketDevices).Get([]byte(id)), &d)
	}); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestFlushWritesStateChangesEveryTickAndActivityLater(t *testing.T) {
	r := open(t, filepath.Join(t.TempDir(), "reg.db"))
	d, _ := r.Create(Device{DeviceID: "a"})
	now := time.Now().Truncate(time.Microsecond) // stored with 100 ns precision
	r.RecordActivity("a", d.GenerationID, now)
	if err := r.flush(false); err != nil {
		t.Fatal(err)
	}
	if got := stored(t, r, "a"); !got.LastActivityTime.IsZero() {
		t.Fatal("activity alone was written on a state tick")
	}
	r.SetConnectionState("a", d.GenerationID, true, now)
	if err := r.flush(false); err != nil {
		t.Fatal(err)
	}
	if got := stored(t, r, "a"); got.ConnectionState != Connected || got.LastActivityTime.IsZero() {
		t.Fatalf("state change not written: %+v", got)
	}
	r.RecordActivity("a", d.GenerationID, now.Add(time.Minute))
	if err := r.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := stored(t, r, "a"); !got.LastActivityTime.Equal(now.Add(time.Minute)) {
		t.Fatalf("full flush: %v", got.LastActivityTime)
	}
}

func TestSecondOpenIsRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "reg.db")
	_ = open(t, path)
	if _, err := Open(path, nil, Options{}); err == nil || !strings.Contains(err.Error(), "locked") {
		t.Fatalf("second open: %v", err)
	}
}
