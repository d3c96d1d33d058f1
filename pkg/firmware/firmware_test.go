package firmware

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const wait = 20 * time.Second

var seed = bytes.Repeat([]byte{0x42}, ed25519.SeedSize)

func image(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}

func manifestFor(data []byte, version, url string) Manifest {
	sum := sha256.Sum256(data)
	return Manifest{Version: version, URL: url, Size: int64(len(data)), SHA256: hex.EncodeToString(sum[:])}.Sign(ed25519.NewKeyFromSeed(seed))
}

// imageServer serves one image with Range support. hold, when set, makes the first request
// stop after half the image until the request is cancelled.
type imageServer struct {
	*httptest.Server
	data      []byte
	hold      bool
	requests  atomic.Int32
	served    atomic.Int64
	ranges    chan string
	halfSent  chan struct{}
	extra     int // bytes sent beyond the image
	status    int // answer this status instead
	heldFirst atomic.Bool
}

func newImageServer(t *testing.T, data []byte) *imageServer {
	s := &imageServer{data: data, ranges: make(chan string, 16), halfSent: make(chan struct{})}
	s.Server = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		s.ranges <- r.Header.Get("Range")
		if s.status != 0 {
			w.WriteHeader(s.status)
			return
		}
		if s.hold && s.heldFirst.CompareAndSwap(false, true) {
			half := len(s.data) / 2
			w.Header().Set("Content-Length", strconv.Itoa(len(s.data)))
			w.WriteHeader(200)
			n, _ := w.Write(s.data[:half])
			s.served.Add(int64(n))
			w.(http.Flusher).Flush()
			close(s.halfSent)
			<-r.Context().Done()
			return
		}
		body := append(append([]byte(nil), s.data...), bytes.Repeat([]byte{1}, s.extra)...)
		cw := &countWriter{ResponseWriter: w, n: &s.served}
		http.ServeContent(cw, r, "image.bin", time.Unix(0, 0), bytes.NewReader(body))
	}))
	t.Cleanup(s.Close)
	return s
}

type countWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	c.n.Add(int64(n))
	return n, err
}

// reporter records statuses and signals each; fail makes it refuse (offline), signalling the
// attempt on refused instead.
type reporter struct {
	mu      sync.Mutex
	all     []Status
	ch      chan Status
	refused chan Status
	fail    atomic.Bool
}

func newReporter() *reporter {
	return &reporter{ch: make(chan Status, 256), refused: make(chan Status, 256)}
}

func (r *reporter) Report(_ context.Context, s Status) error {
	if r.fail.Load() {
		r.refused <- s
		return errors.New("offline")
	}
	r.mu.Lock()
	r.all = append(r.all, s)
	r.mu.Unlock()
	r.ch <- s
	return nil
}

func (r *reporter) await(t *testing.T, pred func(Status) bool) Status {
	t.Helper()
	deadline := time.After(wait)
	for {
		select {
		case s := <-r.ch:
			if pred(s) {
				return s
			}
		case <-deadline:
			t.Fatal("status not reported in time")
		}
	}
}

func (r *reporter) states() []State {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []State
	for _, s := range r.all {
		if len(out) == 0 || out[len(out)-1] != s.State {
			out = append(out, s.State)
		}
	}
	return out
}

// applier records what it applied, checking the image it gets is the verified one.
type applier struct {
	mu    sync.Mutex
	calls []string
	want  []byte
	block bool
}

func (a *applier) Apply(ctx context.Context, img string, m Manifest, slot string) error {
	got, err := os.ReadFile(img)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.calls = append(a.calls, slot)
	a.mu.Unlock()
	if a.want != nil && !bytes.Equal(got, a.want) {
		return errors.New("applier got an image that is not the verified one")
	}
	if a.block {
		<-ctx.Done()
		return ctx.Err()
	}
	return nil
}

func (a *applier) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.calls)
}

