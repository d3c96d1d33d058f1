package query

import (
	"bytes"
	"encoding/json"
	"math"
	"sort"
	"strconv"
	"strings"
)

// undefined is the value of a path that does not exist and of operations on mismatched types;
// a WHERE clause keeps a row only when it evaluates to true.
type undefinedT struct{}

var undefined = undefinedT{}

// Match says whether row satisfies cond (nil: every row). Paths may carry the source's prefix
// (devices.tags.x, devices.jobs.jobId).
func Match(cond Expr, src Source, row map[string]any) bool {
	if cond == nil {
		return true
	}
	return eval(cond, src, row) == true
}

// ItemType is the x-ms-item-type IoT Hub gives the query's rows.
func (q *Query) ItemType() string {
	switch {
	case !q.Star:
		return "Raw"
	case q.From == DeviceJobs:
		return "DeviceJob"
	}
	return "Twin"
}

// Run evaluates the query over rows (in the order given) and returns the result rows: the rows
// themselves for SELECT *, projected objects otherwise, one row per group for aggregates.
func (q *Query) Run(rows []map[string]any) []any {
	var kept []map[string]any
	for _, r := range rows {
		if Match(q.Where, q.From, r) {
			kept = append(kept, r)
		}
	}
	var out []any
	switch {
	case q.Aggregate():
		out = q.aggregate(kept)
	case q.Star:
		out = make([]any, len(kept))
		for i, r := range kept {
			out[i] = r
		}
	default:
		out = make([]any, 0, len(kept))
		for _, r := range kept {
			o := map[string]any{}
			for i, it := range q.Items {
				if v := eval(it.Expr, q.From, r); v != undefined {
					o[q.name(i)] = v
				}
			}
			out = append(out, o)
		}
	}
	if q.Top > 0 && len(out) > q.Top {
		out = out[:q.Top]
	}
	return out
}

// name is the output property of select item i: its alias, a path's last part, or $n.
func (q *Query) name(i int) string {
	it := q.Items[i]
	if it.Alias != "" {
		return it.Alias
	}
	if p, ok := it.Expr.(*Path); ok {
		return p.Parts[len(p.Parts)-1]
	}
	n := 0
	for j := 0; j <= i; j++ {
		if _, ok := q.Items[j].Expr.(*Path); !ok && q.Items[j].Alias == "" {
			n++
		}
	}
	return "$" + strconv.Itoa(n)
}

func (q *Query) aggregate(rows []map[string]any) []any {
	type group struct {
		key  []any
		rows []map[string]any
	}
	var groups []*group
	index := map[string]*group{}
	if len(q.GroupBy) == 0 {
		groups = []*group{{rows: rows}}
	} else {
		for _, r := range rows {
			key := make([]any, len(q.GroupBy))
			for i, g := range q.GroupBy {
				key[i] = eval(g, q.From, r)
			}
			kb, _ := json.Marshal(keyJSON(key))
			g := index[string(kb)]
			if g == nil {
				g = &group{key: key}
				index[string(kb)] = g
				groups = append(groups, g)
			}
			g.rows = append(g.rows, r)
		}
	}
	out := make([]any, 0, len(groups))
	for _, g := range groups {
		o := map[string]any{}
		for i, it := range q.Items {
			var v any = undefined
			switch e := it.Expr.(type) {
			case *Path:
				for j, gp := range q.GroupBy {
					if gp.String() == e.String() {
						v = g.key[j]
					}
				}
			case *Call:
				v = aggregateValue(e, q.From, g.rows)
			}
			if v != undefined {
				o[q.name(i)] = v
			}
		}
		out = append(out, o)
	}
	return out
}

// keyJSON makes a group key encodable (undefined is distinct from null).
func keyJSON(key []any) []any {
	out := make([]any, len(key))
	for i, k := range key {
		if k == undefined {
			out[i] = map[string]bool{"$undefined": true}
		} else {
			out[i] = k
		}
	}
	return out
}

