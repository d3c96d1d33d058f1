package fleet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/clock"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Shards 0/2 and 1/2 (and other splits) cover the fleet's indexes exactly once.
func TestShardsCoverOnce(t *testing.T) {
	for _, n := range []int{1, 2, 3, 7, 300, 100001} {
		for _, k := range []int{1, 2, 3, 10} {
			if k > n {
				continue
			}
			seen := make([]int, n)
			next := 0
			for s := range k {
				lo, hi := Shard(n, s, k)
				if lo != next {
					t.Fatalf("n=%d k=%d shard %d starts at %d, want %d (contiguous)", n, k, s, lo, next)
				}
				if hi-lo < n/k || hi-lo > n/k+1 {
					t.Fatalf("n=%d k=%d shard %d has %d devices", n, k, s, hi-lo)
				}
				for i := lo; i < hi; i++ {
					seen[i]++
				}
				next = hi
			}
			for i, c := range seen {
				if c != 1 {
					t.Fatalf("n=%d k=%d: index %d covered %d times", n, k, i, c)
				}
			}
		}
	}
}

// The profile depends only on seed, index and weights; shares follow the weights; a weight of
// 0 gets no devices.
func TestAssignProfile(t *testing.T) {
	w := []int{3, 0, 1}
	count := [3]int{}
	for i := range 40000 {
		p := AssignProfile(7, i, w)
		if p != AssignProfile(7, i, w) {
			t.Fatal("not deterministic")
		}
		count[p]++
	}
	if count[1] != 0 {
		t.Fatalf("a profile of weight 0 got %d devices", count[1])
	}
	if share := float64(count[0]) / 40000; share < 0.73 || share > 0.77 {
		t.Fatalf("weight 3 of 4 got share %.3f", share)
	}
	diff := 0
	for i := range 1000 {
		if AssignProfile(7, i, w) != AssignProfile(8, i, w) {
			diff++
		}
	}
	if diff == 0 {
		t.Fatal("the seed changes nothing")
	}
}

// The limiter lets a burst through at once, then one per 1/rate, on the injected clock.
func TestLimiter(t *testing.T) {
	clk := clock.NewFake(time.Unix(1000, 0))
	l := NewLimiter(clk, 10, 3)
	ctx := context.Background()
	for range 3 {
		if err := l.Wait(ctx); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- l.Wait(ctx) }()
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := clk.WaitTimer(wctx, time.Unix(1000, 0).Add(100*time.Millisecond)); err != nil {
		t.Fatalf("the fourth waiter did not wait for 1/rate: %v (armed %v)", err, clk.Armed())
	}
	select {
	case err := <-done:
		t.Fatalf("the fourth connection passed before its token: %v", err)
	default:
	}
	clk.Advance(100 * time.Millisecond)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// A waiter that gives up returns its token.
	cctx, ccancel := context.WithCancel(ctx)
	go func() { done <- l.Wait(cctx) }()
	if err := clk.WaitArmed(wctx, 1); err != nil {
		t.Fatal(err)
	}
	ccancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait = %v", err)
	}
	clk.Advance(100 * time.Millisecond)
	if err := l.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(clk.Armed()); n != 0 {
		t.Fatalf("a token returned by a cancelled waiter was lost (%d timers armed)", n)
	}
}

// configs/fleet.yaml is a valid fleet file; an unknown field is an error.
func TestExampleFile(t *testing.T) {
	c, err := Load("../../configs/fleet.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Count != 300 || len(c.Profiles) != 2 || c.Profiles[0].Methods["ping"].Status != 200 {
		t.Fatalf("parsed %+v", c)
	}
	if _, err := c.withDefaults(); err != nil {
		t.Fatal(err)
	}
	if _, err := Parse([]byte("count: 1\nprofiles:\n  - name: a\n    weight: 1\n    telemtry: {}\n")); err == nil || !strings.Contains(err.Error(), "telemtry") {
		t.Fatalf("unknown field in a profile: %v", err)
	}
}

// Bad input: clear configuration errors, and nothing created (no state directory).
func TestPrepareBadInput(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "group.key")
	if err := os.WriteFile(key, []byte("8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(dir, "state")
	base := func() Config {
		return Config{Count: 10, StateDir: state, DPS: DPSConfig{IDScope: "0ne00000001", GlobalEndpoint: "127.0.0.1:1", GroupKeyFile: key}}
	}
	cases := []struct {
		name   string
		mod    func(*Config)
		opts   Options
		reason string
	}{
		{"count 0", func(c *Config) { c.Count = 0 }, Options{}, "count must be at least 1"},
		{"above the open-file limit", func(c *Config) { c.Count = 1000 }, Options{NoFileLimit: 1024}, "open-file limit"},
		{"duplicate IDs", func(c *Config) { c.IDPattern = `d{{if lt .Index 5}}{{.Index}}{{end}}` }, Options{}, `same ID "d" to indexes 5 and 6`},
		{"missing group key", func(c *Config) { c.DPS.GroupKeyFile = "" }, Options{}, "key is missing"},
		{"unreadable group key", func(c *Config) { c.DPS.GroupKeyFile = filepath.Join(dir, "nope") }, Options{}, "dps.groupKeyFile"},
		{"weights sum to 0", func(c *Config) { c.Profiles = []Profile{{Name: "a"}, {Name: "b"}} }, Options{}, "weights sum to 0"},
		{"two identity sources", func(c *Config) { c.ConnectionStringsFile = key }, Options{}, "exactly one identity source"},
		{"bad shard", func(*Config) {}, Options{ShardIndex: 2, ShardCount: 2}, "shard index"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := base()
			tc.mod(&c)
			f, err := Prepare(context.Background(), c, tc.opts)
			if err == nil {
				f.Close()
				t.Fatal("no error")
			}
			if !errors.Is(err, agent.ErrConfig) || !strings.Contains(err.Error(), tc.reason) {
				t.Fatalf("error %q, want a configuration error saying %q", err, tc.reason)
			}
			if _, err := os.Stat(state); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("state directory exists after a refused start: %v", err)
			}
		})
	}
}

