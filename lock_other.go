//go:build !unix

package actiond

import "errors"

// LockFile is the name of the lock file under a root.
const LockFile = "lock"

// ErrRootInUse is returned by LockRoot when another process holds the root.
var ErrRootInUse = errors.New("root is in use by another actiond process")

// LockRoot is a no-op where flock is unavailable.
func LockRoot(root string) (func() error, error) { return func() error { return nil }, nil }
