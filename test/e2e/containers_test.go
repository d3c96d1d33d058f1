//go:build e2e

package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/iothubby/iothubby/pkg/hubsim/endpoints"
)

// No container runtime is available where the tests run, so the images are checked as far as
// that allows: each Dockerfile is read and its promises checked (a static build, a final
// stage with no shell, a non-root user, the binary the build made is the one the entry point
// runs), and the image's own command line is run on the binary built here.

// dockerfile is what the checks need of a Dockerfile: the build stage's RUN lines and the final
// stage's instructions.
type dockerfile struct {
	runs       []string // RUN lines of every stage
	final      string   // the last FROM's image
	user       string
	copies     []string // COPY lines of the final stage
	entrypoint []string
	cmd        []string
}

func readDockerfile(t *testing.T, path string) dockerfile {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var d dockerfile
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		instr, rest, _ := strings.Cut(line, " ")
		rest = strings.TrimSpace(rest)
		switch strings.ToUpper(instr) {
		case "FROM":
			d.final, _, _ = strings.Cut(rest, " ")
			d.user, d.copies, d.entrypoint, d.cmd = "", nil, nil, nil
		case "RUN":
			d.runs = append(d.runs, rest)
		case "USER":
			d.user = rest
		case "COPY":
			d.copies = append(d.copies, rest)
		case "ENTRYPOINT", "CMD":
			var args []string
			if err := json.Unmarshal([]byte(rest), &args); err != nil {
				t.Fatalf("%s: %s %s is not the exec (JSON) form, which needs no shell: %v", path, instr, rest, err)
			}
			if strings.ToUpper(instr) == "CMD" {
				d.cmd = args
			} else {
				d.entrypoint = args
			}
		}
	}
	return d
}

// checkImage checks the promises every image of ours makes and returns the image's command line
// (entry point and CMD) with the program named by its base name.
func checkImage(t *testing.T, path, program string) []string {
	t.Helper()
	d := readDockerfile(t, path)
	build := regexp.MustCompile(`CGO_ENABLED=0 go build .*-o (\S+) \./cmd/` + program + `\b`)
	var out string
	for _, r := range d.runs {
		if m := build.FindStringSubmatch(r); m != nil {
			out = m[1]
		}
	}
	if out == "" {
		t.Fatalf("%s: no RUN builds ./cmd/%s with CGO_ENABLED=0 (a static binary for a distroless image)", path, program)
	}
	if !strings.HasPrefix(d.final, "gcr.io/distroless/static") {
		t.Errorf("%s: the final stage is %q, want distroless static (no shell, no libc)", path, d.final)
	}
	if u, _, _ := strings.Cut(d.user, ":"); u == "" || u == "root" || u == "0" {
		t.Errorf("%s: USER %q, want a non-root user", path, d.user)
	}
	if len(d.entrypoint) == 0 {
		t.Fatalf("%s: no ENTRYPOINT", path)
	}
	copied := false
	for _, c := range d.copies {
		f := strings.Fields(c)
		if len(f) >= 3 && strings.HasPrefix(f[0], "--from=") && f[len(f)-2] == out && f[len(f)-1] == d.entrypoint[0] {
			copied = true
		}
	}
	if !copied {
		t.Errorf("%s: the entry point %s is not the binary the build stage made (%s)", path, d.entrypoint[0], out)
	}
	if filepath.Base(d.entrypoint[0]) != program {
		t.Errorf("%s: entry point %s, want the %s binary", path, d.entrypoint[0], program)
	}
	return append(append([]string{program}, d.entrypoint[1:]...), d.cmd...)
}

func TestHubsimImage(t *testing.T) {
	args := checkImage(t, filepath.Join("..", "..", "deploy", "docker", "hubsim.Dockerfile"), "hubsim")
	// Run the image's own command line on the binary built here, with the container's paths and
	// wildcard addresses swapped for a temporary folder and free loopback ports, and the AMQP
	// listener moved off its fixed port (tests run beside each other).
	state := t.TempDir()
	mqtt, https := freeAddr(t), freeAddr(t)
	var run []string
	for _, a := range args[1:] {
		switch {
		case a == "/state":
			a = state
		case strings.HasPrefix(a, "0.0.0.0:8883"):
			a = mqtt
		case strings.HasPrefix(a, "0.0.0.0:8443"):
			a = https
		case strings.HasPrefix(a, "0.0.0.0:"):
			t.Fatalf("the image listens on %s, which this test does not know how to move", a)
		}
		run = append(run, a)
	}
	if run[0] != "serve" {
		t.Fatalf("the image runs hubsim %v, want serve", run)
	}
	p := startProc(t, "hubsim", append(run, "--amqp-addr", "127.0.0.1:0")...)
	var ep endpoints.Endpoints
	eventually(t, "hubsim, started as the image starts it, writes endpoints.json", func() error {
		var err error
		ep, err = endpoints.Read(state)
		return err
	})
	if ep.MQTTAddress != mqtt || ep.HTTPSAddress != https {
		t.Errorf("hubsim listens on MQTT %s and HTTPS %s, want the image's ports (here %s and %s)", ep.MQTTAddress, ep.HTTPSAddress, mqtt, https)
	}
	if err := p.stop(); err != nil {
		t.Errorf("hubsim stopped with %v, want a clean exit", err)
	}
}

func TestAgentImage(t *testing.T) {
	args := checkImage(t, filepath.Join("..", "..", "Dockerfile"), "agent")
	// The image's command (agent fleet --config FILE) must parse: a file that does not exist is
	// then the error, with the configuration exit status, not an unknown command or flag.
	missing := filepath.Join(t.TempDir(), "fleet.yaml")
	var run []string
	for _, a := range args[1:] {
		if strings.HasSuffix(a, ".yaml") {
			a = missing
		}
		run = append(run, a)
	}
	p := startProc(t, "agent", run...)
	err := p.waitExit()
	if code := exitCode(err); code != 2 {
		t.Fatalf("agent %v exited %v (code %d), want 2 for the missing configuration", run, err, code)
	}
	p.mu.Lock()
	out := strings.Join(p.raw, "\n")
	p.mu.Unlock()
	if !strings.Contains(out, missing) {
		t.Errorf("agent %v said %q, want the missing file named", run, out)
	}
}
