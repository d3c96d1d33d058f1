// Package twin holds Azure IoT Hub's device twin document rules, shared by hubsim and the agent:
// strict JSON decoding (valid UTF-8, no duplicate keys, bounded nesting, numbers kept exact),
// merge patches (objects merge recursively, null deletes, everything else replaces), the limits
// (key rules, string length, integer range, depth, section sizes) as typed errors, and section
// sizes counted as Azure counts them.
//
// The agent's twin synchronisation (versions, resync, Plug and Play acknowledgements, persisted
// intended reported state) is in pkg/twinsync; this package does no I/O.
package twin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"reflect"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Limits, as IoT Hub documents them.
const (
	// MaxDepth is the deepest nesting allowed in a section: the section object is level 1.
	MaxDepth = 10
	// MaxKeyBytes is the longest key, in UTF-8 bytes.
	MaxKeyBytes = 1024
	// MaxStringBytes is the longest string value, in UTF-8 bytes.
	MaxStringBytes = 4 * 1024
	// MinInt and MaxInt bound integer values.
	MinInt = -4503599627370496
	MaxInt = 4503599627370495
	// MaxTagsSize, MaxDesiredSize and MaxReportedSize bound each section (see Size).
	MaxTagsSize     = 8 * 1024
	MaxDesiredSize  = 32 * 1024
	MaxReportedSize = 32 * 1024
	// maxDecodeDepth stops pathological nesting while decoding, before the limit check.
	maxDecodeDepth = 64
)

// Section is a part of the twin with its own size limit.
type Section int

// Sections.
const (
	Tags Section = iota
	Desired
	Reported
)

func (s Section) String() string {
	switch s {
	case Tags:
		return "tags"
	case Desired:
		return "properties.desired"
	case Reported:
		return "properties.reported"
	}
	return "section(" + strconv.Itoa(int(s)) + ")"
}

// MaxSize is the section's size limit.
func (s Section) MaxSize() int {
	if s == Tags {
		return MaxTagsSize
	}
	return MaxDesiredSize
}

// Rule names a broken rule.
type Rule string

// Rules a document or patch can break.
const (
	RuleJSON    Rule = "json"    // not a JSON object, invalid UTF-8, duplicate key, nesting far too deep
	RuleKey     Rule = "key"     // empty, too long, or containing '.', '$', space or a control character
	RuleString  Rule = "string"  // a string value over MaxStringBytes
	RuleInteger Rule = "integer" // an integer outside [MinInt, MaxInt], or a number out of float64 range
	RuleDepth   Rule = "depth"   // nesting deeper than MaxDepth
	RuleSize    Rule = "size"    // a section over its size limit
)

// Error is a document that breaks a rule. Path is the dotted path of the offending member (keys
// cannot contain dots, so the path is unambiguous); it is empty for whole-document errors.
type Error struct {
	Rule   Rule
	Path   string
	Detail string
}

func (e *Error) Error() string {
	if e.Path == "" {
		return fmt.Sprintf("twin: %s: %s", e.Rule, e.Detail)
	}
	return fmt.Sprintf("twin: %s: %s: %s", e.Rule, clip(e.Path), e.Detail)
}

// Is matches another *Error with the same Rule (Path and Detail ignored), so
// errors.Is(err, &twin.Error{Rule: twin.RuleSize}) works.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Rule == e.Rule
}

func clip(s string) string {
	if len(s) > 80 {
		return s[:77] + "..."
	}
	return s
}

// Decode parses b as a JSON object. Numbers stay json.Number (exact); invalid UTF-8, duplicate
// keys, trailing data and nesting deeper than 64 levels are *Error with RuleJSON. null members
// stay as nil (meaning "delete" in a patch).
func Decode(b []byte) (map[string]any, error) {
	if !utf8.Valid(b) {
		return nil, &Error{Rule: RuleJSON, Detail: "not valid UTF-8"}
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, &Error{Rule: RuleJSON, Detail: "not JSON: " + err.Error()}
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, &Error{Rule: RuleJSON, Detail: "not a JSON object"}
	}
	m, err := decodeObject(dec, "", 1)
	if err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, &Error{Rule: RuleJSON, Detail: "trailing data after the object"}
	}
	return m, nil
}

