package query

import (
	"fmt"
	"strconv"
	"strings"
)

// Source is what a query reads.
type Source int

// Sources.
const (
	Devices    Source = iota // FROM devices: twins
	DeviceJobs               // FROM devices.jobs: per-device job rows
)

func (s Source) String() string {
	if s == DeviceJobs {
		return "devices.jobs"
	}
	return "devices"
}

// Expr is a node of an expression.
type Expr interface {
	pos() int
	String() string
}

// Path is a property reference such as tags.site or properties.reported.fw.version.
type Path struct {
	Parts []string
	At    int
}

// Literal is a constant: nil, bool, float64 or string.
type Literal struct {
	Value any
	At    int
}

// List is a bracketed list of expressions ([1, 'a']).
type List struct {
	Items []Expr
	At    int
}

// Unary is NOT x or -x.
type Unary struct {
	Op string // "NOT", "-"
	X  Expr
	At int
}

// Binary is x op y: AND, OR, comparisons, arithmetic, IN, NIN.
type Binary struct {
	Op   string
	L, R Expr
	At   int
}

// Call is a function call; Name is upper case.
type Call struct {
	Name string
	Args []Expr
	At   int
}

func (e *Path) pos() int    { return e.At }
func (e *Literal) pos() int { return e.At }
func (e *List) pos() int    { return e.At }
func (e *Unary) pos() int   { return e.At }
func (e *Binary) pos() int  { return e.At }
func (e *Call) pos() int    { return e.At }

func (e *Path) String() string { return strings.Join(e.Parts, ".") }
func (e *Literal) String() string {
	switch v := e.Value.(type) {
	case nil:
		return "null"
	case string:
		return strconv.Quote(v)
	}
	return fmt.Sprint(e.Value)
}
func (e *List) String() string {
	s := make([]string, len(e.Items))
	for i, x := range e.Items {
		s[i] = x.String()
	}
	return "[" + strings.Join(s, ", ") + "]"
}
func (e *Unary) String() string  { return "(" + e.Op + " " + e.X.String() + ")" }
func (e *Binary) String() string { return "(" + e.L.String() + " " + e.Op + " " + e.R.String() + ")" }
func (e *Call) String() string {
	s := make([]string, len(e.Args))
	for i, x := range e.Args {
		s[i] = x.String()
	}
	return e.Name + "(" + strings.Join(s, ", ") + ")"
}

// Item is one entry of a SELECT list.
type Item struct {
	Expr  Expr
	Alias string
}

// Query is a parsed SELECT statement.
type Query struct {
	// Star is SELECT *; otherwise Items hold the projection.
	Star    bool
	Items   []Item
	Top     int // 0: no limit
	From    Source
	Where   Expr // nil: every row
	GroupBy []*Path
}

// Aggregate says whether the select list holds aggregate calls.
func (q *Query) Aggregate() bool {
	for _, it := range q.Items {
		if c, ok := it.Expr.(*Call); ok && aggregates[c.Name] {
			return true
		}
	}
	return false
}

var aggregates = map[string]bool{"COUNT": true, "SUM": true, "AVG": true, "MIN": true, "MAX": true}

// arity gives each scalar function's argument count range.
var arity = map[string][2]int{
	"IS_DEFINED": {1, 1}, "IS_NULL": {1, 1}, "IS_BOOL": {1, 1}, "IS_NUMBER": {1, 1}, "IS_STRING": {1, 1},
	"IS_ARRAY": {1, 1}, "IS_OBJECT": {1, 1}, "IS_PRIMITIVE": {1, 1},
	"STARTSWITH": {2, 2}, "STARTS_WITH": {2, 2}, "ENDSWITH": {2, 2}, "ENDS_WITH": {2, 2}, "CONTAINS": {2, 2},
	"LOWER": {1, 1}, "UPPER": {1, 1}, "LENGTH": {1, 1}, "CONCAT": {2, 16}, "SUBSTRING": {3, 3}, "INDEX_OF": {2, 2},
	"TRIM": {1, 1}, "LTRIM": {1, 1}, "RTRIM": {1, 1}, "ABS": {1, 1}, "CEILING": {1, 1}, "FLOOR": {1, 1},
}

