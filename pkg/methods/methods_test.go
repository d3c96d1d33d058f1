package methods

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type answer struct {
	rid     string
	status  int
	payload string
}

// recorder is a Responder that keeps every answer and signals each one.
type recorder struct {
	mu  sync.Mutex
	all []answer
	ch  chan answer
}

func newRecorder() *recorder { return &recorder{ch: make(chan answer, 64)} }

func (r *recorder) respond(_ context.Context, rid string, status int, payload []byte) error {
	a := answer{rid, status, string(payload)}
	r.mu.Lock()
	r.all = append(r.all, a)
	r.mu.Unlock()
	r.ch <- a
	return nil
}

func (r *recorder) next(t *testing.T) answer {
	t.Helper()
	select {
	case a := <-r.ch:
		return a
	case <-time.After(10 * time.Second):
		t.Fatal("no answer")
		return answer{}
	}
}

func (r *recorder) count(rid string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, a := range r.all {
		if a.rid == rid {
			n++
		}
	}
	return n
}

func echo() Handler {
	return HandlerFunc(func(_ context.Context, req *Request) Response {
		return Response{Status: 200, Payload: req.Payload}
	})
}

func TestAnswers(t *testing.T) {
	rec := newRecorder()
	d := New(Config{}, rec.respond)
	defer d.Close()
	d.Register("echo", echo())
	d.Register("boom", HandlerFunc(func(context.Context, *Request) Response { panic("kaboom") }))
	d.Register("badjson", HandlerFunc(func(context.Context, *Request) Response { return Response{Status: 200, Payload: []byte("{")} }))
	d.Register("empty", HandlerFunc(func(context.Context, *Request) Response { return Response{Status: 204} }))

	cases := []struct {
		name, payload string
		status        int
		body          string
	}{
		{"echo", `{"a":[1,{"b":null}]}`, 200, `{"a":[1,{"b":null}]}`},
		{"echo", ``, 200, `null`},
		{"nope", `{}`, 501, `"method \"nope\" is not implemented"`},
		{"echo", `{"a":1,"a":2}`, 400, `duplicate key`},
		{"boom", `{}`, 500, `the handler failed`},
		{"badjson", `{}`, 500, `invalid payload`},
		{"empty", `{}`, 204, ``},
		{"echo", `{"after":"panic"}`, 200, `{"after":"panic"}`},
	}
	for i, c := range cases {
		rid := fmt.Sprint(i)
		d.Dispatch(c.name, rid, []byte(c.payload))
		a := rec.next(t)
		if a.rid != rid || a.status != c.status || !strings.Contains(a.payload, c.body) {
			t.Errorf("%s(%s): got %+v, want %d %s", c.name, c.payload, a, c.status, c.body)
		}
		if c.body == "" && a.payload != "" {
			t.Errorf("%s: payload %q, want none", c.name, a.payload)
		}
	}
}

// A handler that overruns its deadline is not answered at all, and its context ends.
func TestOverrunIsNotAnswered(t *testing.T) {
	rec := newRecorder()
	ended := make(chan struct{})
	d := New(Config{Timeouts: map[string]time.Duration{"hang": 20 * time.Millisecond}}, rec.respond)
	d.Register("hang", HandlerFunc(func(ctx context.Context, _ *Request) Response {
		<-ctx.Done()
		close(ended)
		return Response{Status: 200}
	}))
	d.Dispatch("hang", "r1", nil)
	<-ended
	d.Close() // waits for the call's goroutine, so any answer would be recorded by now
	if n := rec.count("r1"); n != 0 {
		t.Fatalf("overrun call answered %d times", n)
	}
}