func aggregateValue(c *Call, src Source, rows []map[string]any) any {
	if c.Name == "COUNT" {
		n := 0
		for _, r := range rows {
			if len(c.Args) == 0 || eval(c.Args[0], src, r) != undefined {
				n++
			}
		}
		return float64(n)
	}
	var sum float64
	var n int
	var best any = undefined
	for _, r := range rows {
		v := eval(c.Args[0], src, r)
		switch c.Name {
		case "SUM", "AVG":
			if f, ok := v.(float64); ok {
				sum += f
				n++
			}
		case "MIN", "MAX":
			if best == undefined {
				if _, ok := v.(float64); ok {
					best = v
				} else if _, ok := v.(string); ok {
					best = v
				}
				continue
			}
			if cmp, ok := compare(v, best); ok && (c.Name == "MIN" && cmp < 0 || c.Name == "MAX" && cmp > 0) {
				best = v
			}
		}
	}
	switch c.Name {
	case "SUM":
		return sum
	case "AVG":
		if n == 0 {
			return undefined
		}
		return sum / float64(n)
	}
	return best
}

// lookup resolves a path in row, after the source prefix.
func lookup(p *Path, src Source, row map[string]any) any {
	parts := p.Parts
	if len(parts) > 1 && strings.EqualFold(parts[0], "devices") {
		parts = parts[1:]
		if src == DeviceJobs && len(parts) > 1 && strings.EqualFold(parts[0], "jobs") {
			parts = parts[1:]
		}
	}
	var cur any = row
	for i, name := range parts {
		m, ok := cur.(map[string]any)
		if !ok {
			return undefined
		}
		v, ok := m[name]
		if !ok && i == 0 {
			// top-level twin fields (deviceId, status, ...) match case-insensitively
			for k, kv := range m {
				if strings.EqualFold(k, name) {
					v, ok = kv, true
					break
				}
			}
		}
		if !ok {
			return undefined
		}
		cur = v
	}
	return normalize(cur)
}

// normalize turns JSON numbers of any Go type into float64.
func normalize(v any) any {
	switch x := v.(type) {
	case json.Number:
		f, err := x.Float64()
		if err != nil {
			return undefined
		}
		return f
	case int:
		return float64(x)
	case int64:
		return float64(x)
	}
	return v
}

func eval(e Expr, src Source, row map[string]any) any {
	switch x := e.(type) {
	case *Literal:
		return x.Value
	case *Path:
		return lookup(x, src, row)
	case *List:
		out := make([]any, len(x.Items))
		for i, it := range x.Items {
			out[i] = eval(it, src, row)
		}
		return out
	case *Unary:
		v := eval(x.X, src, row)
		if x.Op == "NOT" {
			if b, ok := v.(bool); ok {
				return !b
			}
			return undefined
		}
		if f, ok := v.(float64); ok {
			return -f
		}
		return undefined
	case *Binary:
		return evalBinary(x, src, row)
	case *Call:
		args := make([]any, len(x.Args))
		for i, a := range x.Args {
			args[i] = eval(a, src, row)
		}
		return call(x.Name, args)
	}
	return undefined
}

func evalBinary(x *Binary, src Source, row map[string]any) any {
	l := eval(x.L, src, row)
	switch x.Op {
	case "AND":
		if l == false {
			return false
		}
		r := eval(x.R, src, row)
		if r == false {
			return false
		}
		if l == true && r == true {
			return true
		}
		return undefined
	case "OR":
		if l == true {
			return true
		}
		r := eval(x.R, src, row)
		if r == true {
			return true
		}
		if l == false && r == false {
			return false
		}
		return undefined
	}
	r := eval(x.R, src, row)
	switch x.Op {
	case "IN", "NIN":
		list, _ := r.([]any)
		if l == undefined {
			return undefined
		}
		found := false
		for _, it := range list {
			if c, ok := compare(l, it); ok && c == 0 {
				found = true
				break
			}
		}
		return found == (x.Op == "IN")
	case "=", "!=", "<", ">", "<=", ">=":
		c, ok := compare(l, r)
		if !ok {
			return undefined
		}
		if c == 2 { // unordered but comparable for equality (bool, null)
			switch x.Op {
			case "=":
				return false
			case "!=":
				return true
			}
			return undefined
		}
		switch x.Op {
		case "=":
			return c == 0
		case "!=":
			return c != 0
		case "<":
			return c < 0
		case ">":
			return c > 0
		case "<=":
			return c <= 0
		}
		return c >= 0
	}
	lf, lok := l.(float64)
	rf, rok := r.(float64)
	if !lok || !rok {
		if x.Op == "+" {
			if ls, ok := l.(string); ok {
				if rs, ok := r.(string); ok {
					return ls + rs
				}
			}
		}
		return undefined
	}
	var v float64
	switch x.Op {
	case "+":
		v = lf + rf
	case "-":
		v = lf - rf
	case "*":
		v = lf * rf
	case "/":
		if rf == 0 {
			return undefined
		}
		v = lf / rf
	case "%":
		if rf == 0 {
			return undefined
		}
		v = math.Mod(lf, rf)
	}
	if math.IsInf(v, 0) || math.IsNaN(v) {
		return undefined
	}
	return v
}

