package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/iothubby/iothubby/pkg/service"
)

// queryCommand is `hubby query` (az iot hub query).
func queryCommand(g *globals) *cobra.Command {
	var top, pageSize int
	c := &cobra.Command{
		Use:   "query SQL",
		Short: "Run an IoT Hub query (SELECT ... FROM devices | devices.jobs) and print every row",
		Long: `Run an IoT Hub query, following continuation tokens, and print the rows: with -o json an
array of the rows as the hub sent them; as a table, twins as DEVICE/STATUS/CONNECTION/TAGS and
other rows (projections, COUNT() ... GROUP BY, devices.jobs) with one column per field.
A query the hub cannot parse fails with the hub's message.`,
		Example: `  hubby query "SELECT * FROM devices WHERE tags.site = 'lab'"
  hubby query "SELECT COUNT() AS n, properties.reported.fw FROM devices GROUP BY properties.reported.fw" -o json`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if top < 0 || pageSize < 0 || pageSize > service.MaxQueryPageSize {
				return usageError{fmt.Errorf("--top must not be negative and --page-size must be 0 to %d", service.MaxQueryPageSize)}
			}
			return g.withLong(cmd, func(ctx context.Context, c *service.Client) error {
				var rows []json.RawMessage
				errTop := errors.New("top reached")
				err := c.QueryAll(ctx, args[0], pageSize, func(m json.RawMessage) error {
					rows = append(rows, m)
					if top > 0 && len(rows) >= top {
						return errTop
					}
					return nil
				})
				if err != nil && !errors.Is(err, errTop) {
					return fmt.Errorf("query: %w", err)
				}
				return g.printRows(rows)
			})
		},
	}
	c.Flags().IntVar(&top, "top", 0, "at most this many rows (0: all)")
	c.Flags().IntVar(&pageSize, "page-size", 100, "rows per request (x-ms-max-item-count, at most 100)")
	return c
}

// printRows prints query rows.
func (g *globals) printRows(rows []json.RawMessage) error {
	if g.output == "json" {
		if rows == nil {
			rows = []json.RawMessage{}
		}
		return g.printJSON(rows)
	}
	var objs []map[string]any
	twins := true
	for _, r := range rows {
		var m map[string]any
		if json.Unmarshal(r, &m) != nil {
			// not an object: print the rows as they are
			for _, r := range rows {
				fmt.Fprintln(g.stdout, compact(r))
			}
			return nil
		}
		_, hasProps := m["properties"]
		_, hasID := m["deviceId"]
		twins = twins && hasProps && hasID
		objs = append(objs, m)
	}
	if len(objs) == 0 {
		fmt.Fprintln(g.stdout, "(no rows)")
		return nil
	}
	if twins {
		out := make([][]string, 0, len(objs))
		for _, m := range objs {
			tags := "{}"
			if t, ok := m["tags"]; ok && t != nil {
				b, _ := json.Marshal(t)
				tags = string(b)
			}
			out = append(out, []string{str(m["deviceId"]), str(m["status"]), strings.ToLower(str(m["connectionState"])), tags})
		}
		return g.table([]string{"DEVICE", "STATUS", "CONNECTION", "TAGS"}, out)
	}
	keys := map[string]bool{}
	for _, m := range objs {
		for k := range m {
			keys[k] = true
		}
	}
	cols := make([]string, 0, len(keys))
	for k := range keys {
		cols = append(cols, k)
	}
	sort.Slice(cols, func(i, j int) bool {
		if (cols[i] == "deviceId") != (cols[j] == "deviceId") {
			return cols[i] == "deviceId"
		}
		return cols[i] < cols[j]
	})
	out := make([][]string, 0, len(objs))
	for _, m := range objs {
		row := make([]string, len(cols))
		for i, k := range cols {
			row[i] = str(m[k])
		}
		out = append(out, row)
	}
	return g.table(cols, out)
}

// queryIDs runs a query for device IDs: q is a WHERE condition (* for all) or a whole
// SELECT ... FROM devices query whose rows carry deviceId.
func (g *globals) queryIDs(ctx context.Context, c *service.Client, q string) ([]string, error) {
	sql := strings.TrimSpace(q)
	if !strings.HasPrefix(strings.ToUpper(sql), "SELECT ") {
		if sql == "*" {
			sql = "SELECT * FROM devices"
		} else {
			sql = "SELECT * FROM devices WHERE " + sql
		}
	}
	var ids []string
	err := c.QueryAll(ctx, sql, service.MaxQueryPageSize, func(m json.RawMessage) error {
		var row struct {
			DeviceID string `json:"deviceId"`
			Tags     map[string]json.RawMessage
		}
		if err := json.Unmarshal(m, &row); err != nil || row.DeviceID == "" {
			return fmt.Errorf("query rows must carry deviceId (use SELECT * or a condition): %s", compact(m))
		}
		if _, isRecord := row.Tags[recordTag]; isRecord {
			return nil // a rollout's record is not a device to operate on
		}
		ids = append(ids, row.DeviceID)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("query %q: %w", sql, err)
	}
	return ids, nil
}
