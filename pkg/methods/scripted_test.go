package methods

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

func call(t *testing.T, s Script, random func() float64, payload string, timeout time.Duration) Response {
	t.Helper()
	h, err := s.Handler(random)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return h.Handle(ctx, &Request{Name: "m", RequestID: "7", Payload: json.RawMessage(payload)})
}

func TestScriptsFromYAML(t *testing.T) {
	var scripts map[string]Script
	err := yaml.Unmarshal([]byte(`
status:   {status: 202, payload: {state: accepted, steps: [1, 2], nested: {a: true}}}
echo:     {echo: true}
empty:    {}
flaky:    {failureRate: 1, failureStatus: 503, payload: ok}
delayed:  {delay: 10ms, status: 200}
`), &scripts)
	if err != nil {
		t.Fatal(err)
	}
	never := func() float64 { return 0.99 }
	check := func(name, in string, status int, want string) {
		t.Helper()
		r := call(t, scripts[name], never, in, 5*time.Second)
		if r.Status != status || string(r.Payload) != want && !strings.Contains(string(r.Payload), want) {
			t.Errorf("%s: got %d %s, want %d %s", name, r.Status, r.Payload, status, want)
		}
	}
	check("status", `{}`, 202, `{"nested":{"a":true},"state":"accepted","steps":[1,2]}`)
	check("echo", `{"x":[1]}`, 200, `{"x":[1]}`)
	check("empty", `{}`, 200, ``)
	check("flaky", `{}`, 503, `injected failure`)
	check("delayed", `{}`, 200, ``)

	// failureRate 0.5 with a random source below and above it.
	half := Script{FailureRate: 0.5, Echo: true}
	if r := call(t, half, func() float64 { return 0.4 }, `1`, time.Second); r.Status != 500 {
		t.Errorf("0.4 < 0.5 should fail: %d", r.Status)
	}
	if r := call(t, half, func() float64 { return 0.6 }, `1`, time.Second); r.Status != 200 || string(r.Payload) != "1" {
		t.Errorf("0.6 >= 0.5 should succeed: %d %s", r.Status, r.Payload)
	}
}

func TestScriptDelayPastDeadline(t *testing.T) {
	rec := newRecorder()
	d := New(Config{Timeouts: map[string]time.Duration{"slow": 20 * time.Millisecond}}, rec.respond)
	h, err := Script{Delay: time.Hour}.Handler(nil)
	if err != nil {
		t.Fatal(err)
	}
	d.Register("slow", h)
	d.Dispatch("slow", "s1", nil)
	d.Close()
	if n := rec.count("s1"); n != 0 {
		t.Fatalf("answered %d times past the deadline", n)
	}
}

func TestScriptCommand(t *testing.T) {
	sh := func(script string) Script { return Script{Command: []string{"sh", "-c", script}} }
	r := call(t, sh(`read -r p; printf '{"got":%s,"method":"%s","rid":"%s"}' "$p" "$IOTHUBBY_METHOD" "$IOTHUBBY_RID"`), nil, `{"a":1}`, 10*time.Second)
	if r.Status != 200 || string(r.Payload) != `{"got":{"a":1},"method":"m","rid":"7"}` {
		t.Fatalf("command: %d %s", r.Status, r.Payload)
	}
	r = call(t, sh(`echo not json`), nil, `{}`, 10*time.Second)
	if r.Status != 500 || !strings.Contains(string(r.Payload), "not JSON") {
		t.Fatalf("non-JSON output: %d %s", r.Status, r.Payload)
	}
	r = call(t, sh(`echo first >&2; echo disk full >&2; exit 3`), nil, `{}`, 10*time.Second)
	if r.Status != 500 || !strings.Contains(string(r.Payload), "disk full") {
		t.Fatalf("failing command: %d %s", r.Status, r.Payload)
	}
	r = call(t, sh(`head -c 200000 /dev/zero | tr '\0' 'a'`), nil, `{}`, 10*time.Second)
	if r.Status != 500 || !strings.Contains(string(r.Payload), "over") {
		t.Fatalf("oversize output: %d %s", r.Status, r.Payload)
	}
	// A command still running at the deadline is killed and the call ends without a payload
	// (the dispatcher then sends nothing).
	r = call(t, sh(`sleep 30`), nil, `{}`, 100*time.Millisecond)
	if r.Status != 500 || len(r.Payload) != 0 {
		t.Fatalf("command past its deadline: %d %s", r.Status, r.Payload)
	}
}

func TestScriptErrors(t *testing.T) {
	for name, s := range map[string]Script{
		"two sources":   {Echo: true, Payload: "x"},
		"bad rate":      {FailureRate: 2},
		"bad status":    {Status: 42},
		"negative wait": {Delay: -time.Second},
		"no program":    {Command: []string{"/nonexistent/program"}},
	} {
		if _, err := s.Handler(nil); err == nil {
			t.Errorf("%s accepted", name)
		}
	}
}
