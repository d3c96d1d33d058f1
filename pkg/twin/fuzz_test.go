package twin

import (
	"encoding/json"
	"errors"
	"testing"
)

// FuzzMerge: for any document and patch that decode, Merge leaves no null member behind, every
// non-null top-level patch member is in the result as patched, and untouched keys are kept.
func FuzzMerge(f *testing.F) {
	f.Add([]byte(`{"a":1,"b":{"c":2}}`), []byte(`{"b":{"c":null,"d":3},"e":null}`))
	f.Add([]byte(`{}`), []byte(`{"x":[1,2,{"y":null}]}`))
	f.Add([]byte(`{"a":{"b":{"c":{}}}}`), []byte(`{"a":{"b":5}}`))
	f.Fuzz(func(t *testing.T, docB, patchB []byte) {
		doc, err1 := Decode(docB)
		patch, err2 := Decode(patchB)
		if err1 != nil || err2 != nil {
			return
		}
		before := Clone(doc).(map[string]any)
		patchCopy := Clone(patch).(map[string]any)
		got := Merge(Clone(doc).(map[string]any), patch)
		if !Equal(patch, patchCopy) {
			t.Fatal("Merge modified the patch")
		}
		noNullMembers(t, got)
		for k, v := range before {
			if _, touched := patch[k]; !touched && !Equal(got[k], v) {
				t.Fatalf("untouched key %q changed", k)
			}
		}
		for k, v := range patch {
			switch pv := v.(type) {
			case nil:
				if _, ok := got[k]; ok {
					t.Fatalf("null did not delete %q", k)
				}
			case map[string]any:
				if _, ok := got[k].(map[string]any); !ok {
					t.Fatalf("object patch %q did not give an object", k)
				}
			default:
				if !Equal(got[k], pv) {
					t.Fatalf("%q = %v, want %v", k, got[k], pv)
				}
			}
		}
		// merging the same patch again changes nothing (idempotence)
		again := Merge(Clone(got).(map[string]any), patch)
		if !Equal(again, got) {
			t.Fatal("Merge is not idempotent")
		}
		// the result survives a JSON round trip through Decode
		b, err := json.Marshal(got)
		if err != nil {
			t.Fatal(err)
		}
		back, err := Decode(b)
		if err != nil || !Equal(back, got) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

func noNullMembers(t *testing.T, m map[string]any) {
	for k, v := range m {
		switch tv := v.(type) {
		case nil:
			t.Fatalf("null member %q left in the document", k)
		case map[string]any:
			noNullMembers(t, tv)
		}
	}
}

// FuzzLimits: the checks never panic, every error is a typed *Error, and whatever passes them
// really is within the limits.
func FuzzLimits(f *testing.F) {
	f.Add([]byte(`{"a.b":1}`))
	f.Add([]byte(`{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":1}}}}}}}}}}`))
	f.Add([]byte(`{"i":4503599627370496,"s":"x"}`))
	f.Add([]byte(`{"a":[[[[[[[[[[1]]]]]]]]]]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		doc, err := Decode(b)
		if err != nil {
			var te *Error
			if !errors.As(err, &te) {
				t.Fatalf("untyped error %T: %v", err, err)
			}
			return
		}
		err = CheckPatch(doc)
		if err != nil {
			var te *Error
			if !errors.As(err, &te) {
				t.Fatalf("untyped error %T: %v", err, err)
			}
			return
		}
		if d := depth(doc); d > MaxDepth {
			t.Fatalf("depth %d passed the check", d)
		}
		if _, err := Apply(Reported, nil, doc); err == nil && Size(doc) > MaxReportedSize {
			t.Fatal("oversized document passed Apply")
		}
	})
}

func depth(v any) int {
	switch t := v.(type) {
	case map[string]any:
		d := 0
		for _, x := range t {
			d = max(d, depth(x))
		}
		return d + 1
	case []any:
		d := 0
		for _, x := range t {
			d = max(d, depth(x))
		}
		return d + 1
	}
	return 0
}
