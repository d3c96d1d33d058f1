package twin

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func mustDecode(t testing.TB, s string) map[string]any {
	t.Helper()
	m, err := Decode([]byte(s))
	if err != nil {
		t.Fatalf("Decode(%s): %v", s, err)
	}
	return m
}

func TestMerge(t *testing.T) {
	cases := []struct{ doc, patch, want string }{
		{`{}`, `{"a":1}`, `{"a":1}`},
		{`{"a":1,"b":2}`, `{"a":null}`, `{"b":2}`},
		{`{"a":{"x":1,"y":2}}`, `{"a":{"y":null,"z":3}}`, `{"a":{"x":1,"z":3}}`},
		{`{"a":{"x":1}}`, `{"a":5}`, `{"a":5}`},
		{`{"a":5}`, `{"a":{"x":null,"y":1}}`, `{"a":{"y":1}}`},
		{`{"a":[1,2]}`, `{"a":[3]}`, `{"a":[3]}`},
		{`{"a":1}`, `{"missing":null}`, `{"a":1}`},
	}
	for _, c := range cases {
		doc := mustDecode(t, c.doc)
		patch := mustDecode(t, c.patch)
		got := Merge(doc, patch)
		if want := mustDecode(t, c.want); !Equal(got, want) {
			t.Errorf("Merge(%s, %s) = %v, want %s", c.doc, c.patch, got, c.want)
		}
	}
}

func TestMergeDoesNotAlias(t *testing.T) {
	patch := mustDecode(t, `{"a":{"b":[1,{"c":2}]}}`)
	doc := Merge(nil, patch)
	doc["a"].(map[string]any)["b"].([]any)[1].(map[string]any)["c"] = "changed"
	if !Equal(patch, mustDecode(t, `{"a":{"b":[1,{"c":2}]}}`)) {
		t.Fatalf("Merge shares structure with the patch: %v", patch)
	}
}

func TestDecodeRejects(t *testing.T) {
	for _, s := range []string{
		`[1]`, `"x"`, `{"a":1,"a":2}`, `{"a":{"b":1,"b":2}}`, "{\"a\":\"\xff\"}", `{"a":1} {}`, `{"a":`,
		strings.Repeat(`{"a":`, 70) + `1` + strings.Repeat(`}`, 70),
	} {
		_, err := Decode([]byte(s))
		if !errors.Is(err, &Error{Rule: RuleJSON}) {
			t.Errorf("Decode(%.40q) = %v, want a RuleJSON error", s, err)
		}
	}
}

func TestCheckPatch(t *testing.T) {
	deep := func(n int) string { // n levels of objects, the section included
		return strings.Repeat(`{"a":`, n) + `1` + strings.Repeat(`}`, n)
	}
	cases := []struct {
		patch string
		rule  Rule
	}{
		{`{"ok":1,"nested":{"x":"y"},"del":null,"arr":[1,"a",true]}`, ""},
		{`{"a.b":1}`, RuleKey},
		{`{"$a":1}`, RuleKey},
		{`{"a b":1}`, RuleKey},
		{"{\"a\\u0001\":1}", RuleKey},
		{"{\"a\\u0085\":1}", RuleKey},
		{`{"":1}`, RuleKey},
		{`{"` + strings.Repeat("k", MaxKeyBytes+1) + `":1}`, RuleKey},
		{`{"` + strings.Repeat("k", MaxKeyBytes) + `":1}`, ""},
		{`{"s":"` + strings.Repeat("x", MaxStringBytes+1) + `"}`, RuleString},
		{`{"s":"` + strings.Repeat("x", MaxStringBytes) + `"}`, ""},
		{`{"i":4503599627370495}`, ""},
		{`{"i":-4503599627370496}`, ""},
		{`{"i":4503599627370496}`, RuleInteger},
		{`{"i":-4503599627370497}`, RuleInteger},
		{`{"f":1e400}`, RuleInteger},
		{`{"f":1.5e10}`, ""},
		{deep(MaxDepth), ""},
		{deep(MaxDepth + 1), RuleDepth},
		{`{"a":` + strings.Repeat(`[`, MaxDepth) + strings.Repeat(`]`, MaxDepth) + `}`, RuleDepth},
	}
	for _, c := range cases {
		err := CheckPatch(mustDecode(t, c.patch))
		if c.rule == "" {
			if err != nil {
				t.Errorf("CheckPatch(%.60s) = %v, want nil", c.patch, err)
			}
			continue
		}
		var te *Error
		if !errors.As(err, &te) || te.Rule != c.rule {
			t.Errorf("CheckPatch(%.60s) = %v, want rule %s", c.patch, err, c.rule)
		}
	}
}

func TestSize(t *testing.T) {
	cases := []struct {
		doc  string
		want int
	}{
		{`{}`, 0},
		{`{"ab":"xyz"}`, 5},
		{`{"n":1}`, 9},
		{`{"b":true}`, 5},
		{`{"o":{"k":"v","n":2.5}}`, 1 + 2 + 9},
		{`{"$version":5,"$metadata":{"x":"y"},"a":"b"}`, 2},
		{`{"é":"ü"}`, 2},
		{"{\"t\":\"a\\u0007b\"}", 3},
		{`{"a":[1,"xy",false]}`, 1 + 8 + 2 + 4},
	}
	for _, c := range cases {
		if got := Size(mustDecode(t, c.doc)); got != c.want {
			t.Errorf("Size(%s) = %d, want %d", c.doc, got, c.want)
		}
	}
}

func TestApplySizeLimit(t *testing.T) {
	doc := map[string]any{}
	chunk := strings.Repeat("x", 4000)
	var err error
	for i := 0; i < 9; i++ {
		key := "k" + string(rune('0'+i))
		next, e := Apply(Tags, doc, map[string]any{key: chunk})
		if e != nil {
			err = e
			break
		}
		doc = next
	}
	if !errors.Is(err, &Error{Rule: RuleSize}) {
		t.Fatalf("tags grew past 8 KB without a size error: %v (size %d)", err, Size(doc))
	}
	if Size(doc) > MaxTagsSize {
		t.Fatalf("document over the limit was kept: %d", Size(doc))
	}
	if len(doc) != 2 {
		t.Fatalf("failed Apply changed the document: %d keys", len(doc))
	}
	// a reported section has room for the same content
	if _, err := Apply(Reported, doc, map[string]any{"k9": chunk}); err != nil {
		t.Fatalf("reported rejects 12 KB: %v", err)
	}
}

func TestEqualNumbers(t *testing.T) {
	if !Equal(json.Number("1"), json.Number("1.0")) {
		t.Fatal("1 != 1.0")
	}
	if Equal(json.Number("1"), "1") {
		t.Fatal("number equals string")
	}
}
