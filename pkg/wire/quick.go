package wire

import "strings"

// Quick is a topic read by ParseQuick: the fields of Topic that its kinds use, small enough to
// be returned in registers.
type Quick struct {
	// Kind is KindTwinResponse, KindTwinDesired or KindMethodRequest, or KindUnknown when the
	// topic is not one ParseQuick reads (use Parse).
	Kind       Kind
	HasVersion bool
	Status     int
	Version    int64
	RequestID  string
	Method     string
}

// Topic returns q as the Topic that Parse gives for the same topic name.
func (q Quick) Topic() Topic {
	return Topic{Kind: q.Kind, RequestID: q.RequestID, Status: q.Status, Version: q.Version,
		HasVersion: q.HasVersion, Method: q.Method}
}

// ParseQuick reads the topics a device receives most (twin responses, desired-property
// notifications and direct-method requests) in the plain form IoT Hub sends them: only $rid and
// $version parameters, each at most once, no percent escapes, ASCII. It does not allocate and
// needs little stack, for callers on a goroutine whose stack should stay small (paho's router).
// Its Kind is KindUnknown for every other topic, including some that Parse accepts (escaped or
// unknown parameters, a signed $version, other kinds): call Parse then. Otherwise q.Topic() is
// exactly what Parse returns for topic (FuzzParseQuick holds it to that).
func ParseQuick(topic string) (q Quick) {
	rest, found := strings.CutPrefix(topic, "$iothub/")
	if !found || len(topic) > MaxTopicLength {
		return Quick{}
	}
	i := strings.Index(rest, "/?")
	if i < 0 {
		return Quick{}
	}
	path := rest[:i]
	rid, hasRID, version, hasVersion, ok := quickParams(rest[i+2:])
	if !ok {
		return Quick{}
	}
	switch {
	case len(path) == len("twin/res/")+3 && path[:len("twin/res/")] == "twin/res/":
		status, ok := quickStatus(path[len("twin/res/"):])
		if !ok || rid == "" {
			return Quick{}
		}
		q = Quick{Kind: KindTwinResponse, Status: status, Version: version, HasVersion: hasVersion}
	case path == "twin/PATCH/properties/desired":
		if !hasVersion {
			return Quick{}
		}
		q = Quick{Kind: KindTwinDesired, Version: version, HasVersion: true}
	case len(path) > len("methods/POST/") && path[:len("methods/POST/")] == "methods/POST/":
		name := path[len("methods/POST/"):]
		if !methodNameOK(name) || rid == "" {
			return Quick{}
		}
		q = Quick{Kind: KindMethodRequest, Method: name}
	default:
		return Quick{}
	}
	if hasRID {
		q.RequestID = rid
	}
	return q
}

// quickParams reads "$rid=a&$version=1" for ParseQuick: ok is false for any other parameter, a
// repeated one, a segment without '=', a '%' or a non-ASCII byte, or a $version that is not 1 to
// 18 decimal digits (so it cannot overflow).
func quickParams(q string) (rid string, hasRID bool, version int64, hasVersion bool, ok bool) {
	for q != "" {
		seg := q
		if i := strings.IndexByte(q, '&'); i >= 0 {
			seg, q = q[:i], q[i+1:]
		} else {
			q = ""
		}
		if seg == "" {
			continue
		}
		for i := 0; i < len(seg); i++ {
			if seg[i] == '%' || seg[i] >= 0x80 {
				return "", false, 0, false, false
			}
		}
		switch {
		case len(seg) >= len("$rid=") && seg[:len("$rid=")] == "$rid=" && !hasRID:
			rid, hasRID = seg[len("$rid="):], true
		case len(seg) >= len("$version=") && seg[:len("$version=")] == "$version=" && !hasVersion:
			v := seg[len("$version="):]
			if v == "" || len(v) > 18 {
				return "", false, 0, false, false
			}
			for i := 0; i < len(v); i++ {
				if v[i] < '0' || v[i] > '9' {
					return "", false, 0, false, false
				}
				version = version*10 + int64(v[i]-'0')
			}
			hasVersion = true
		default:
			return "", false, 0, false, false
		}
	}
	return rid, hasRID, version, hasVersion, true
}

// quickStatus reads a three-digit status of at least 100, as parseStatus accepts.
func quickStatus(s string) (int, bool) {
	n := 0
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
		n = n*10 + int(s[i]-'0')
	}
	return n, len(s) == 3 && n >= 100
}
