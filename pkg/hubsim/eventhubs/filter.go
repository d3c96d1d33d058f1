package eventhubs

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Position is where a receiver starts in a partition, as its selector filter says (the Event
// Hubs SDKs' getEventPositionFilter, protocol-amqp.md §4.4).
type Position struct {
	Kind PositionKind
	// Value is the offset or sequence number (Offset, Sequence); Offset -1 is the start.
	Value int64
	// Time is the enqueued time (Enqueued).
	Time time.Time
	// Inclusive: >= rather than >.
	Inclusive bool
}

// PositionKind says what a Position compares.
type PositionKind int

const (
	// Latest: only events enqueued after the receiver attached ('@latest').
	Latest PositionKind = iota
	// Offset: events after (or at) an offset.
	Offset
	// Sequence: events after (or at) a sequence number.
	Sequence
	// Enqueued: events enqueued after a time (milliseconds).
	Enqueued
)

// Earliest is the position of everything retained.
var Earliest = Position{Kind: Offset, Value: -1}

// maxFilter bounds a filter expression.
const maxFilter = 512

// ErrFilter wraps every filter parse error.
var ErrFilter = errors.New("eventhubs: unsupported selector filter")

// ParseFilter parses the selector filter of a partition receiver:
//
//	amqp.annotation.x-opt-offset > '-1'              (earliest)
//	amqp.annotation.x-opt-offset > '@latest'         (latest)
//	amqp.annotation.x-opt-offset >= '<offset>'
//	amqp.annotation.x-opt-sequence-number > '<n>'    (or >=)
//	amqp.annotation.x-opt-enqueued-time > '<ms>'     (or >=)
//	amqp.annotation.x-opt-enqueuedtimeutc > <ms>     (the C SDK test tool: no quotes)
//
// Whitespace around the operator is optional; the annotation name is matched without regard to
// case. Anything else is an error matching ErrFilter.
func ParseFilter(s string) (Position, error) {
	if len(s) > maxFilter {
		return Position{}, fmt.Errorf("%w: %d bytes", ErrFilter, len(s))
	}
	expr := strings.TrimSpace(s)
	const prefix = "amqp.annotation."
	if len(expr) < len(prefix) || !strings.EqualFold(expr[:len(prefix)], prefix) {
		return Position{}, fmt.Errorf("%w: %q does not compare an amqp.annotation", ErrFilter, s)
	}
	expr = expr[len(prefix):]
	i := strings.IndexAny(expr, " \t><=")
	if i <= 0 {
		return Position{}, fmt.Errorf("%w: %q has no comparison", ErrFilter, s)
	}
	name := strings.ToLower(expr[:i])
	rest := strings.TrimLeft(expr[i:], " \t")
	var p Position
	switch {
	case strings.HasPrefix(rest, ">="):
		p.Inclusive, rest = true, rest[2:]
	case strings.HasPrefix(rest, ">"):
		rest = rest[1:]
	default:
		return Position{}, fmt.Errorf("%w: %q: only > and >= are supported", ErrFilter, s)
	}
	val := strings.TrimSpace(rest)
	quoted := len(val) >= 2 && val[0] == '\'' && val[len(val)-1] == '\''
	if quoted {
		val = val[1 : len(val)-1]
	}
	if val == "" || strings.ContainsAny(val, "' \t") {
		return Position{}, fmt.Errorf("%w: %q: bad value", ErrFilter, s)
	}
	num := func() (int64, error) {
		n, err := strconv.ParseInt(val, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%w: %q: %q is not an integer", ErrFilter, s, val)
		}
		return n, nil
	}
	switch name {
	case "x-opt-offset":
		if !quoted {
			return Position{}, fmt.Errorf("%w: %q: the offset must be quoted", ErrFilter, s)
		}
		if val == "@latest" {
			if p.Inclusive {
				return Position{}, fmt.Errorf("%w: %q: @latest with >=", ErrFilter, s)
			}
			return Position{Kind: Latest}, nil
		}
		n, err := num()
		if err != nil {
			return Position{}, err
		}
		if n < -1 {
			return Position{}, fmt.Errorf("%w: %q: negative offset", ErrFilter, s)
		}
		p.Kind, p.Value = Offset, n
	case "x-opt-sequence-number":
		if !quoted {
			return Position{}, fmt.Errorf("%w: %q: the sequence number must be quoted", ErrFilter, s)
		}
		n, err := num()
		if err != nil {
			return Position{}, err
		}
		if n < -1 {
			return Position{}, fmt.Errorf("%w: %q: negative sequence number", ErrFilter, s)
		}
		p.Kind, p.Value = Sequence, n
	case "x-opt-enqueued-time", "x-opt-enqueuedtimeutc":
		n, err := num()
		if err != nil {
			return Position{}, err
		}
		if n < 0 || n > 253402300799999 { // year 9999
			return Position{}, fmt.Errorf("%w: %q: time out of range", ErrFilter, s)
		}
		p.Kind, p.Time = Enqueued, time.UnixMilli(n).UTC()
	default:
		return Position{}, fmt.Errorf("%w: %q: annotation %q", ErrFilter, s, name)
	}
	return p, nil
}

// String renders p as the filter the Event Hubs SDKs send.
func (p Position) String() string {
	op := " > "
	if p.Inclusive {
		op = " >= "
	}
	switch p.Kind {
	case Latest:
		return "amqp.annotation.x-opt-offset > '@latest'"
	case Offset:
		return "amqp.annotation.x-opt-offset" + op + "'" + strconv.FormatInt(p.Value, 10) + "'"
	case Sequence:
		return "amqp.annotation.x-opt-sequence-number" + op + "'" + strconv.FormatInt(p.Value, 10) + "'"
	default:
		return "amqp.annotation.x-opt-enqueued-time" + op + "'" + strconv.FormatInt(p.Time.UnixMilli(), 10) + "'"
	}
}
