package hubsim

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/pki"
)

// LockFile is the file in the state directory that one running hubsim holds an exclusive lock
// on for its lifetime; its content is that hubsim's PID.
const LockFile = "hubsim.lock"

// privateFiles are the state files that hold secrets (keys, the databases with device keys and
// policies, endpoints.json with the service connection string).
var privateFiles = []string{pki.CAKeyFile, pki.ServerKeyFile, DatabaseFile, DPSDatabaseFile, EndpointsFile}

// tightenModes makes private state files that exist with group or other permission bits mode
// 0600, and says so: files copied or restored with a loose umask are fixed, not kept silently.
func tightenModes(dir string, log *zap.Logger) error {
	for _, name := range privateFiles {
		path := filepath.Join(dir, name)
		fi, err := os.Lstat(path)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("hubsim: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("hubsim: state file %s is not a regular file (%s)", path, fi.Mode().Type())
		}
		if fi.Mode().Perm()&0o077 == 0 {
			continue
		}
		if err := os.Chmod(path, 0o600); err != nil {
			return fmt.Errorf("hubsim: state file %s has loose mode %#o and could not be made 0600: %w", path, fi.Mode().Perm(), err)
		}
		log.Warn(LogModeTightened, zap.String("file", path), zap.String("was", fmt.Sprintf("%#o", fi.Mode().Perm())))
	}
	return nil
}

// LogModeTightened is logged for each private state file whose loose mode was fixed.
const LogModeTightened = "state file readable by others: mode set to 0600"

// ErrStateDirInUse is returned by Start when another hubsim holds the state directory.
var ErrStateDirInUse = errors.New("hubsim: state directory in use by another hubsim")

// lockStateDir takes the state directory's lock before anything in it is read or written, so a
// second hubsim on the same directory is refused before it can touch the CA, the server
// certificate or the databases of the one that runs. The lock is an flock: the kernel releases it
// when the process dies, SIGKILL included, so a stale lock file never blocks a restart.
func lockStateDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, LockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("hubsim: state directory lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b := make([]byte, 32)
		n, _ := f.ReadAt(b, 0)
		_ = f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			pid := strings.TrimSpace(string(b[:n]))
			if _, perr := strconv.Atoi(pid); perr != nil {
				pid = "unknown"
			}
			return nil, fmt.Errorf("%w: %s (pid %s)", ErrStateDirInUse, dir, pid)
		}
		return nil, fmt.Errorf("hubsim: state directory lock %s: %w", path, err)
	}
	if err := f.Truncate(0); err == nil {
		_, err = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("hubsim: state directory lock %s: %w", path, err)
		}
	}
	return f, nil
}