func TestConcurrencyBound(t *testing.T) {
	rec := newRecorder()
	release := make(chan struct{})
	started := make(chan struct{}, 2)
	d := New(Config{MaxConcurrent: 2}, rec.respond)
	d.Register("slow", HandlerFunc(func(ctx context.Context, _ *Request) Response {
		started <- struct{}{}
		<-release
		return Response{Status: 200}
	}))
	d.Dispatch("slow", "a", nil)
	d.Dispatch("slow", "b", nil)
	<-started
	<-started
	d.Dispatch("slow", "c", nil)
	if a := rec.next(t); a.rid != "c" || a.status != StatusTooManyRequests {
		t.Fatalf("third call: %+v", a)
	}
	close(release)
	got := map[string]int{}
	for range 2 {
		a := rec.next(t)
		got[a.rid] = a.status
	}
	if got["a"] != 200 || got["b"] != 200 {
		t.Fatalf("answers %v", got)
	}
	d.Close()
}

func TestCloseCancelsHandlersAndStopsDispatch(t *testing.T) {
	rec := newRecorder()
	d := New(Config{}, rec.respond)
	running := make(chan struct{})
	d.Register("wait", HandlerFunc(func(ctx context.Context, _ *Request) Response {
		close(running)
		<-ctx.Done()
		return Response{Status: 200}
	}))
	d.Dispatch("wait", "w", nil)
	<-running
	d.Close()
	d.Dispatch("wait", "after", nil)
	if rec.count("after") != 0 {
		t.Fatal("a call after Close was answered")
	}
}

func TestValidatePayload(t *testing.T) {
	deep := func(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }
	ok := []string{"", "  ", "null", "1", `"s"`, `{}`, `[1,2,2]`, deep(MaxDepth), `{"a":{"a":1},"b":{"a":2}}`, `[{"a":1},{"a":1}]`, `{"a":[{"b":1,"c":2}],"b":3}`}
	for _, p := range ok {
		if err := ValidatePayload([]byte(p), 0, 0); err != nil {
			t.Errorf("%q refused: %v", p, err)
		}
	}
	bad := map[string]string{
		"too deep":        deep(MaxDepth + 1),
		"duplicate":       `{"a":1,"b":2,"a":3}`,
		"nested dup":      `{"x":[{"k":1,"k":1}]}`,
		"dup after child": `{"a":{"z":1},"a":2}`,
		"two values":      `{} {}`,
		"malformed":       `{"a":`,
		"trailing comma":  `[1,]`,
		"invalid utf-8":   "\"\xff\"",
		"too big":         `"` + strings.Repeat("x", MaxPayload) + `"`,
		"bare word":       `hello`,
	}
	for name, p := range bad {
		if err := ValidatePayload([]byte(p), 0, 0); err == nil {
			t.Errorf("%s: %q accepted", name, clip(p))
		}
	}
}

// FuzzValidatePayload: never panics, and whatever it accepts is JSON encoding/json can decode.
func FuzzValidatePayload(f *testing.F) {
	for _, s := range []string{"", "null", `{"a":[1,{"b":2}]}`, `{"a":1,"a":2}`, "[[[[[[[[[[[]]]]]]]]]]]", `{} {}`, "\"\xff\""} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if ValidatePayload(b, 0, 0) != nil || len(strings.TrimSpace(string(b))) == 0 {
			return
		}
		var v any
		if err := json.Unmarshal(b, &v); err != nil {
			t.Fatalf("accepted %q that encoding/json refuses: %v", b, err)
		}
	})
}