var reserved = map[string]bool{
	"SELECT": true, "FROM": true, "WHERE": true, "AND": true, "OR": true, "NOT": true, "IN": true, "NIN": true,
	"AS": true, "TOP": true, "GROUP": true, "BY": true, "ORDER": true, "TRUE": true, "FALSE": true, "NULL": true,
}

type parser struct {
	toks  []token
	i     int
	depth int
	src   Source
}

func (p *parser) peek() token { return p.toks[p.i] }
func (p *parser) next() token {
	t := p.toks[p.i]
	if t.kind != tEOF {
		p.i++
	}
	return t
}

func (p *parser) errf(t token, format string, args ...any) *Error {
	return &Error{Pos: t.pos, Msg: fmt.Sprintf(format, args...)}
}

func (p *parser) punct(s string) bool {
	if t := p.peek(); t.kind == tPunct && t.text == s {
		p.i++
		return true
	}
	return false
}

func (p *parser) keyword(kw string) bool {
	if isKeyword(p.peek(), kw) {
		p.i++
		return true
	}
	return false
}

func (p *parser) expectPunct(s string) error {
	if !p.punct(s) {
		return p.errf(p.peek(), "expected %q, found %s", s, p.peek())
	}
	return nil
}

// Parse parses a full SELECT statement.
func Parse(text string) (*Query, error) {
	toks, err := lex(text)
	if err != nil {
		return nil, err
	}
	p := &parser{toks: toks}
	q, err := p.query()
	if err != nil {
		return nil, err
	}
	return q, nil
}

// ParseCondition parses a job's queryCondition: the text of a WHERE clause over devices, or
// "*" for every device (returned as a nil Expr).
func ParseCondition(text string) (Expr, error) {
	if strings.TrimSpace(text) == "*" {
		return nil, nil
	}
	toks, err := lex(text)
	if err != nil {
		return nil, err
	}
	if toks[0].kind == tEOF {
		return nil, &Error{Msg: "the query condition is empty (\"*\" selects every device)"}
	}
	p := &parser{toks: toks}
	e, err := p.expr()
	if err != nil {
		return nil, err
	}
	if t := p.peek(); t.kind != tEOF {
		return nil, p.errf(t, "unexpected %s after the condition", t)
	}
	return e, nil
}

func (p *parser) query() (*Query, error) {
	if !p.keyword("SELECT") {
		return nil, p.errf(p.peek(), "a query starts with SELECT, found %s", p.peek())
	}
	q := &Query{}
	if p.keyword("TOP") {
		t := p.next()
		if t.kind != tNumber || t.num < 1 || t.num != float64(int(t.num)) || t.num > 1e9 {
			return nil, p.errf(t, "TOP needs a positive whole number, found %s", t)
		}
		q.Top = int(t.num)
	}
	if p.punct("*") {
		q.Star = true
	} else {
		for {
			e, err := p.expr()
			if err != nil {
				return nil, err
			}
			it := Item{Expr: e}
			if p.keyword("AS") {
				t := p.next()
				if t.kind != tIdent || reserved[strings.ToUpper(t.text)] {
					return nil, p.errf(t, "AS needs a name, found %s", t)
				}
				it.Alias = t.text
			}
			q.Items = append(q.Items, it)
			if !p.punct(",") {
				break
			}
		}
	}
	if !p.keyword("FROM") {
		return nil, p.errf(p.peek(), "expected FROM, found %s", p.peek())
	}
	src, err := p.source()
	if err != nil {
		return nil, err
	}
	q.From, p.src = src, src
	if p.keyword("WHERE") {
		if q.Where, err = p.expr(); err != nil {
			return nil, err
		}
	}
	if p.keyword("GROUP") {
		if !p.keyword("BY") {
			return nil, p.errf(p.peek(), "expected BY after GROUP, found %s", p.peek())
		}
		for {
			at := p.peek()
			e, err := p.primary()
			if err != nil {
				return nil, err
			}
			path, ok := e.(*Path)
			if !ok {
				return nil, p.errf(at, "GROUP BY takes property paths, not %s", e)
			}
			q.GroupBy = append(q.GroupBy, path)
			if !p.punct(",") {
				break
			}
		}
	}
	if t := p.peek(); isKeyword(t, "ORDER") {
		return nil, p.errf(t, "ORDER BY is not supported")
	} else if t.kind != tEOF {
		return nil, p.errf(t, "unexpected %s", t)
	}
	return q, q.check(p)
}

