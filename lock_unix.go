//go:build unix

package actiond

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// LockFile is the name of the lock file under a root. A server holds an
// exclusive flock on it for as long as it is open, so two servers, or a
// server and `actiond cas verify`, never share a root.
const LockFile = "lock"

// ErrRootInUse is returned by LockRoot when another process holds the root.
var ErrRootInUse = errors.New("root is in use by another actiond process")

// LockRoot takes the exclusive lock on root (creating root/lock), without
// waiting. The returned function releases it.
func LockRoot(root string) (func() error, error) {
	p := filepath.Join(root, LockFile)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("lock %s: %w", p, ErrRootInUse)
		}
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	return f.Close, nil
}
