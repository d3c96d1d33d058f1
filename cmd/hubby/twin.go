package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/twin"
)

func twinCommand(g *globals) *cobra.Command {
	tw := &cobra.Command{Use: "twin", Aliases: []string{"twins", "device-twin"}, Short: "Read and change device twins (az iot hub device-twin)"}

	get := &cobra.Command{
		Use:     "show DEVICE_ID",
		Aliases: []string{"get"},
		Short:   "Show a device twin (-o json for the whole document)",
		Args:    exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				t, err := c.GetTwin(ctx, args[0])
				if err != nil {
					return err
				}
				return g.printTwin(t)
			})
		},
	}

	var pf patchFlags
	var etag string
	change := func(replace bool) func(cmd *cobra.Command, args []string) error {
		return func(cmd *cobra.Command, args []string) error {
			doc, err := pf.doc()
			if err != nil {
				return usageError{err}
			}
			return g.with(cmd, func(ctx context.Context, c *service.Client) error {
				var t service.Twin
				if replace {
					t, err = c.ReplaceTwin(ctx, args[0], doc, etag)
				} else {
					t, err = c.UpdateTwin(ctx, args[0], doc, etag)
				}
				if err != nil {
					return err
				}
				return g.printTwin(t)
			})
		}
	}
	update := &cobra.Command{
		Use:   "update DEVICE_ID",
		Short: "Merge tags and desired properties into a twin (null deletes)",
		Args:  exactArgs(1),
		RunE:  change(false),
	}
	replace := &cobra.Command{
		Use:   "replace DEVICE_ID",
		Short: "Replace a twin's tags and desired properties wholesale",
		Args:  exactArgs(1),
		RunE:  change(true),
	}
	for _, c := range []*cobra.Command{update, replace} {
		pf.register(c)
		c.Flags().StringVar(&etag, "etag", "", "change only if the twin's etag matches (default: unconditional)")
	}
	tw.AddCommand(get, update, replace)
	return tw
}

func (g *globals) printTwin(t service.Twin) error {
	if g.output == "json" {
		return g.printJSON(t)
	}
	w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "DEVICE\tETAG\tVERSION\tDESIRED $version\tREPORTED $version\tSTATE")
	fmt.Fprintf(w, "%s\t%s\t%d\t%v\t%v\t%s\n", t.DeviceID, t.ETag, t.Version,
		t.Properties.Desired["$version"], t.Properties.Reported["$version"], t.ConnectionState)
	if err := w.Flush(); err != nil {
		return err
	}
	for _, s := range []struct {
		name string
		m    map[string]any
	}{{"tags", t.Tags}, {"desired", strip(t.Properties.Desired)}, {"reported", strip(t.Properties.Reported)}} {
		b, _ := json.Marshal(s.m)
		fmt.Fprintf(g.stdout, "%-9s %s\n", s.name+":", b)
	}
	return nil
}

func strip(m map[string]any) map[string]any {
	out := map[string]any{}
	for k, v := range m {
		if !strings.HasPrefix(k, "$") {
			out[k] = v
		}
	}
	return out
}

// decodePatch decodes a twin patch, which must be a JSON object.
func decodePatch(b []byte) (map[string]any, error) {
	var probe any
	if err := json.Unmarshal(b, &probe); err != nil {
		return nil, fmt.Errorf("patch is not valid JSON: %v", err)
	}
	if _, ok := probe.(map[string]any); !ok {
		return nil, fmt.Errorf("patch must be a JSON object, not %s", jsonKind(probe))
	}
	d, err := twin.Decode(b)
	if err != nil {
		return nil, fmt.Errorf("patch: %w", err)
	}
	return d, nil
}

func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case []any:
		return "an array"
	case string:
		return "a string"
	case float64:
		return "a number"
	case bool:
		return "a boolean"
	}
	return "an object"
}

// patchFlags are the flags that build a twin patch: --patch/--file and --desired/--tag.
type patchFlags struct {
	patch, file   string
	desired, tags []string
}

func (p *patchFlags) register(c *cobra.Command) {
	f := c.Flags()
	f.StringVar(&p.patch, "patch", "", `JSON object: {"tags":{...},"properties":{"desired":{...}}}`)
	f.StringVar(&p.file, "file", "", "file with the JSON patch (- for stdin)")
	f.StringArrayVar(&p.desired, "desired", nil, "KEY=JSON desired property (dots for nesting; repeatable)")
	f.StringArrayVar(&p.tags, "tag", nil, "KEY=JSON tag (dots for nesting; repeatable)")
}

// doc builds the patch; it is never empty.
func (p *patchFlags) doc() (map[string]any, error) {
	var doc map[string]any
	switch {
	case p.patch != "" && p.file != "":
		return nil, fmt.Errorf("give --patch or --file, not both")
	case p.patch != "" || p.file != "":
		b := []byte(p.patch)
		if p.file != "" {
			var err error
			if p.file == "-" {
				b, err = io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
			} else {
				b, err = readFileLimited(p.file, 1<<20)
			}
			if err != nil {
				return nil, err
			}
		}
		d, err := decodePatch(b)
		if err != nil {
			return nil, err
		}
		doc = d
	default:
		doc = map[string]any{}
	}
	if err := setPaths(doc, []string{"properties", "desired"}, p.desired); err != nil {
		return nil, err
	}
	if err := setPaths(doc, []string{"tags"}, p.tags); err != nil {
		return nil, err
	}
	if len(doc) == 0 {
		return nil, fmt.Errorf("nothing to change: give --patch, --file, --desired or --tag")
	}
	return doc, nil
}

// setPaths sets KEY=JSON pairs (dotted keys nest) under section of doc. A value that is not
// JSON is a string.
func setPaths(doc map[string]any, section []string, kvs []string) error {
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return fmt.Errorf("%q: want KEY=JSON (e.g. interval=5, mode='\"eco\"', gone=null)", kv)
		}
		val, err := twin.Decode([]byte(`{"v":` + v + `}`))
		if err != nil {
			val = map[string]any{"v": v} // a bare word is a string
		}
		m := doc
		for _, s := range section {
			m = child(m, s)
		}
		parts := strings.Split(k, ".")
		for _, p := range parts[:len(parts)-1] {
			m = child(m, p)
		}
		m[parts[len(parts)-1]] = val["v"]
	}
	return nil
}

func child(m map[string]any, k string) map[string]any {
	n, ok := m[k].(map[string]any)
	if !ok {
		n = map[string]any{}
		m[k] = n
	}
	return n
}

// readFileLimited reads a file of at most limit bytes.
func readFileLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, limit)
	}
	return b, nil
}