func (p *parser) source() (Source, error) {
	t := p.next()
	if !isKeyword(t, "devices") {
		return 0, p.errf(t, "FROM supports devices and devices.jobs, found %s", t)
	}
	if !p.punct(".") {
		return Devices, nil
	}
	u := p.next()
	switch {
	case isKeyword(u, "jobs"):
		return DeviceJobs, nil
	case isKeyword(u, "modules"):
		return 0, p.errf(u, "devices.modules is not supported: hubsim has no module identities")
	}
	return 0, p.errf(u, "FROM supports devices and devices.jobs, found devices.%s", u.text)
}

// check applies the rules that need the whole statement.
func (q *Query) check(p *parser) error {
	agg := q.Aggregate()
	if len(q.GroupBy) > 0 && !agg {
		return &Error{Pos: q.GroupBy[0].At, Msg: "GROUP BY needs an aggregate (such as COUNT()) in the SELECT list"}
	}
	if q.Star && len(q.GroupBy) > 0 {
		return &Error{Pos: q.GroupBy[0].At, Msg: "GROUP BY cannot be used with SELECT *"}
	}
	if q.From == DeviceJobs && (agg || len(q.GroupBy) > 0) {
		return &Error{Pos: q.Items[0].Expr.pos(), Msg: "aggregates are not supported over devices.jobs"}
	}
	if agg {
		grouped := map[string]bool{}
		for _, g := range q.GroupBy {
			grouped[g.String()] = true
		}
		for _, it := range q.Items {
			switch e := it.Expr.(type) {
			case *Call:
				if aggregates[e.Name] {
					continue
				}
			case *Path:
				if grouped[e.String()] {
					continue
				}
			}
			return &Error{Pos: it.Expr.pos(), Msg: fmt.Sprintf("%s must be an aggregate or a GROUP BY path", it.Expr)}
		}
	}
	for _, it := range q.Items {
		if err := noNestedAggregate(it.Expr, true); err != nil {
			return err
		}
	}
	if q.Where != nil {
		if err := noNestedAggregate(q.Where, false); err != nil {
			return err
		}
	}
	return nil
}

func noNestedAggregate(e Expr, top bool) error {
	switch x := e.(type) {
	case *Call:
		if aggregates[x.Name] && !top {
			return &Error{Pos: x.At, Msg: fmt.Sprintf("%s is only allowed directly in the SELECT list", x.Name)}
		}
		for _, a := range x.Args {
			if err := noNestedAggregate(a, false); err != nil {
				return err
			}
		}
	case *Unary:
		return noNestedAggregate(x.X, false)
	case *Binary:
		if err := noNestedAggregate(x.L, false); err != nil {
			return err
		}
		return noNestedAggregate(x.R, false)
	case *List:
		for _, a := range x.Items {
			if err := noNestedAggregate(a, false); err != nil {
				return err
			}
		}
	}
	return nil
}

func (p *parser) enter() error {
	p.depth++
	if p.depth > maxDepth {
		return p.errf(p.peek(), "expression nests deeper than %d levels", maxDepth)
	}
	return nil
}

func (p *parser) expr() (Expr, error) {
	if err := p.enter(); err != nil {
		return nil, err
	}
	defer func() { p.depth-- }()
	return p.or()
}