type env struct {
	dir    string
	srv    *imageServer
	rep    *reporter
	app    *applier
	reboot RebootFunc
}

func (e *env) updater(t *testing.T, mod func(*Config)) *Updater {
	t.Helper()
	cfg := Config{Dir: e.dir, InitialVersion: "1.0.0", PublicKey: ed25519.NewKeyFromSeed(seed).Public().(ed25519.PublicKey),
		HTTPClient: e.srv.Client(), Applier: e.app, Rebooter: e.reboot, Reporter: e.rep, RetryDelay: time.Millisecond}
	if mod != nil {
		mod(&cfg)
	}
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// run starts u.Run and returns a stop function that cancels it and waits.
func run(u *Updater) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = u.Run(ctx) }()
	return func() { cancel(); <-done }
}

func newEnv(t *testing.T, data []byte) *env {
	return &env{dir: t.TempDir(), srv: newImageServer(t, data), rep: newReporter(), app: &applier{want: data},
		reboot: func(context.Context) error { return nil }}
}

func TestUpdateToCurrent(t *testing.T) {
	data := image(300_000)
	e := newEnv(t, data)
	u := e.updater(t, nil)
	stop := run(u)
	defer stop()
	if err := u.Start(manifestFor(data, "1.1.0", e.srv.URL+"/fw")); err != nil {
		t.Fatal(err)
	}
	s := e.rep.await(t, func(s Status) bool { return s.State.final() })
	if s.State != Current || s.Version != "1.1.0" {
		t.Fatalf("final status %+v", s)
	}
	want := []State{Downloading, Verifying, Applying, Rebooting, Current}
	if got := e.rep.states(); strings.Join(stateStrings(got), ",") != strings.Join(stateStrings(want), ",") {
		t.Fatalf("reported stages %v, want %v", got, want)
	}
	if e.app.calls[0] != "b" {
		t.Fatalf("applied to slot %v", e.app.calls)
	}
	stop()
	// The new version and slot survive a restart.
	u2 := e.updater(t, nil)
	if st := u2.Status(); st.Version != "1.1.0" || st.State != Current {
		t.Fatalf("after restart: %+v", st)
	}
	if err := u2.Start(manifestFor(data, "1.1.0", e.srv.URL+"/fw")); err != nil {
		t.Fatalf("same version again: %v", err)
	}
	if u2.Status().State != Current {
		t.Fatal("installing the running version started an update")
	}
}

func stateStrings(s []State) []string {
	out := make([]string, len(s))
	for i, x := range s {
		out[i] = string(x)
	}
	return out
}

func TestHashMismatchKeepsOldVersion(t *testing.T) {
	data := image(50_000)
	e := newEnv(t, data)
	u := e.updater(t, nil)
	stop := run(u)
	defer stop()
	m := manifestFor(image(50_001)[:50_000], "2.0.0", e.srv.URL+"/fw")
	sum := sha256.Sum256([]byte("something else"))
	m.SHA256 = hex.EncodeToString(sum[:])
	m = m.Sign(ed25519.NewKeyFromSeed(seed))
	if err := u.Start(m); err != nil {
		t.Fatal(err)
	}
	s := e.rep.await(t, func(s Status) bool { return s.State.final() })
	if s.State != Failed || s.Version != "1.0.0" || !strings.Contains(s.Error, "sha256") {
		t.Fatalf("status %+v", s)
	}
	if e.app.count() != 0 {
		t.Fatal("an unverified image was applied")
	}
	if _, err := os.Stat(filepath.Join(e.dir, "slot-b", "image.bin")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the bad image was kept: %v", err)
	}
}