// Then runs after the answer is out, never before it (a reboot must follow its 200).
func TestThenRunsAfterTheAnswer(t *testing.T) {
	rec := newRecorder()
	d := New(Config{}, rec.respond)
	defer d.Close()
	done := make(chan int, 1)
	d.Register("reboot", HandlerFunc(func(context.Context, *Request) Response {
		return Response{Status: 200, Then: func(err error) {
			if err != nil {
				t.Errorf("send error %v", err)
			}
			done <- rec.count("r1")
		}}
	}))
	d.Dispatch("reboot", "r1", nil)
	select {
	case n := <-done:
		if n != 1 {
			t.Fatalf("Then ran with %d answers sent, want 1", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Then did not run")
	}
}

// With the connection gone (every answer waits until its context ends, as an answer waiting for
// a reconnect does), refusals never hold the caller of Dispatch, the session's delivery
// goroutine: a burst of unknown, invalid and over-limit calls returns at once, the refusals
// queued beyond MaxQueuedRefusals are dropped rather than kept, and Close ends the wait.
func TestRefusalsNeverBlockDispatch(t *testing.T) {
	waiting := make(chan string, 2*MaxQueuedRefusals)
	gone := func(ctx context.Context, rid string, _ int, _ []byte) error {
		waiting <- rid
		<-ctx.Done()
		return ctx.Err()
	}
	d := New(Config{MaxConcurrent: 1}, gone)
	block := make(chan struct{})
	defer close(block)
	d.Register("slow", HandlerFunc(func(ctx context.Context, _ *Request) Response {
		select {
		case <-block:
		case <-ctx.Done():
		}
		return Response{Status: 200}
	}))
	d.Dispatch("slow", "s0", nil) // takes the only slot: further slow calls get 429
	burst := make(chan struct{})
	go func() {
		defer close(burst)
		for i := range 3 * MaxQueuedRefusals {
			switch i % 3 {
			case 0:
				d.Dispatch("nope", fmt.Sprint("n", i), nil)
			case 1:
				d.Dispatch("slow", fmt.Sprint("b", i), []byte(`{"a":1,"a":2}`))
			default:
				d.Dispatch("slow", fmt.Sprint("t", i), nil)
			}
		}
	}()
	select {
	case <-burst:
	case <-time.After(10 * time.Second):
		t.Fatal("Dispatch blocked on sending a refusal over a lost connection")
	}
	// the first refusal is being sent (and waits); the rest are queued, at most the limit
	select {
	case rid := <-waiting:
		if rid != "n0" {
			t.Fatalf("first refusal sent is %s, want n0", rid)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no refusal sent")
	}
	d.mu.RLock()
	queued := len(d.refusals)
	d.mu.RUnlock()
	if queued > MaxQueuedRefusals {
		t.Fatalf("%d refusals queued, limit %d", queued, MaxQueuedRefusals)
	}
	closed := make(chan struct{})
	go func() { d.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not end the refusals' wait")
	}
}

// With RespondNow (hub.Session.RespondMethodAsync), refusals are sent from Dispatch itself,
// before it returns, and never through the blocking Responder: no goroutine, no queue.
func TestRefusalsThroughRespondNow(t *testing.T) {
	var now []answer
	blocking := func(_ context.Context, rid string, _ int, _ []byte) error {
		if rid != "s0" { // the handler's own answer goes this way; refusals must not
			t.Errorf("refusal %s went through the blocking Responder", rid)
		}
		return nil
	}
	d := New(Config{MaxConcurrent: 1, RespondNow: func(rid string, status int, payload []byte) error {
		now = append(now, answer{rid, status, string(payload)})
		return nil
	}}, blocking)
	defer d.Close()
	block := make(chan struct{})
	defer close(block)
	d.Register("slow", HandlerFunc(func(ctx context.Context, _ *Request) Response {
		select {
		case <-block:
		case <-ctx.Done():
		}
		return Response{Status: 200}
	}))
	d.Dispatch("slow", "s0", nil)
	d.Dispatch("nope", "n1", nil)
	d.Dispatch("slow", "b1", []byte(`{"a":1,"a":2}`))
	d.Dispatch("slow", "t1", nil)
	got := fmt.Sprint(now)
	if len(now) != 3 || now[0].rid != "n1" || now[0].status != 501 || now[1].rid != "b1" || now[1].status != 400 ||
		now[2].rid != "t1" || now[2].status != 429 {
		t.Fatalf("refusals sent by Dispatch: %s", got)
	}
	d.mu.RLock()
	refusing := d.refusing
	d.mu.RUnlock()
	if refusing {
		t.Fatal("a refusal sender goroutine was started")
	}
}