func (p *parser) or() (Expr, error) {
	l, err := p.and()
	if err != nil {
		return nil, err
	}
	for {
		t := p.peek()
		if !p.keyword("OR") {
			return l, nil
		}
		r, err := p.and()
		if err != nil {
			return nil, err
		}
		l = &Binary{Op: "OR", L: l, R: r, At: t.pos}
	}
}

func (p *parser) and() (Expr, error) {
	l, err := p.not()
	if err != nil {
		return nil, err
	}
	for {
		t := p.peek()
		if !p.keyword("AND") {
			return l, nil
		}
		r, err := p.not()
		if err != nil {
			return nil, err
		}
		l = &Binary{Op: "AND", L: l, R: r, At: t.pos}
	}
}

func (p *parser) not() (Expr, error) {
	t := p.peek()
	if p.keyword("NOT") {
		if err := p.enter(); err != nil {
			return nil, err
		}
		defer func() { p.depth-- }()
		x, err := p.not()
		if err != nil {
			return nil, err
		}
		return &Unary{Op: "NOT", X: x, At: t.pos}, nil
	}
	return p.comparison()
}

var comparisons = map[string]string{"=": "=", "!=": "!=", "<>": "!=", "<": "<", ">": ">", "<=": "<=", ">=": ">="}

func (p *parser) comparison() (Expr, error) {
	l, err := p.additive()
	if err != nil {
		return nil, err
	}
	t := p.peek()
	if t.kind == tPunct {
		if op, ok := comparisons[t.text]; ok {
			p.i++
			r, err := p.additive()
			if err != nil {
				return nil, err
			}
			return &Binary{Op: op, L: l, R: r, At: t.pos}, nil
		}
	}
	op := ""
	switch {
	case p.keyword("IN"):
		op = "IN"
	case p.keyword("NIN"):
		op = "NIN"
	case isKeyword(t, "NOT") && isKeyword(p.toks[p.i+1], "IN"):
		p.i += 2
		op = "NIN"
	default:
		return l, nil
	}
	lt := p.peek()
	if lt.kind != tPunct || lt.text != "[" {
		return nil, p.errf(lt, "%s takes a list such as ['a', 'b'], found %s", op, lt)
	}
	r, err := p.primary()
	if err != nil {
		return nil, err
	}
	return &Binary{Op: op, L: l, R: r, At: t.pos}, nil
}

func (p *parser) additive() (Expr, error) {
	l, err := p.multiplicative()
	if err != nil {
		return nil, err
	}
	for {
		t := p.peek()
		if t.kind != tPunct || (t.text != "+" && t.text != "-") {
			return l, nil
		}
		p.i++
		r, err := p.multiplicative()
		if err != nil {
			return nil, err
		}
		l = &Binary{Op: t.text, L: l, R: r, At: t.pos}
	}
}

func (p *parser) multiplicative() (Expr, error) {
	l, err := p.unary()
	if err != nil {
		return nil, err
	}
	for {
		t := p.peek()
		if t.kind != tPunct || (t.text != "*" && t.text != "/" && t.text != "%") {
			return l, nil
		}
		p.i++
		r, err := p.unary()
		if err != nil {
			return nil, err
		}
		l = &Binary{Op: t.text, L: l, R: r, At: t.pos}
	}
}

func (p *parser) unary() (Expr, error) {
	t := p.peek()
	if t.kind == tPunct && t.text == "-" {
		p.i++
		if err := p.enter(); err != nil {
			return nil, err
		}
		defer func() { p.depth-- }()
		x, err := p.unary()
		if err != nil {
			return nil, err
		}
		if l, ok := x.(*Literal); ok {
			if f, ok := l.Value.(float64); ok {
				return &Literal{Value: -f, At: t.pos}, nil
			}
		}
		return &Unary{Op: "-", X: x, At: t.pos}, nil
	}
	return p.primary()
}

