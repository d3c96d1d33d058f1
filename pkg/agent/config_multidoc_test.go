package agent

import (
	"errors"
	"strings"
	"testing"
)

func TestParseConfigRefusesSecondDocument(t *testing.T) {
	for _, tc := range []struct{ name, yaml, want string }{
		{"two documents", "deviceId: d1\n---\ntelemetry: {interval: 5s}\n", "second YAML document starts at line 2"},
		{"empty second", "deviceId: d1\n---\n# nothing\n---\nx: 1\n", "second YAML document"},
		{"garbage after", "deviceId: d1\n---\n[unclosed\n", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.yaml))
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ParseConfig: %v, want ErrConfig saying %q", err, tc.want)
			}
		})
	}
	for _, ok := range []string{"", "deviceId: d1\n", "---\ndeviceId: d1\n", "deviceId: d1\n...\n"} {
		if _, err := ParseConfig([]byte(ok)); err != nil {
			t.Errorf("ParseConfig(%q): %v", ok, err)
		}
	}
}
