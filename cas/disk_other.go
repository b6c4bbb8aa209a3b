//go:build !linux

package cas

import (
	"errors"
	"os"
)

// syncFSSupported reports whether syncFS works here.
const syncFSSupported = false

func syncFS(dir string) error { return errors.ErrUnsupported }

func writeBehind(f *os.File, off, n int64) {}
