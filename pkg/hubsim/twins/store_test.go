package twins

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/pkg/hubsim/broker"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type notes struct {
	mu   sync.Mutex
	byID map[string][]int64
}

func (n *notes) NotifyDesired(id string, v int64, _ []byte) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.byID[id] = append(n.byID[id], v)
	return true
}

func open(t *testing.T, path string) (*registry.Registry, *Store) {
	t.Helper()
	reg, err := registry.Open(path, nil, registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := Open(reg, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return reg, s
}

// Concurrent device PATCHes, service PATCHes and flushes: versions count every change,
// notifications leave in version order, and a reopened store has the same twins.
func TestConcurrentChangesAndReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	reg, s := open(t, path)
	n := &notes{byID: map[string][]int64{}}
	s.SetNotifier(n)
	const devices, changes = 4, 50
	for i := range devices {
		if _, err := reg.Create(registry.Device{DeviceID: fmt.Sprintf("d%d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for i := range devices {
		id := fmt.Sprintf("d%d", i)
		wg.Add(3)
		go func() {
			defer wg.Done()
			for j := range changes {
				if r := s.PatchReported(broker.Caller{DeviceID: id}, []byte(fmt.Sprintf(`{"r%d":%d}`, j%3, j))); r.Status != 204 {
					t.Errorf("PATCH %d: %s", r.Status, r.Body)
				}
			}
		}()
		go func() {
			defer wg.Done()
			for j := range changes {
				if _, err := s.Update(id, "*", []byte(fmt.Sprintf(`{"properties":{"desired":{"d%d":%d}}}`, j%3, j))); err != nil {
					t.Errorf("Update: %v", err)
				}
			}
		}()
		go func() {
			defer wg.Done()
			for range changes {
				if err := s.Flush(); err != nil {
					t.Errorf("Flush: %v", err)
				}
				s.GetTwin(broker.Caller{DeviceID: id})
			}
		}()
	}
	wg.Wait()
	want := map[string]Twin{}
	for i := range devices {
		id := fmt.Sprintf("d%d", i)
		tw, err := s.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		if tw.Version != 1+2*changes || tw.Properties.Desired["$version"] != int64(1+changes) || tw.Properties.Reported["$version"] != int64(1+changes) {
			t.Fatalf("%s: version %d desired %v reported %v", id, tw.Version, tw.Properties.Desired["$version"], tw.Properties.Reported["$version"])
		}
		vs := n.byID[id]
		for k := range vs {
			if vs[k] != int64(k+2) {
				t.Fatalf("%s: notifications out of order: %v", id, vs)
			}
		}
		want[id] = tw
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := reg.Close(); err != nil {
		t.Fatal(err)
	}
	reg2, s2 := open(t, path)
	defer reg2.Close()
	defer s2.Close()
	for id, w := range want {
		got, err := s2.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		a, _ := json.Marshal(got.Properties)
		b, _ := json.Marshal(w.Properties)
		if string(a) != string(b) || got.ETag != w.ETag {
			t.Fatalf("%s after reopen:\n%s\nwant\n%s", id, a, b)
		}
	}
}

func TestMatchETag(t *testing.T) {
	e := ETag(7)
	if e != "AAAAAAAAAAc=" {
		t.Fatalf("ETag(7) = %s", e)
	}
	for _, m := range []string{"", "*", `"*"`, e, `"` + e + `"`} {
		if !matchETag(m, e) {
			t.Errorf("%q does not match", m)
		}
	}
	for _, m := range []string{`"AAAAAAAAAAg="`, `""`, `"` + e} {
		if matchETag(m, e) {
			t.Errorf("%q matches", m)
		}
	}
}

// The identity fields of a twin are the registry device's, as the device document renders them:
// status reason, thumbprints (null when unset) and capabilities, for a sas and a self-signed
// edge device.
func TestTwinIdentityFieldsAreTheDevices(t *testing.T) {
	reg, s := open(t, filepath.Join(t.TempDir(), "db"))
	defer func() { _ = s.Close(); _ = reg.Close() }()
	for _, d := range []registry.Device{
		{DeviceID: "sas-1"},
		{DeviceID: "edge-1", Status: registry.StatusDisabled, StatusReason: "maintenance", Capabilities: registry.Capabilities{IoTEdge: true},
			Authentication: registry.Authentication{Type: registry.AuthSelfSigned, X509Thumbprint: registry.X509Thumbprint{PrimaryThumbprint: "ABABABABABABABABABABABABABABABABABABABAB"}}},
	} {
		created, err := reg.Create(d)
		if err != nil {
			t.Fatal(err)
		}
		tw, err := s.Get(d.DeviceID)
		if err != nil {
			t.Fatal(err)
		}
		var dev, twin map[string]any
		b, _ := json.Marshal(created)
		_ = json.Unmarshal(b, &dev)
		b, _ = json.Marshal(tw)
		_ = json.Unmarshal(b, &twin)
		auth := dev["authentication"].(map[string]any)
		for _, c := range []struct {
			field     string
			got, want any
		}{
			{"deviceEtag", twin["deviceEtag"], dev["etag"]},
			{"statusReason", twin["statusReason"], dev["statusReason"]},
			{"authenticationType", twin["authenticationType"], auth["type"]},
			{"x509Thumbprint", twin["x509Thumbprint"], auth["x509Thumbprint"]},
			{"capabilities", twin["capabilities"], dev["capabilities"]},
		} {
			if fmt.Sprint(c.got) != fmt.Sprint(c.want) {
				t.Errorf("%s: twin %s is %v, the device's %v", d.DeviceID, c.field, c.got, c.want)
			}
		}
	}
}