// A valid shard prepares every device with its index, ID and profile, writing only state
// directories; nothing connects before Run.
func TestPrepareShard(t *testing.T) {
	dir := t.TempDir()
	c := Config{Count: 10, Seed: 3, StateDir: dir, DPS: DPSConfig{IDScope: "0ne00000001", GlobalEndpoint: "127.0.0.1:1",
		GroupKey: "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="},
		Profiles: []Profile{{Name: "a", Weight: 1}, {Name: "b", Weight: 1}}}
	f, err := Prepare(context.Background(), c, Options{ShardIndex: 1, ShardCount: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	devs := f.Devices()
	if len(devs) != 5 || devs[0].Index != 5 || devs[0].ID != "sim-00005" || devs[4].ID != "sim-00009" {
		t.Fatalf("shard 1/2 of 10: %+v", devs)
	}
	for _, d := range devs {
		if want := []string{"a", "b"}[AssignProfile(3, d.Index, []int{1, 1})]; d.Profile != want {
			t.Fatalf("device %d profile %s, want %s", d.Index, d.Profile, want)
		}
	}
	if s := f.Summary(); s.Devices != 5 || s.Connected != 0 || s.Telemetry.Sent != 0 {
		t.Fatalf("summary before Run: %+v", s)
	}
}

// recorder is a next observer that also observes twin round trips and connect attempts.
type recorder struct {
	agent.NopObserver
	twin     []string
	attempts []string
}

func (r *recorder) TwinRequest(device, op string, _ time.Duration, _ error) {
	r.twin = append(r.twin, device+" "+op)
}
func (r *recorder) ConnectAttempt(device string, _ time.Time) {
	r.attempts = append(r.attempts, device)
}

// The fleet's counters sit between the devices and the metrics: the optional twin and connect
// observations must reach the metrics too (the fleet's histograms were empty without this).
func TestCountersForwardOptionalObservations(t *testing.T) {
	r := &recorder{}
	var o agent.Observer = newCounters([]string{"a"}, r, newConnectSlots(1, 1), false)
	to, ok := o.(agent.TwinObserver)
	if !ok {
		t.Fatal("counters do not implement agent.TwinObserver")
	}
	co, ok := o.(agent.ConnectObserver)
	if !ok {
		t.Fatal("counters do not implement agent.ConnectObserver")
	}
	to.TwinRequest("a", "get", time.Millisecond, nil)
	co.ConnectAttempt("a", time.Now())
	if len(r.twin) != 1 || r.twin[0] != "a get" || len(r.attempts) != 1 || r.attempts[0] != "a" {
		t.Fatalf("next saw twin %v, attempts %v; want [a get], [a]", r.twin, r.attempts)
	}
	// A next without the extensions is fine.
	plain := newCounters([]string{"a"}, agent.NopObserver{}, newConnectSlots(1, 1), false)
	plain.TwinRequest("a", "get", 0, nil)
	plain.ConnectAttempt("a", time.Now())
}

// Without DPS a device holds one connection: 100 connection-string devices fit a limit of 200
// (100 + 64) that 100 DPS devices (2 x 100 + 64) do not.
func TestOpenFileBudgetByIdentity(t *testing.T) {
	dir := t.TempDir()
	var cs strings.Builder
	for i := range 100 {
		fmt.Fprintf(&cs, "HostName=h.example;DeviceId=d%03d;SharedAccessKey=8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==\n", i)
	}
	file := filepath.Join(dir, "devices.cs")
	if err := os.WriteFile(file, []byte(cs.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := Prepare(context.Background(), Config{StateDir: filepath.Join(dir, "cs"), ConnectionStringsFile: file}, Options{NoFileLimit: 200})
	if err != nil {
		t.Fatalf("100 connection-string devices with an open-file limit of 200: %v", err)
	}
	if len(f.Devices()) != 100 {
		t.Fatalf("%d devices, want 100", len(f.Devices()))
	}
	f.Close()
	key := filepath.Join(dir, "group.key")
	if err := os.WriteFile(key, []byte("8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Prepare(context.Background(), Config{Count: 100, StateDir: filepath.Join(dir, "dps"),
		DPS: DPSConfig{IDScope: "0ne00000001", GlobalEndpoint: "127.0.0.1:1", GroupKeyFile: key}}, Options{NoFileLimit: 200})
	if err == nil || !strings.Contains(err.Error(), "need about 264 open files") {
		t.Fatalf("100 DPS devices with a limit of 200: got %v, want a refusal naming 264 files", err)
	}
}

func TestParseRefusesASecondDocument(t *testing.T) {
	_, err := Parse([]byte("count: 1\n---\ncount: 2\n"))
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "second YAML document starts at line 2") {
		t.Fatalf("Parse of two documents = %v, want ErrConfig naming the second document's line", err)
	}
}
