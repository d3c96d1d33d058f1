package methods

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"time"
)

// Script is a direct method described in configuration, for developers who test cloud code
// against a fake device. Exactly one of Payload, Echo and Command gives the answer's payload
// (none: no payload); Delay and FailureRate shape when and how it answers.
type Script struct {
	// Status is the answer's status when the call succeeds (default 200).
	Status int `yaml:"status" json:"status,omitempty"`
	// Payload is a static answer payload (any YAML value; sent as JSON).
	Payload any `yaml:"payload" json:"payload,omitempty"`
	// Echo answers with the request's payload.
	Echo bool `yaml:"echo" json:"echo,omitempty"`
	// Command runs a program (argv, no shell) with the request payload on stdin and the method
	// name and request ID in $IOTHUBBY_METHOD and $IOTHUBBY_RID; its stdout, which must be JSON
	// (or empty), is the payload. A non-zero exit answers FailureStatus with stderr's last line.
	Command []string `yaml:"command" json:"command,omitempty"`
	// Delay waits before answering. A delay past the call's deadline means no answer, which is
	// how to make the caller see a timeout.
	Delay time.Duration `yaml:"delay" json:"delay,omitempty"`
	// FailureRate is the probability (0 to 1) that a call fails with FailureStatus.
	FailureRate float64 `yaml:"failureRate" json:"failureRate,omitempty"`
	// FailureStatus is the status of a failed call (default 500).
	FailureStatus int `yaml:"failureStatus" json:"failureStatus,omitempty"`
}

// maxOutput bounds what a scripted command may print.
const maxOutput = MaxPayload

// Handler checks the script and returns its handler. random returns a float in [0, 1); nil uses
// math/rand/v2.
func (s Script) Handler(random func() float64) (Handler, error) {
	set := 0
	if s.Payload != nil {
		set++
	}
	if s.Echo {
		set++
	}
	if len(s.Command) > 0 {
		set++
	}
	if set > 1 {
		return nil, errors.New("methods: a script takes at most one of payload, echo and command")
	}
	if s.Status == 0 {
		s.Status = 200
	}
	if s.FailureStatus == 0 {
		s.FailureStatus = StatusInternalError
	}
	if s.Status < 100 || s.Status > 999 || s.FailureStatus < 100 || s.FailureStatus > 999 {
		return nil, errors.New("methods: status must be a three-digit number")
	}
	if s.FailureRate < 0 || s.FailureRate > 1 {
		return nil, fmt.Errorf("methods: failureRate %v is not between 0 and 1", s.FailureRate)
	}
	if s.Delay < 0 {
		return nil, errors.New("methods: negative delay")
	}
	var static []byte
	if s.Payload != nil {
		var err error
		if static, err = json.Marshal(jsonable(s.Payload)); err != nil {
			return nil, fmt.Errorf("methods: payload: %w", err)
		}
	}
	if len(s.Command) > 0 {
		if _, err := exec.LookPath(s.Command[0]); err != nil {
			return nil, fmt.Errorf("methods: command: %w", err)
		}
	}
	if random == nil {
		random = rand.Float64
	}
	return HandlerFunc(func(ctx context.Context, req *Request) Response {
		if s.Delay > 0 {
			t := time.NewTimer(s.Delay)
			defer t.Stop()
			select {
			case <-t.C:
			case <-ctx.Done():
				return Response{Status: StatusInternalError} // past the deadline: not sent
			}
		}
		if s.FailureRate > 0 && random() < s.FailureRate {
			return Response{Status: s.FailureStatus, Payload: errorBody("injected failure")}
		}
		switch {
		case static != nil:
			return Response{Status: s.Status, Payload: static}
		case s.Echo:
			return Response{Status: s.Status, Payload: req.Payload}
		case len(s.Command) > 0:
			return s.runCommand(ctx, req)
		}
		return Response{Status: s.Status}
	}), nil
}

func (s Script) runCommand(ctx context.Context, req *Request) Response {
	cmd := exec.CommandContext(ctx, s.Command[0], s.Command[1:]...)
	cmd.Stdin = bytes.NewReader(req.Payload)
	cmd.Env = append(os.Environ(), "IOTHUBBY_METHOD="+req.Name, "IOTHUBBY_RID="+req.RequestID)
	var stdout, stderr limitedBuffer
	stdout.limit, stderr.limit = maxOutput, 4096
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	if ctx.Err() != nil {
		return Response{Status: StatusInternalError} // past the deadline: not sent
	}
	if err != nil {
		return Response{Status: s.FailureStatus, Payload: errorBody("command failed: %v: %s", err, lastLine(stderr.String()))}
	}
	if stdout.overflow {
		return Response{Status: StatusInternalError, Payload: errorBody("command output over %d bytes", maxOutput)}
	}
	out := bytes.TrimSpace(stdout.Bytes())
	if len(out) > 0 && !json.Valid(out) {
		return Response{Status: StatusInternalError, Payload: errorBody("command output is not JSON")}
	}
	return Response{Status: s.Status, Payload: out}
}

// limitedBuffer keeps the first limit bytes written to it and remembers whether there were
// more. It deliberately has no ReadFrom, so io.Copy goes through Write.
type limitedBuffer struct {
	buf      bytes.Buffer
	limit    int
	overflow bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.limit - b.buf.Len(); len(p) > room {
		b.overflow = true
		if room > 0 {
			b.buf.Write(p[:room])
		}
		return len(p), nil
	}
	return b.buf.Write(p)
}

func (b *limitedBuffer) Bytes() []byte  { return b.buf.Bytes() }
func (b *limitedBuffer) String() string { return b.buf.String() }

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return clip(s)
}

// jsonable turns what yaml.v3 decodes (map[string]any, and map[any]any from some documents)
// into values encoding/json accepts.
func jsonable(v any) any {
	switch x := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = jsonable(e)
		}
		return out
	case map[any]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[fmt.Sprint(k)] = jsonable(e)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = jsonable(e)
		}
		return out
	}
	return v
}
