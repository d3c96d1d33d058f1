package hygiene

import (
	"bufio"
	"bytes"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// depRule forbids a package (and everything it links) from depending on some imports.
type depRule struct {
	pkg       string   // a go list pattern naming one package, relative to the module root
	forbidden []string // import paths; a path also forbids everything under it ("x" forbids "x/y")
	why       string
}

var depRules = []depRule{
	{
		pkg:       "./cmd/hubsim",
		forbidden: []string{"github.com/eclipse/paho.mqtt.golang", "github.com/iothubby/iothubby/pkg/hub"},
		why:       "hubsim is the server side: it shares pure codecs and twin rules with the agent, never the agent's MQTT client",
	},
	{
		pkg:       "./pkg/twin",
		forbidden: []string{"net", "github.com/iothubby/iothubby/pkg/hub", "github.com/eclipse/paho.mqtt.golang", "go.uber.org/zap"},
		why:       "pkg/twin holds the pure document rules shared with hubsim; the agent's sync with its I/O is pkg/twinsync",
	},
}

// importGraph runs `go list -deps` for pattern and returns each linked package's imports.
func importGraph(t *testing.T, root, pattern string) map[string][]string {
	t.Helper()
	out := goList(t, root, "-deps", "-f", "{{.ImportPath}}{{range .Imports}} {{.}}{{end}}", pattern)
	g := map[string][]string{}
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) > 0 {
			g[f[0]] = f[1:]
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return g
}

// goList runs go list in the module root and returns its trimmed output.
func goList(t *testing.T, root string, args ...string) string {
	t.Helper()
	cmd := exec.Command("go", append([]string{"list"}, args...)...)
	cmd.Dir = root
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

// importChain returns the shortest import chain from start to a package that forbidden matches,
// or nil when there is none.
func importChain(g map[string][]string, start string, forbidden func(string) bool) []string {
	prev := map[string]string{start: ""}
	queue := []string{start}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if forbidden(p) {
			var chain []string
			for ; p != ""; p = prev[p] {
				chain = append(chain, p)
			}
			slices.Reverse(chain)
			return chain
		}
		imps := slices.Clone(g[p])
		slices.Sort(imps) // deterministic chains
		for _, q := range imps {
			if _, seen := prev[q]; !seen {
				prev[q] = p
				queue = append(queue, q)
			}
		}
	}
	return nil
}

func matcher(forbidden []string) func(string) bool {
	return func(p string) bool {
		for _, f := range forbidden {
			if p == f || strings.HasPrefix(p, f+"/") {
				return true
			}
		}
		return false
	}
}

// The dependency rules of the house, checked on what `go list -deps` says is linked (test files
// excluded): a failure names the import chain that brings the forbidden package in.
func TestDependencyRules(t *testing.T) {
	root := moduleRoot(t)
	for _, r := range depRules {
		t.Run(strings.TrimPrefix(r.pkg, "./"), func(t *testing.T) {
			g := importGraph(t, root, r.pkg)
			start := goList(t, root, "-f", "{{.ImportPath}}", r.pkg)
			if _, ok := g[start]; !ok {
				t.Fatalf("go list -deps %s does not list %q", r.pkg, start)
			}
			if len(g) < 10 {
				t.Fatalf("go list -deps %s listed only %d packages", r.pkg, len(g))
			}
			for _, f := range r.forbidden {
				if chain := importChain(g, start, matcher([]string{f})); chain != nil {
					t.Errorf("%s must not depend on %s (%s); import chain:\n\t%s",
						start, chain[len(chain)-1], r.why, strings.Join(chain, "\n\t-> "))
				}
			}
		})
	}
}

// The chain search itself: it finds the shortest chain, through prefixes, and reports none
// when the forbidden package is absent.
func TestImportChain(t *testing.T) {
	g := map[string][]string{
		"m/cmd/hubsim":                        {"fmt", "m/pkg/hubsim/twins"},
		"m/pkg/hubsim/twins":                  {"m/pkg/twin", "m/pkg/wire"},
		"m/pkg/twin":                          {"m/pkg/hub", "fmt"},
		"m/pkg/hub":                           {"github.com/eclipse/paho.mqtt.golang"},
		"m/pkg/wire":                          {"fmt"},
		"github.com/eclipse/paho.mqtt.golang": {"github.com/eclipse/paho.mqtt.golang/packets"},
		"github.com/eclipse/paho.mqtt.golang/packets": {"fmt"},
		"fmt": nil,
	}
	got := importChain(g, "m/cmd/hubsim", matcher([]string{"github.com/eclipse/paho.mqtt.golang"}))
	want := []string{"m/cmd/hubsim", "m/pkg/hubsim/twins", "m/pkg/twin", "m/pkg/hub", "github.com/eclipse/paho.mqtt.golang"}
	if !slices.Equal(got, want) {
		t.Fatalf("chain %v, want %v", got, want)
	}
	if got := importChain(g, "m/cmd/hubsim", matcher([]string{"github.com/eclipse/paho.mqtt.golang/packets"})); len(got) != 6 {
		t.Fatalf("chain to a subpackage %v", got)
	}
	if got := importChain(g, "m/pkg/wire", matcher([]string{"github.com/eclipse/paho.mqtt.golang"})); got != nil {
		t.Fatalf("chain where there is none: %v", got)
	}
}