func TestStartRefusals(t *testing.T) {
	data := image(1000)
	e := newEnv(t, data)
	u := e.updater(t, nil)
	good := manifestFor(data, "1.2.0", e.srv.URL+"/fw")
	tampered := good
	tampered.Version = "9.9.9"
	unsigned := good
	unsigned.Signature = ""
	if err := u.Start(tampered); !errors.Is(err, ErrManifest) {
		t.Errorf("relabelled manifest: %v", err)
	}
	if err := u.Start(unsigned); !errors.Is(err, ErrManifest) {
		t.Errorf("unsigned manifest with a key configured: %v", err)
	}
	if err := u.Start(manifestFor(data, "0.9.0", e.srv.URL+"/fw")); !errors.Is(err, ErrDowngrade) {
		t.Errorf("downgrade: %v", err)
	}
	if err := u.Start(manifestFor(data, "1.2.0", strings.Replace(e.srv.URL, "https", "http", 1)+"/fw")); !errors.Is(err, ErrManifest) {
		t.Errorf("plain http: %v", err)
	}
	if err := u.Start(good); err != nil {
		t.Fatal(err)
	}
	if err := u.Start(good); err != nil {
		t.Errorf("the same manifest again: %v", err)
	}
	if err := u.Start(manifestFor(data, "1.3.0", e.srv.URL+"/fw")); !errors.Is(err, ErrBusy) {
		t.Errorf("a second update while one is pending: %v", err)
	}
	d := e.updater(t, func(c *Config) { c.AllowDowngrade = true; c.Dir = t.TempDir() })
	if err := d.Start(manifestFor(data, "0.9.0", e.srv.URL+"/fw")); err != nil {
		t.Errorf("downgrade allowed: %v", err)
	}
}

// The agent is stopped halfway through the download; the next run resumes with a Range request
// and completes without fetching the image twice.
func TestResumeDownloadAfterRestart(t *testing.T) {
	data := image(2_000_000)
	e := newEnv(t, data)
	e.srv.hold = true
	u := e.updater(t, nil)
	stop := run(u)
	if err := u.Start(manifestFor(data, "1.5.0", e.srv.URL+"/fw")); err != nil {
		t.Fatal(err)
	}
	<-e.srv.halfSent
	e.rep.await(t, func(s Status) bool { return s.State == Downloading && s.Percent >= 40 })
	stop()
	if st := e.updater(t, nil).Status(); st.State != Downloading {
		t.Fatalf("persisted state after the stop: %+v", st)
	}
	<-e.srv.ranges // the first request had no Range
	u2 := e.updater(t, nil)
	stop2 := run(u2)
	defer stop2()
	s := e.rep.await(t, func(s Status) bool { return s.State.final() })
	if s.State != Current || s.Version != "1.5.0" {
		t.Fatalf("after resume: %+v", s)
	}
	if r := <-e.srv.ranges; !strings.HasPrefix(r, "bytes=") || r == "bytes=0-" {
		t.Fatalf("resume request Range %q", r)
	}
	if served := e.srv.served.Load(); served > int64(len(data))*3/2 {
		t.Fatalf("served %d bytes for a %d-byte image: not resumed", served, len(data))
	}
}

// Stopped while applying: the next run verifies the image again, finds it tampered with, and
// fails without applying it.
func TestInterruptedApplyIsReverified(t *testing.T) {
	data := image(100_000)
	e := newEnv(t, data)
	e.app.block = true
	u := e.updater(t, nil)
	stop := run(u)
	if err := u.Start(manifestFor(data, "3.0.0", e.srv.URL+"/fw")); err != nil {
		t.Fatal(err)
	}
	e.rep.await(t, func(s Status) bool { return s.State == Applying })
	stop()
	img := filepath.Join(e.dir, "slot-b", "image.bin")
	if err := os.WriteFile(img, image(100_000)[:99_999], 0o600); err != nil {
		t.Fatal(err)
	}
	e.app = &applier{want: data}
	u2 := e.updater(t, nil)
	stop2 := run(u2)
	defer stop2()
	s := e.rep.await(t, func(s Status) bool { return s.State.final() })
	if s.State != Failed || s.Version != "1.0.0" {
		t.Fatalf("status %+v", s)
	}
	if e.app.count() != 0 {
		t.Fatal("the tampered image was applied")
	}
}