func decodeObject(dec *json.Decoder, path string, depth int) (map[string]any, error) {
	if depth > maxDecodeDepth {
		return nil, &Error{Rule: RuleJSON, Path: path, Detail: "nesting deeper than " + strconv.Itoa(maxDecodeDepth) + " levels"}
	}
	m := map[string]any{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, &Error{Rule: RuleJSON, Path: path, Detail: err.Error()}
		}
		k, ok := tok.(string)
		if !ok {
			return nil, &Error{Rule: RuleJSON, Path: path, Detail: "object key is not a string"}
		}
		p := join(path, k)
		if _, dup := m[k]; dup {
			return nil, &Error{Rule: RuleJSON, Path: p, Detail: "duplicate key"}
		}
		v, err := decodeValue(dec, p, depth)
		if err != nil {
			return nil, err
		}
		m[k] = v
	}
	if _, err := dec.Token(); err != nil { // '}'
		return nil, &Error{Rule: RuleJSON, Path: path, Detail: err.Error()}
	}
	return m, nil
}

func decodeValue(dec *json.Decoder, path string, depth int) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, &Error{Rule: RuleJSON, Path: path, Detail: err.Error()}
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			return decodeObject(dec, path, depth+1)
		case '[':
			if depth+1 > maxDecodeDepth {
				return nil, &Error{Rule: RuleJSON, Path: path, Detail: "nesting too deep"}
			}
			a := []any{}
			for dec.More() {
				v, err := decodeValue(dec, path, depth+1)
				if err != nil {
					return nil, err
				}
				a = append(a, v)
			}
			if _, err := dec.Token(); err != nil {
				return nil, &Error{Rule: RuleJSON, Path: path, Detail: err.Error()}
			}
			return a, nil
		}
		return nil, &Error{Rule: RuleJSON, Path: path, Detail: "unexpected " + t.String()}
	default:
		return t, nil // nil, bool, json.Number, string
	}
}

func join(path, k string) string {
	if path == "" {
		return k
	}
	return path + "." + k
}

// Merge applies patch to dst as IoT Hub does and returns the result (dst, or a new map when dst
// is nil): a nil member deletes the key, an object merges recursively into an object (and
// replaces anything else), every other value replaces. patch is not modified; values taken from
// it are deep-copied, so dst never shares structure with patch.
func Merge(dst, patch map[string]any) map[string]any {
	if dst == nil {
		dst = map[string]any{}
	}
	for k, v := range patch {
		switch pv := v.(type) {
		case nil:
			delete(dst, k)
		case map[string]any:
			cur, ok := dst[k].(map[string]any)
			if !ok {
				cur = nil
			}
			dst[k] = Merge(cur, pv)
		default:
			dst[k] = Clone(v)
		}
	}
	return dst
}

// Clone deep-copies a decoded JSON value.
func Clone(v any) any {
	switch t := v.(type) {
	case map[string]any:
		m := make(map[string]any, len(t))
		for k, x := range t {
			m[k] = Clone(x)
		}
		return m
	case []any:
		a := make([]any, len(t))
		for i, x := range t {
			a[i] = Clone(x)
		}
		return a
	}
	return v
}

// Equal reports whether two decoded JSON values are the same (numbers compared by value).
func Equal(a, b any) bool {
	if na, ok := a.(json.Number); ok {
		nb, ok := b.(json.Number)
		if !ok {
			return false
		}
		if na == nb {
			return true
		}
		fa, ea := na.Float64()
		fb, eb := nb.Float64()
		return ea == nil && eb == nil && fa == fb
	}
	switch ta := a.(type) {
	case map[string]any:
		tb, ok := b.(map[string]any)
		if !ok || len(ta) != len(tb) {
			return false
		}
		for k, v := range ta {
			w, ok := tb[k]
			if !ok || !Equal(v, w) {
				return false
			}
		}
		return true
	case []any:
		tb, ok := b.([]any)
		if !ok || len(ta) != len(tb) {
			return false
		}
		for i := range ta {
			if !Equal(ta[i], tb[i]) {
				return false
			}
		}
		return true
	}
	return reflect.DeepEqual(a, b)
}

// StripReserved removes the members IoT Hub manages ($version and $metadata) from the top level
// of a section, as a service replace or patch may carry them back from a twin it read. Any other
// key starting with '$' stays, and fails CheckPatch.
func StripReserved(doc map[string]any) {
	delete(doc, "$version")
	delete(doc, "$metadata")
}

// CheckPatch checks a patch (or a whole section) against the key, string, integer and depth
// rules. Null members are allowed (they delete). It does not check the size; see CheckSize.
func CheckPatch(patch map[string]any) error {
	return checkObject(patch, "", 1)
}

func checkObject(m map[string]any, path string, depth int) error {
	if depth > MaxDepth {
		return &Error{Rule: RuleDepth, Path: path, Detail: fmt.Sprintf("nesting deeper than %d levels", MaxDepth)}
	}
	for k, v := range m {
		p := join(path, k)
		if err := CheckKey(k); err != nil {
			return &Error{Rule: RuleKey, Path: p, Detail: err.Error()}
		}
		if err := checkValue(v, p, depth); err != nil {
			return err
		}
	}
	return nil
}

