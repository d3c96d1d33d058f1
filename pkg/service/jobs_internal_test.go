package service

import (
	"encoding/json"
	"testing"
)

func TestQuoteString(t *testing.T) {
	for in, want := range map[string]string{"job-1": "'job-1'", "it's": `'it\'s'`, `a\b`: `'a\\b'`} {
		if got := QuoteString(in); got != want {
			t.Errorf("QuoteString(%q) = %s, want %s", in, got, want)
		}
	}
}

func TestWithWildcardETag(t *testing.T) {
	got, err := withWildcardETag(json.RawMessage(`{"tags":{"a":1}}`))
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != `{"etag":"*","tags":{"a":1}}` {
		t.Errorf("got %s", got)
	}
	kept, err := withWildcardETag(json.RawMessage(`{"etag":"x"}`))
	if err != nil || string(kept) != `{"etag":"x"}` {
		t.Errorf("an explicit etag was changed: %s %v", kept, err)
	}
	for _, bad := range []string{`[1]`, `null`, `"x"`, ``} {
		if _, err := withWildcardETag(json.RawMessage(bad)); err == nil {
			t.Errorf("%q accepted as a twin patch", bad)
		}
	}
}

func TestCloudToDeviceMethodSendsNullPayload(t *testing.T) {
	b, _ := json.Marshal(CloudToDeviceMethod{MethodName: "reboot", ResponseTimeoutInSeconds: 30})
	if string(b) != `{"methodName":"reboot","payload":null,"responseTimeoutInSeconds":30}` {
		t.Errorf("got %s", b)
	}
}