// A real reboot ends the process in Rebooting; the next start confirms, or fails if the device
// came back on the old version.
func TestRebootConfirmation(t *testing.T) {
	for _, tc := range []struct {
		running string
		want    State
		version string
	}{{"4.0.0", Current, "4.0.0"}, {"1.0.0", Failed, "1.0.0"}} {
		data := image(10_000)
		e := newEnv(t, data)
		e.reboot = func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
		u := e.updater(t, nil)
		stop := run(u)
		if err := u.Start(manifestFor(data, "4.0.0", e.srv.URL+"/fw")); err != nil {
			t.Fatal(err)
		}
		e.rep.await(t, func(s Status) bool { return s.State == Rebooting })
		stop()
		u2 := e.updater(t, func(c *Config) { c.RunningVersion = func() (string, error) { return tc.running, nil } })
		stop2 := run(u2)
		s := e.rep.await(t, func(s Status) bool { return s.State.final() })
		stop2()
		if s.State != tc.want || s.Version != tc.version {
			t.Fatalf("running %s after reboot: %+v (states %v)", tc.running, s, e.rep.states())
		}
	}
}

// A result that could not be reported while offline is sent on the next ReportPending, also
// after a restart.
func TestUnreportedResultIsResent(t *testing.T) {
	data := image(10_000)
	e := newEnv(t, data)
	e.rep.fail.Store(true)
	u := e.updater(t, nil)
	stop := run(u)
	if err := u.Start(manifestFor(data, "1.0.1", e.srv.URL+"/fw")); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(wait)
	for finished := false; !finished; {
		select {
		case s := <-e.rep.refused:
			finished = s.State == Current
		case <-deadline:
			t.Fatal("update did not finish")
		}
	}
	stop()
	e.rep.fail.Store(false)
	u2 := e.updater(t, nil)
	u2.ReportPending(context.Background())
	s := e.rep.await(t, func(Status) bool { return true })
	if s.State != Current || s.Version != "1.0.1" {
		t.Fatalf("re-sent status %+v", s)
	}
	u3 := e.updater(t, nil)
	u3.ReportPending(context.Background())
	select {
	case s := <-e.rep.ch:
		t.Fatalf("delivered status sent again: %+v", s)
	default:
	}
}

func TestDownloadFailures(t *testing.T) {
	data := image(10_000)
	e := newEnv(t, data)
	e.srv.extra = 10
	u := e.updater(t, nil)
	stop := run(u)
	if err := u.Start(manifestFor(data, "1.0.2", e.srv.URL+"/fw")); err != nil {
		t.Fatal(err)
	}
	s := e.rep.await(t, func(s Status) bool { return s.State.final() })
	stop()
	if s.State != Failed || !strings.Contains(s.Error, "larger") {
		t.Fatalf("oversize image: %+v", s)
	}

	e2 := newEnv(t, data)
	e2.srv.status = http.StatusNotFound
	u2 := e2.updater(t, nil)
	stop2 := run(u2)
	defer stop2()
	if err := u2.Start(manifestFor(data, "1.0.2", e2.srv.URL+"/fw")); err != nil {
		t.Fatal(err)
	}
	s = e2.rep.await(t, func(s Status) bool { return s.State.final() })
	if s.State != Failed || !strings.Contains(s.Error, "404") || e2.srv.requests.Load() != 1 {
		t.Fatalf("404: %+v after %d requests", s, e2.srv.requests.Load())
	}
}

func TestCompareVersions(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{{"1.0.0", "1.0.0", 0}, {"1.2", "1.10", -1}, {"v2.0", "1.9.9", 1}, {"1.2", "1.2.1", -1}, {"1.2.rc1", "1.2.rc2", -1}} {
		if got := CompareVersions(c.a, c.b); got != c.want {
			t.Errorf("CompareVersions(%s, %s) = %d", c.a, c.b, got)
		}
	}
}