func (p *parser) primary() (Expr, error) {
	t := p.next()
	switch t.kind {
	case tNumber:
		return &Literal{Value: t.num, At: t.pos}, nil
	case tString:
		return &Literal{Value: t.text, At: t.pos}, nil
	case tPunct:
		switch t.text {
		case "(":
			e, err := p.expr()
			if err != nil {
				return nil, err
			}
			return e, p.expectPunct(")")
		case "[":
			if err := p.enter(); err != nil {
				return nil, err
			}
			defer func() { p.depth-- }()
			l := &List{At: t.pos}
			if p.punct("]") {
				return l, nil
			}
			for {
				e, err := p.expr()
				if err != nil {
					return nil, err
				}
				l.Items = append(l.Items, e)
				if p.punct("]") {
					return l, nil
				}
				if err := p.expectPunct(","); err != nil {
					return nil, err
				}
			}
		}
		return nil, p.errf(t, "unexpected %s", t)
	case tIdent:
		up := strings.ToUpper(t.text)
		switch up {
		case "TRUE":
			return &Literal{Value: true, At: t.pos}, nil
		case "FALSE":
			return &Literal{Value: false, At: t.pos}, nil
		case "NULL":
			return &Literal{Value: nil, At: t.pos}, nil
		}
		if nt := p.peek(); nt.kind == tPunct && nt.text == "(" {
			return p.call(t, up)
		}
		if reserved[up] {
			return nil, p.errf(t, "unexpected keyword %s", t.text)
		}
		return p.path(t)
	}
	return nil, p.errf(t, "unexpected %s", t)
}

func (p *parser) call(name token, up string) (Expr, error) {
	p.i++ // (
	if err := p.enter(); err != nil {
		return nil, err
	}
	defer func() { p.depth-- }()
	c := &Call{Name: up, At: name.pos}
	if !p.punct(")") {
		for {
			e, err := p.expr()
			if err != nil {
				return nil, err
			}
			c.Args = append(c.Args, e)
			if p.punct(")") {
				break
			}
			if err := p.expectPunct(","); err != nil {
				return nil, err
			}
		}
	}
	if aggregates[up] {
		switch {
		case up == "COUNT" && len(c.Args) > 1, up != "COUNT" && len(c.Args) != 1:
			return nil, p.errf(name, "%s takes %s", up, map[bool]string{true: "no argument or one property path", false: "one property path"}[up == "COUNT"])
		}
		return c, nil
	}
	n, ok := arity[up]
	if !ok {
		return nil, p.errf(name, "function %s is not supported", name.text)
	}
	if len(c.Args) < n[0] || len(c.Args) > n[1] {
		if n[0] == n[1] {
			return nil, p.errf(name, "%s takes %d argument(s), got %d", up, n[0], len(c.Args))
		}
		return nil, p.errf(name, "%s takes %d to %d arguments, got %d", up, n[0], n[1], len(c.Args))
	}
	if up == "IS_DEFINED" {
		if _, ok := c.Args[0].(*Path); !ok {
			return nil, p.errf(name, "IS_DEFINED takes a property path, not %s", c.Args[0])
		}
	}
	return c, nil
}

func (p *parser) path(first token) (Expr, error) {
	path := &Path{Parts: []string{first.text}, At: first.pos}
	for {
		switch {
		case p.punct("."):
			t := p.next()
			if t.kind != tIdent {
				return nil, p.errf(t, "expected a property name after '.', found %s", t)
			}
			path.Parts = append(path.Parts, t.text)
		case p.peek().kind == tPunct && p.peek().text == "[":
			p.i++
			t := p.next()
			if t.kind != tString {
				return nil, p.errf(t, "expected a quoted property name in [ ], found %s", t)
			}
			path.Parts = append(path.Parts, t.text)
			if err := p.expectPunct("]"); err != nil {
				return nil, err
			}
		default:
			if len(path.Parts) > 32 {
				return nil, p.errf(first, "property path is longer than 32 parts")
			}
			return path, nil
		}
	}
}
