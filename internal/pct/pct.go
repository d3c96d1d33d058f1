// Package pct is the percent-encoding Azure IoT's wire formats share: SAS token fields and MQTT
// property bags. Encoding is JavaScript's encodeURIComponent plus !'()* with upper-case hex (what
// Microsoft's Node SDK sends); decoding accepts either hex case and, unlike query-string
// decoding, leaves '+' as '+' (base64 signatures contain it).
package pct

import (
	"errors"
	"fmt"
	"strings"
)

// ErrEscape is wrapped by Decode's errors.
var ErrEscape = errors.New("invalid percent escape")

// Encode escapes every byte but ASCII letters, digits and - _ . ~.
func Encode(s string) string {
	var b strings.Builder
	b.Grow(len(s) + len(s)/4)
	Append(&b, s)
	return b.String()
}

// Append writes the encoding of s to b.
func Append(b *strings.Builder, s string) {
	const hex = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '-' || c == '_' || c == '.' || c == '~' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
}

// Decode undoes one level of percent-encoding. It does not check that the result is UTF-8.
func Decode(s string) (string, error) {
	if !strings.Contains(s, "%") {
		return s, nil
	}
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '%' {
			out = append(out, c)
			continue
		}
		if i+2 >= len(s) {
			return "", fmt.Errorf("%w: truncated", ErrEscape)
		}
		hi, ok1 := unhex(s[i+1])
		lo, ok2 := unhex(s[i+2])
		if !ok1 || !ok2 {
			return "", fmt.Errorf("%w %q", ErrEscape, s[i:i+3])
		}
		out = append(out, hi<<4|lo)
		i += 2
	}
	return string(out), nil
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}
