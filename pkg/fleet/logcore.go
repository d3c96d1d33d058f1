package fleet

import "go.uber.org/zap/zapcore"

// fieldsCore is a zapcore.Core that keeps the fields given to With as they are and adds them to
// each entry it writes, encoding them only then. zap's own cores encode With's fields at once
// into a clone of their encoder, which a fleet's thousands of mostly quiet device loggers would
// each hold. The core it wraps decides (Check) whether an entry is written, sampling included.
type fieldsCore struct {
	zapcore.Core
	fields []zapcore.Field
}

// With returns a core that adds fs after the fields already kept.
func (c *fieldsCore) With(fs []zapcore.Field) zapcore.Core {
	if len(fs) == 0 {
		return c
	}
	all := make([]zapcore.Field, 0, len(c.fields)+len(fs))
	all = append(append(all, c.fields...), fs...)
	return &fieldsCore{Core: c.Core, fields: all}
}

// Check asks the wrapped core whether e is to be written and, if so, adds this core (so that
// Write adds the fields) instead of the wrapped one.
func (c *fieldsCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if len(c.fields) == 0 {
		return c.Core.Check(e, ce)
	}
	if !c.Core.Enabled(e.Level) || c.Core.Check(e, nil) == nil {
		return ce
	}
	return ce.AddCore(e, c)
}

// Write writes e with the kept fields before fs.
func (c *fieldsCore) Write(e zapcore.Entry, fs []zapcore.Field) error {
	all := make([]zapcore.Field, 0, len(c.fields)+len(fs))
	all = append(append(all, c.fields...), fs...)
	return c.Core.Write(e, all)
}
