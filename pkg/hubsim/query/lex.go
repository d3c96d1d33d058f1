// Package query is IoT Hub's query language as hubsim serves it on POST /devices/query and in
// jobs' query conditions: a lexer and a recursive-descent parser into an AST, and an evaluator
// over JSON documents (twins, device job rows). It is pure: callers supply the rows.
//
// Supported: SELECT [TOP n] * | expr [AS alias], ... FROM devices | devices.jobs
// [WHERE cond] [GROUP BY path, ...]; AND, OR, NOT; = != <> < > <= >=; + - * / %; IN and NIN
// over list literals; type checks (IS_DEFINED, IS_NULL, IS_BOOL, IS_NUMBER, IS_STRING,
// IS_ARRAY, IS_OBJECT, IS_PRIMITIVE); string functions (STARTSWITH/STARTS_WITH,
// ENDSWITH/ENDS_WITH, CONTAINS, LOWER, UPPER, LENGTH, CONCAT, SUBSTRING, INDEX_OF, TRIM,
// LTRIM, RTRIM); math (ABS, CEILING, FLOOR); aggregates COUNT(), SUM, AVG, MIN, MAX.
// Anything else is refused with an *Error that names the offset.
package query

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// MaxLength bounds a query's text (IoT Hub refuses long queries too).
const MaxLength = 8192

// maxDepth bounds expression nesting.
const maxDepth = 64

// Error is a query the language does not accept. Pos is a byte offset into the text.
type Error struct {
	Pos int
	Msg string
}

func (e *Error) Error() string { return fmt.Sprintf("query: at offset %d: %s", e.Pos, e.Msg) }

type tokKind int

const (
	tEOF tokKind = iota
	tIdent
	tNumber
	tString
	tPunct // ( ) [ ] , . * + - / % = != <> < > <= >=
)

type token struct {
	kind tokKind
	text string // identifier / punctuation as written; string literal decoded
	num  float64
	pos  int
}

func (t token) String() string {
	switch t.kind {
	case tEOF:
		return "end of query"
	case tString:
		return fmt.Sprintf("string %q", t.text)
	case tNumber:
		return fmt.Sprintf("number %s", t.text)
	}
	return fmt.Sprintf("%q", t.text)
}

func isKeyword(t token, kw string) bool { return t.kind == tIdent && strings.EqualFold(t.text, kw) }

func lex(s string) ([]token, error) {
	if len(s) > MaxLength {
		return nil, &Error{Pos: MaxLength, Msg: fmt.Sprintf("query is %d bytes; the limit is %d", len(s), MaxLength)}
	}
	if !utf8.ValidString(s) {
		return nil, &Error{Msg: "query is not valid UTF-8"}
	}
	var out []token
	i := 0
	for i < len(s) {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '\'' || c == '"':
			start := i
			i++
			var b strings.Builder
			closed := false
			for i < len(s) {
				if s[i] == '\\' && i+1 < len(s) {
					switch e := s[i+1]; e {
					case 'n':
						b.WriteByte('\n')
					case 't':
						b.WriteByte('\t')
					default:
						b.WriteByte(e)
					}
					i += 2
					continue
				}
				if s[i] == c {
					closed = true
					i++
					break
				}
				b.WriteByte(s[i])
				i++
			}
			if !closed {
				return nil, &Error{Pos: start, Msg: "string literal is not closed"}
			}
			out = append(out, token{kind: tString, text: b.String(), pos: start})
		case c >= '0' && c <= '9':
			start := i
			for i < len(s) && (s[i] >= '0' && s[i] <= '9' || s[i] == '.' || s[i] == 'e' || s[i] == 'E' ||
				(s[i] == '-' || s[i] == '+') && (s[i-1] == 'e' || s[i-1] == 'E')) {
				i++
			}
			var f float64
			if _, err := fmt.Sscanf(s[start:i], "%g", &f); err != nil || !validNumber(s[start:i]) {
				return nil, &Error{Pos: start, Msg: fmt.Sprintf("%q is not a number", s[start:i])}
			}
			out = append(out, token{kind: tNumber, text: s[start:i], num: f, pos: start})
		case c == '_' || c == '$' || c < utf8.RuneSelf && unicode.IsLetter(rune(c)):
			start := i
			for i < len(s) && (s[i] == '_' || s[i] == '$' || s[i] < utf8.RuneSelf && (unicode.IsLetter(rune(s[i])) || unicode.IsDigit(rune(s[i])))) {
				i++
			}
			out = append(out, token{kind: tIdent, text: s[start:i], pos: start})
		default:
			start := i
			two := ""
			if i+1 < len(s) {
				two = s[i : i+2]
			}
			switch two {
			case "!=", "<>", "<=", ">=":
				out = append(out, token{kind: tPunct, text: two, pos: start})
				i += 2
				continue
			}
			if strings.IndexByte("()[],.*+-/%=<>", c) >= 0 {
				out = append(out, token{kind: tPunct, text: string(c), pos: start})
				i++
				continue
			}
			r, _ := utf8.DecodeRuneInString(s[i:])
			return nil, &Error{Pos: start, Msg: fmt.Sprintf("unexpected character %q", r)}
		}
	}
	out = append(out, token{kind: tEOF, pos: len(s)})
	return out, nil
}

// validNumber accepts digits[.digits][e[+-]digits].
func validNumber(s string) bool {
	i := 0
	digits := func() bool {
		st := i
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
		}
		return i > st
	}
	if !digits() {
		return false
	}
	if i < len(s) && s[i] == '.' {
		i++
		if !digits() {
			return false
		}
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		if !digits() {
			return false
		}
	}
	return i == len(s)
}
