package broker

import (
	"context"
	"log/slog"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// slogToZap forwards mochi's slog records to zap. mochi's Info and Warn records (listener
// attached, "error processing packet" for every refused client) duplicate what hubsim's hooks
// log with reasons, so they are demoted to Debug; Error stays Error. Attributes that carry packets
// or wills ("pk", "packet", "will") are dropped: they can hold payloads and passwords.
type slogToZap struct {
	log   *zap.Logger
	attrs []zap.Field
}

func newSlog(log *zap.Logger) *slog.Logger { return slog.New(&slogToZap{log: log}) }

func level(l slog.Level) zapcore.Level {
	if l >= slog.LevelError {
		return zapcore.ErrorLevel
	}
	return zapcore.DebugLevel
}

func (h *slogToZap) Enabled(_ context.Context, l slog.Level) bool {
	return h.log.Core().Enabled(level(l))
}

func (h *slogToZap) Handle(_ context.Context, r slog.Record) error {
	ce := h.log.Check(level(r.Level), r.Message)
	if ce == nil {
		return nil
	}
	fields := append([]zap.Field(nil), h.attrs...)
	r.Attrs(func(a slog.Attr) bool {
		if f, ok := field(a); ok {
			fields = append(fields, f)
		}
		return true
	})
	ce.Write(fields...)
	return nil
}

func field(a slog.Attr) (zap.Field, bool) {
	switch a.Key {
	case "pk", "packet", "will", "":
		return zap.Field{}, false
	}
	return zap.Any(a.Key, a.Value.Resolve().Any()), true
}

func (h *slogToZap) WithAttrs(as []slog.Attr) slog.Handler {
	n := &slogToZap{log: h.log, attrs: append([]zap.Field(nil), h.attrs...)}
	for _, a := range as {
		if f, ok := field(a); ok {
			n.attrs = append(n.attrs, f)
		}
	}
	return n
}

func (h *slogToZap) WithGroup(name string) slog.Handler {
	return &slogToZap{log: h.log.Named(name), attrs: h.attrs}
}
