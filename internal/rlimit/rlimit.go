// Package rlimit raises the process's open-file soft limit (RLIMIT_NOFILE) to its hard limit and
// says in the log when that limit caps what the program was asked to do. Every device connection,
// on either side, holds one file descriptor: a hub simulator holding 10,000 devices or an agent
// running a fleet of them needs a limit above the common default of 1,024.
//
// Go raises the soft limit itself at start on Linux since Go 1.19; RaiseNoFile does it explicitly
// (so it holds for any runtime and after anything lowered it) and reports the figure.
package rlimit

import (
	"go.uber.org/zap"
)

// Reserve is the descriptors a program keeps for things other than its connections: standard
// streams, listeners, the state database, log files, the runtime's poller.
const Reserve = 64

// RaiseNoFile raises the open-file soft limit to the hard limit and returns the soft limit in
// effect afterwards. It logs the limit at debug level, and a warning when raising fails (err is
// then non-nil and soft is the unchanged limit, or 0 when it could not be read).
func RaiseNoFile(log *zap.Logger) (soft uint64, err error) {
	before, hard, err := get()
	if err != nil {
		log.Warn("cannot read the open-file limit", zap.Error(err))
		return 0, err
	}
	if before >= hard {
		log.Debug("open-file limit", zap.Uint64("soft", before), zap.Uint64("hard", hard))
		return before, nil
	}
	if err := set(hard, hard); err != nil {
		log.Warn("cannot raise the open-file soft limit to the hard limit",
			zap.Uint64("soft", before), zap.Uint64("hard", hard), zap.Error(err))
		return before, err
	}
	log.Debug("open-file soft limit raised to the hard limit", zap.Uint64("was", before), zap.Uint64("soft", hard))
	return hard, nil
}

// Caps reports whether soft (from RaiseNoFile) leaves fewer than want descriptors after Reserve,
// and if so logs a warning naming what is capped ("device connections") and the figures, with
// the way to raise the hard limit. A soft limit of 0 (unknown) caps nothing.
func Caps(log *zap.Logger, soft uint64, want int, what string) bool {
	if soft == 0 || want <= 0 {
		return false
	}
	avail := int64(soft) - Reserve
	if avail >= int64(want) {
		return false
	}
	log.Warn("the open-file limit caps "+what+": raise the hard limit (ulimit -Hn, systemd LimitNOFILE=)",
		zap.Int("asked", want), zap.Int64("possible", max(avail, 0)), zap.Uint64("open_file_limit", soft))
	return true
}
