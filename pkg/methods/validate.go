package methods

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"unicode/utf8"
)

// Payload limits: IoT Hub caps a direct-method payload at 128 KB each way, and twin documents at
// a depth of 10; method payloads are held to the same depth.
const (
	MaxPayload = 128 * 1024
	MaxDepth   = 10
)

// ErrInvalidPayload is wrapped by every ValidatePayload error.
var ErrInvalidPayload = errors.New("methods: invalid payload")

// ValidatePayload checks a method payload before any handler sees it: at most maxSize bytes,
// valid UTF-8, one well-formed JSON value (an empty payload counts as null), numbers that fit a
// float64, nesting no deeper than maxDepth, and no object with the same key twice (encoding/json would silently keep the
// last one). maxSize and maxDepth <= 0 mean MaxPayload and MaxDepth.
func ValidatePayload(b []byte, maxSize, maxDepth int) error {
	if maxSize <= 0 {
		maxSize = MaxPayload
	}
	if maxDepth <= 0 {
		maxDepth = MaxDepth
	}
	if len(b) > maxSize {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrInvalidPayload, len(b), maxSize)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return nil
	}
	if !utf8.Valid(b) {
		return fmt.Errorf("%w: not valid UTF-8", ErrInvalidPayload)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	// Each open container: for objects, the keys seen so far and whether a key comes next.
	type frame struct {
		keys    map[string]struct{}
		wantKey bool
	}
	var stack []frame
	values := 0
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			if len(stack) > 0 {
				return fmt.Errorf("%w: truncated JSON", ErrInvalidPayload)
			}
			break
		}
		if err != nil {
			return fmt.Errorf("%w: %v", ErrInvalidPayload, err)
		}
		if len(stack) == 0 {
			if values++; values > 1 {
				return fmt.Errorf("%w: more than one JSON value", ErrInvalidPayload)
			}
		}
		if d, ok := tok.(json.Delim); ok {
			switch d {
			case '{', '[':
				if len(stack) >= maxDepth {
					return fmt.Errorf("%w: nested deeper than %d", ErrInvalidPayload, maxDepth)
				}
				f := frame{}
				if d == '{' {
					f = frame{keys: map[string]struct{}{}, wantKey: true}
				}
				stack = append(stack, f)
			case '}', ']':
				stack = stack[:len(stack)-1]
				if len(stack) > 0 && stack[len(stack)-1].keys != nil {
					stack[len(stack)-1].wantKey = true
				}
			}
			continue
		}
		if n, ok := tok.(json.Number); ok {
			if _, err := strconv.ParseFloat(string(n), 64); err != nil {
				return fmt.Errorf("%w: number %s out of range", ErrInvalidPayload, clip(string(n)))
			}
		}
		if len(stack) == 0 {
			continue
		}
		top := &stack[len(stack)-1]
		if top.keys == nil { // an array element
			continue
		}
		if top.wantKey {
			key, _ := tok.(string)
			if _, dup := top.keys[key]; dup {
				return fmt.Errorf("%w: duplicate key %q", ErrInvalidPayload, clip(key))
			}
			top.keys[key] = struct{}{}
			top.wantKey = false
		} else {
			top.wantKey = true
		}
	}
	return nil
}

func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