func FuzzParseManifest(f *testing.F) {
	f.Add([]byte(`{"version":"1.0","url":"https://h/x","size":10,"sha256":"` + strings.Repeat("ab", 32) + `"}`))
	f.Add([]byte(`{"version":"","url":"ftp://h","size":-1}`))
	f.Add([]byte(`{"version":"1","url":"https://h","size":1,"sha256":"zz","signature":"!!"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseManifest(b, false)
		if err != nil {
			return
		}
		if m.Size <= 0 || m.Size > MaxImageSize || len(m.SHA256) != 64 || !strings.HasPrefix(m.URL, "https") {
			t.Fatalf("accepted %+v", m)
		}
	})
}

// state.json is written outside the updater's lock: with Start's write stuck on the disk,
// Status (which the agent's method and twin paths call) still answers.
func TestStateWriteDoesNotHoldStatus(t *testing.T) {
	data := image(1000)
	e := newEnv(t, data)
	entered, release := make(chan struct{}, 4), make(chan struct{})
	u := e.updater(t, func(c *Config) {
		c.WriteFile = func(path string, b []byte) error {
			entered <- struct{}{}
			<-release
			return os.WriteFile(path, b, 0o600)
		}
	})
	started := make(chan error, 1)
	go func() { started <- u.Start(manifestFor(data, "1.0.1", e.srv.URL+"/fw")) }()
	select {
	case <-entered:
	case <-time.After(wait):
		t.Fatal("Start did not write its state")
	}
	got := make(chan Status, 1)
	go func() { got <- u.Status() }()
	select {
	case s := <-got:
		if s.State != Downloading || s.TargetVersion != "1.0.1" {
			t.Fatalf("status during the write %+v", s)
		}
	case <-time.After(wait):
		t.Fatal("Status blocked behind the state write")
	}
	close(release)
	if err := <-started; err != nil {
		t.Fatal(err)
	}
}

// A state write that fails is never dropped: Start refuses the update (it would not survive a
// restart) and keeps the old state, and a failure to record a delivered status is logged.
func TestStateWriteErrors(t *testing.T) {
	data := image(1000)
	e := newEnv(t, data)
	var failing atomic.Bool
	failing.Store(true)
	// from the reboot on, writes fail: the confirmation's and the delivered status's
	e.reboot = func(context.Context) error { failing.Store(true); return nil }
	core, logs := observer.New(zap.ErrorLevel)
	u := e.updater(t, func(c *Config) {
		c.Logger = zap.New(core)
		c.WriteFile = func(path string, b []byte) error {
			if failing.Load() {
				return errors.New("disk full")
			}
			return os.WriteFile(path, b, 0o600)
		}
	})
	err := u.Start(manifestFor(data, "1.0.1", e.srv.URL+"/fw"))
	if !errors.Is(err, ErrNotPersisted) || !strings.Contains(err.Error(), "disk full") || !strings.Contains(err.Error(), stateFile) {
		t.Fatalf("Start with an unwritable state: %v", err)
	}
	if s := u.Status(); s.State != Current || s.Version != "1.0.0" || s.TargetVersion != "" {
		t.Fatalf("refused update left state %+v", s)
	}
	// The update goes through once the disk takes writes; then recording that the final status
	// was delivered fails, and that is logged.
	failing.Store(false)
	stop := run(u)
	defer stop()
	if err := u.Start(manifestFor(data, "1.0.1", e.srv.URL+"/fw")); err != nil {
		t.Fatal(err)
	}
	s := e.rep.await(t, func(s Status) bool { return s.State.final() })
	stop()
	if s.State != Current {
		t.Fatalf("final status %+v", s)
	}
	if n := logs.FilterMessageSnippet("firmware state not saved").Len(); n == 0 {
		t.Fatalf("failed writes not logged; logs: %v", logs.All())
	}
}
