package fleet

import (
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// fixedClock is a zapcore.Clock that always says t, so the sampler's window never turns.
type fixedClock struct{ t time.Time }

func (c fixedClock) Now() time.Time                         { return c.t }
func (c fixedClock) NewTicker(d time.Duration) *time.Ticker { return time.NewTicker(d) }

// Device loggers made with With on the fleet's core write their own fields, then the line's,
// and the wrapped sampler still decides which lines are written.
func TestFieldsCore(t *testing.T) {
	obs, logs := observer.New(zap.InfoLevel)
	base := zap.New(obs, zap.WithClock(fixedClock{time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)})).
		WithOptions(zap.WrapCore(func(core zapcore.Core) zapcore.Core {
			return &fieldsCore{Core: zapcore.NewSamplerWithOptions(core, time.Second, 2, 1000)}
		}))
	a := base.With(zap.String("device", "a"))
	b := base.With(zap.String("device", "b")).Named("twin").With(zap.String("method", "m"))
	if fc, ok := a.Core().(*fieldsCore); !ok || len(fc.fields) != 1 {
		t.Fatalf("With did not keep the field in a fieldsCore: %#v", a.Core())
	}
	a.Info("hello", zap.Int("n", 1))
	b.Info("other", zap.Int("n", 2))
	a.Debug("below the level")
	for range 5 {
		a.Info("repeated") // the sampler lets the first 2 of a message through in its window
	}
	base.Info("fleet line")

	got := logs.AllUntimed()
	want := []struct {
		msg    string
		fields []string
	}{
		{"hello", []string{"device", "n"}},
		{"other", []string{"device", "method", "n"}},
		{"repeated", []string{"device"}},
		{"repeated", []string{"device"}},
		{"fleet line", nil},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d lines, want %d: %+v", len(got), len(want), got)
	}
	for i, w := range want {
		if got[i].Message != w.msg || len(got[i].Context) != len(w.fields) {
			t.Fatalf("line %d: %q with %v, want %q with fields %v", i, got[i].Message, got[i].Context, w.msg, w.fields)
		}
		for j, k := range w.fields {
			if got[i].Context[j].Key != k {
				t.Fatalf("line %d field %d is %q, want %q (%v)", i, j, got[i].Context[j].Key, k, got[i].Context)
			}
		}
	}
	if dev := got[1].ContextMap()["device"]; dev != "b" || got[1].LoggerName != "twin" {
		t.Fatalf("line 1: device %v logger %q, want b and twin", dev, got[1].LoggerName)
	}
	if dev := got[0].ContextMap()["device"]; dev != "a" {
		t.Fatalf("line 0: device %v, want a", dev)
	}
}
