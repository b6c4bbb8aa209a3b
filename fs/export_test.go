//go:build linux

package fs

// Nodes is how many inodes the mount's server keeps.
func (m *Mount) Nodes() int { return m.fs.Nodes() }

// StoresSmallInputs reports whether this kernel gets small inputs stored in
// its page cache at their first open.
func StoresSmallInputs() bool { return storeZeroesTail() }
