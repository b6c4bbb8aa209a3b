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

func openAnon(dir string) (*os.File, error) { return nil, errors.ErrUnsupported }

func linkAnon(f *os.File, dst string) error { return errors.ErrUnsupported }

func anonSupported(dir string) bool { return false }