func checkValue(v any, path string, depth int) error {
	switch t := v.(type) {
	case map[string]any:
		return checkObject(t, path, depth+1)
	case []any:
		if depth+1 > MaxDepth {
			return &Error{Rule: RuleDepth, Path: path, Detail: fmt.Sprintf("nesting deeper than %d levels", MaxDepth)}
		}
		for _, x := range t {
			if err := checkValue(x, path, depth+1); err != nil {
				return err
			}
		}
	case string:
		if len(t) > MaxStringBytes {
			return &Error{Rule: RuleString, Path: path, Detail: fmt.Sprintf("string of %d bytes, limit %d", len(t), MaxStringBytes)}
		}
	case json.Number:
		return checkNumber(t, path)
	case float64:
		if math.IsInf(t, 0) || math.IsNaN(t) {
			return &Error{Rule: RuleInteger, Path: path, Detail: "not a finite number"}
		}
		if t == math.Trunc(t) && (t < MinInt || t > MaxInt) {
			return &Error{Rule: RuleInteger, Path: path, Detail: "integer out of range"}
		}
	case nil, bool:
	default:
		return &Error{Rule: RuleJSON, Path: path, Detail: fmt.Sprintf("unsupported value type %T", v)}
	}
	return nil
}

func checkNumber(n json.Number, path string) error {
	s := string(n)
	if !strings.ContainsAny(s, ".eE") {
		i, err := strconv.ParseInt(s, 10, 64)
		if err != nil || i < MinInt || i > MaxInt {
			return &Error{Rule: RuleInteger, Path: path, Detail: fmt.Sprintf("integer %s outside [%d, %d]", clip(s), int64(MinInt), int64(MaxInt))}
		}
		return nil
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsInf(f, 0) {
		return &Error{Rule: RuleInteger, Path: path, Detail: "number " + clip(s) + " is out of range"}
	}
	return nil
}

// CheckKey checks one key: non-empty, at most MaxKeyBytes, valid UTF-8, and free of '.', '$',
// space and control characters (C0, DEL and C1).
func CheckKey(k string) error {
	if k == "" {
		return errors.New("empty key")
	}
	if len(k) > MaxKeyBytes {
		return fmt.Errorf("key of %d bytes, limit %d", len(k), MaxKeyBytes)
	}
	if !utf8.ValidString(k) {
		return errors.New("key is not valid UTF-8")
	}
	for _, r := range k {
		switch {
		case r == '.', r == '$', r == ' ':
			return fmt.Errorf("key contains %q", r)
		case r < 0x20, r >= 0x7f && r <= 0x9f:
			return fmt.Errorf("key contains control character %U", r)
		}
	}
	return nil
}

// Size counts a section as IoT Hub does: for every member the length of its key plus the size
// of its value, where strings (keys included) count their characters other than control
// characters, numbers count 8, booleans 4, nested objects and arrays the sum of their contents,
// and null 0. Top-level members starting with '$' ($version, $metadata) are not counted.
func Size(doc map[string]any) int {
	n := 0
	for k, v := range doc {
		if strings.HasPrefix(k, "$") {
			continue
		}
		n += strSize(k) + valueSize(v)
	}
	return n
}

func valueSize(v any) int {
	switch t := v.(type) {
	case map[string]any:
		n := 0
		for k, x := range t {
			n += strSize(k) + valueSize(x)
		}
		return n
	case []any:
		n := 0
		for _, x := range t {
			n += valueSize(x)
		}
		return n
	case string:
		return strSize(t)
	case json.Number, float64, int, int64:
		return 8
	case bool:
		return 4
	}
	return 0
}

func strSize(s string) int {
	n := 0
	for _, r := range s {
		if r < 0x20 || (r >= 0x7f && r <= 0x9f) {
			continue
		}
		n++
	}
	return n
}

// CheckSize fails with RuleSize when doc is over the section's limit.
func CheckSize(s Section, doc map[string]any) error {
	if n := Size(doc); n > s.MaxSize() {
		return &Error{Rule: RuleSize, Detail: fmt.Sprintf("%s would be %d bytes, limit %d", s, n, s.MaxSize())}
	}
	return nil
}

// Apply checks patch and merges it into a copy of doc, checking the result's size; doc is left
// unchanged. It is the one call hubsim makes for every twin update.
func Apply(s Section, doc, patch map[string]any) (map[string]any, error) {
	if err := CheckPatch(patch); err != nil {
		return nil, err
	}
	out := Merge(Clone(doc).(map[string]any), patch)
	if err := CheckSize(s, out); err != nil {
		return nil, err
	}
	return out, nil
}
