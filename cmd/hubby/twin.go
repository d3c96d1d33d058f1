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
	tw := &cobra.Command{Use: "twin", Short: "Read and change device twins"}

	get := &cobra.Command{
		Use:   "get DEVICE_ID",
		Short: "Show a device twin (-o json for the whole document)",
		Args:  cobra.ExactArgs(1),
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

	var patch, file, etag string
	var desired, tags []string
	body := func() (map[string]any, error) {
		var doc map[string]any
		switch {
		case patch != "" && file != "":
			return nil, fmt.Errorf("give --patch or --file, not both")
		case patch != "" || file != "":
			b := []byte(patch)
			if file != "" {
				var err error
				if file == "-" {
					b, err = io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
				} else {
					b, err = os.ReadFile(file)
				}
				if err != nil {
					return nil, err
				}
			}
			d, err := twin.Decode(b)
			if err != nil {
				return nil, fmt.Errorf("patch: %w", err)
			}
			doc = d
		default:
			doc = map[string]any{}
		}
		set := func(section []string, kvs []string) error {
			for _, kv := range kvs {
				k, v, ok := strings.Cut(kv, "=")
				if !ok || k == "" {
					return fmt.Errorf("%q: want KEY=JSON (e.g. interval=5, mode='\"eco\"', gone=null)", kv)
				}
				val, err := twin.Decode([]byte(`{"v":` + v + `}`))
				if err != nil {
					// a bare word is a string
					val = map[string]any{"v": v}
				}
				m := doc
				for _, s := range section {
					n, ok := m[s].(map[string]any)
					if !ok {
						n = map[string]any{}
						m[s] = n
					}
					m = n
				}
				parts := strings.Split(k, ".")
				for _, p := range parts[:len(parts)-1] {
					n, ok := m[p].(map[string]any)
					if !ok {
						n = map[string]any{}
						m[p] = n
					}
					m = n
				}
				m[parts[len(parts)-1]] = val["v"]
			}
			return nil
		}
		if err := set([]string{"properties", "desired"}, desired); err != nil {
			return nil, err
		}
		if err := set([]string{"tags"}, tags); err != nil {
			return nil, err
		}
		if len(doc) == 0 {
			return nil, fmt.Errorf("nothing to change: give --patch, --file, --desired or --tag")
		}
		return doc, nil
	}
	change := func(replace bool) func(cmd *cobra.Command, args []string) error {
		return func(cmd *cobra.Command, args []string) error {
			doc, err := body()
			if err != nil {
				return err
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
		Args:  cobra.ExactArgs(1),
		RunE:  change(false),
	}
	replace := &cobra.Command{
		Use:   "replace DEVICE_ID",
		Short: "Replace a twin's tags and desired properties wholesale",
		Args:  cobra.ExactArgs(1),
		RunE:  change(true),
	}
	for _, c := range []*cobra.Command{update, replace} {
		f := c.Flags()
		f.StringVar(&patch, "patch", "", `JSON: {"tags":{...},"properties":{"desired":{...}}}`)
		f.StringVar(&file, "file", "", "file with the JSON patch (- for stdin)")
		f.StringArrayVar(&desired, "desired", nil, "KEY=JSON desired property (dots for nesting; repeatable)")
		f.StringArrayVar(&tags, "tag", nil, "KEY=JSON tag (dots for nesting; repeatable)")
		f.StringVar(&etag, "etag", "", "change only if the twin's etag matches (default: unconditional)")
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
