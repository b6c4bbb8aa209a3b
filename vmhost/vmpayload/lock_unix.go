//go:build unix

package vmpayload

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// lockDir takes dir/.lock exclusively (one build per directory at a
// time: make -j, parallel tests, two serve-vm starts), calling waiting
// when another process holds it.
func lockDir(dir string, waiting func()) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		waiting()
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", dir, err)
		}
	}
	return func() { f.Close() }, nil
}