// compare orders two primitives of the same type: -1, 0, 1, or 2 for "equal types without an
// order, and not equal" (bools). ok is false for mismatched or non-primitive operands.
func compare(a, b any) (int, bool) {
	switch x := a.(type) {
	case float64:
		y, ok := b.(float64)
		if !ok {
			return 0, false
		}
		switch {
		case x < y:
			return -1, true
		case x > y:
			return 1, true
		}
		return 0, true
	case string:
		y, ok := b.(string)
		if !ok {
			return 0, false
		}
		return strings.Compare(x, y), true
	case bool:
		y, ok := b.(bool)
		if !ok {
			return 0, false
		}
		if x == y {
			return 0, true
		}
		return 2, true
	case nil:
		if b == nil {
			return 0, true
		}
		return 0, false
	}
	return 0, false
}

func call(name string, a []any) any {
	str := func(i int) (string, bool) { s, ok := a[i].(string); return s, ok }
	num := func(i int) (float64, bool) { f, ok := a[i].(float64); return f, ok }
	switch name {
	case "IS_DEFINED":
		return a[0] != undefined
	case "IS_NULL":
		return a[0] == nil
	case "IS_BOOL":
		_, ok := a[0].(bool)
		return ok
	case "IS_NUMBER":
		_, ok := a[0].(float64)
		return ok
	case "IS_STRING":
		_, ok := a[0].(string)
		return ok
	case "IS_ARRAY":
		_, ok := a[0].([]any)
		return ok
	case "IS_OBJECT":
		_, ok := a[0].(map[string]any)
		return ok
	case "IS_PRIMITIVE":
		switch a[0].(type) {
		case nil, bool, float64, string:
			return true
		}
		return false
	case "ABS", "CEILING", "FLOOR":
		f, ok := num(0)
		if !ok {
			return undefined
		}
		return map[string]func(float64) float64{"ABS": math.Abs, "CEILING": math.Ceil, "FLOOR": math.Floor}[name](f)
	case "CONCAT":
		var b strings.Builder
		for i := range a {
			s, ok := str(i)
			if !ok {
				return undefined
			}
			b.WriteString(s)
		}
		return b.String()
	case "SUBSTRING":
		s, ok1 := str(0)
		st, ok2 := num(1)
		n, ok3 := num(2)
		if !ok1 || !ok2 || !ok3 {
			return undefined
		}
		r := []rune(s)
		start := int(math.Max(0, math.Min(st, float64(len(r)))))
		end := int(math.Max(float64(start), math.Min(float64(start)+n, float64(len(r)))))
		return string(r[start:end])
	}
	s, ok := str(0)
	if !ok {
		return undefined
	}
	switch name {
	case "LOWER":
		return strings.ToLower(s)
	case "UPPER":
		return strings.ToUpper(s)
	case "LENGTH":
		return float64(len([]rune(s)))
	case "TRIM":
		return strings.TrimSpace(s)
	case "LTRIM":
		return strings.TrimLeft(s, " \t\r\n")
	case "RTRIM":
		return strings.TrimRight(s, " \t\r\n")
	}
	t, ok := str(1)
	if !ok {
		return undefined
	}
	switch name {
	case "STARTSWITH", "STARTS_WITH":
		return strings.HasPrefix(s, t)
	case "ENDSWITH", "ENDS_WITH":
		return strings.HasSuffix(s, t)
	case "CONTAINS":
		return strings.Contains(s, t)
	case "INDEX_OF":
		i := strings.Index(s, t)
		if i < 0 {
			return float64(-1)
		}
		return float64(len([]rune(s[:i])))
	}
	return undefined
}

// SortByDeviceID orders rows by their deviceId (then jobId), the order hubsim pages in.
func SortByDeviceID(rows []map[string]any) {
	key := func(r map[string]any, k string) string { s, _ := r[k].(string); return s }
	sort.SliceStable(rows, func(i, j int) bool {
		a, b := key(rows[i], "deviceId"), key(rows[j], "deviceId")
		if a != b {
			return a < b
		}
		return key(rows[i], "jobId") < key(rows[j], "jobId")
	})
}

// Row turns a value (a twin, a device job) into the JSON object a query reads, through its
// JSON encoding.
func Row(v any) (map[string]any, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, err
	}
	return m, nil
}
