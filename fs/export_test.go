//go:build linux

package fs

// Nodes is how many inodes the mount's server keeps.
func (m *Mount) Nodes() int { return m.fs.Nodes() }
