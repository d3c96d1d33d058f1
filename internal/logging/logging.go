// Package logging builds the zap loggers iothubby's programs share: console (for people) or
// JSON lines (for journald and log shippers), ISO 8601 timestamps, a level by name that can be
// changed while the program runs (Options.Level, a zap.AtomicLevel, for a reload).
//
// Under systemd (stderr is the journal stream named by $JOURNAL_STREAM, see UnderJournal), each
// line starts with its syslog priority in angle brackets (<3> error, <4> warn, <6> info,
// <7> debug) and carries no timestamp, since journald stamps every line itself: journald strips
// the prefix and files the line under that priority, so `journalctl -p warning` works.
package logging

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"

	"go.uber.org/zap"
	"go.uber.org/zap/buffer"
	"go.uber.org/zap/zapcore"
)

// Options select a logger's output.
type Options struct {
	// Level is debug, info, warn or error ("" is info).
	Level string
	// Format is console or json ("" is console).
	Format string
	// Journal writes for journald: syslog priority prefix, no timestamp.
	Journal bool
}

// New returns a logger writing to w. level is debug, info, warn or error ("" is info); format
// is console or json ("" is console).
func New(w io.Writer, level, format string) (*zap.Logger, error) {
	log, _, err := Build(w, Options{Level: level, Format: format})
	return log, err
}

// ParseLevel parses a level name ("" is info).
func ParseLevel(level string) (zapcore.Level, error) {
	if level == "" {
		return zapcore.InfoLevel, nil
	}
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return lvl, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	return lvl, nil
}

// Build returns a logger writing to w as o says, and its level, which the caller may change
// while the logger is in use (SetLevel).
func Build(w io.Writer, o Options) (*zap.Logger, zap.AtomicLevel, error) {
	lvl, err := ParseLevel(o.Level)
	if err != nil {
		return nil, zap.AtomicLevel{}, err
	}
	var enc zapcore.Encoder
	switch o.Format {
	case "", "console":
		ec := zap.NewDevelopmentEncoderConfig()
		ec.EncodeTime = zapcore.ISO8601TimeEncoder
		if o.Journal {
			ec.TimeKey = ""
		}
		enc = zapcore.NewConsoleEncoder(ec)
	case "json":
		ec := zap.NewProductionEncoderConfig()
		ec.EncodeTime = zapcore.ISO8601TimeEncoder
		if o.Journal {
			ec.TimeKey = ""
		}
		enc = zapcore.NewJSONEncoder(ec)
	default:
		return nil, zap.AtomicLevel{}, fmt.Errorf("log format %q: want console or json", o.Format)
	}
	if o.Journal {
		enc = &priorityEncoder{Encoder: enc, pool: buffer.NewPool()}
	}
	al := zap.NewAtomicLevelAt(lvl)
	return zap.New(zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(w)), al)), al, nil
}

// UnderJournal reports whether f (normally os.Stderr) is connected to the journal: systemd sets
// $JOURNAL_STREAM to "device:inode" of the stream it hands the service, and the variable alone
// is not enough, since a child process may inherit it with its stderr redirected elsewhere.
func UnderJournal(f *os.File) bool {
	v := os.Getenv("JOURNAL_STREAM")
	if v == "" || f == nil {
		return false
	}
	devS, inoS, ok := strings.Cut(v, ":")
	if !ok {
		return false
	}
	dev, err1 := strconv.ParseUint(devS, 10, 64)
	ino, err2 := strconv.ParseUint(inoS, 10, 64)
	if err1 != nil || err2 != nil {
		return false
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	return uint64(st.Dev) == dev && uint64(st.Ino) == ino //nolint:unconvert // widths differ by platform
}

// Priority returns the syslog priority prefix journald reads for a zap level.
func Priority(l zapcore.Level) string {
	switch {
	case l <= zapcore.DebugLevel:
		return "<7>"
	case l == zapcore.InfoLevel:
		return "<6>"
	case l == zapcore.WarnLevel:
		return "<4>"
	case l == zapcore.ErrorLevel:
		return "<3>"
	default: // DPanic, Panic, Fatal
		return "<2>"
	}
}

// priorityEncoder prefixes each encoded entry with its syslog priority.
type priorityEncoder struct {
	zapcore.Encoder
	pool buffer.Pool
}

func (e *priorityEncoder) Clone() zapcore.Encoder {
	return &priorityEncoder{Encoder: e.Encoder.Clone(), pool: e.pool}
}

func (e *priorityEncoder) EncodeEntry(ent zapcore.Entry, fields []zapcore.Field) (*buffer.Buffer, error) {
	b, err := e.Encoder.EncodeEntry(ent, fields)
	if err != nil {
		return nil, err
	}
	out := e.pool.Get()
	out.AppendString(Priority(ent.Level))
	_, _ = out.Write(b.Bytes())
	b.Free()
	return out, nil
}
