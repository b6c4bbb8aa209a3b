// Package cgroupv2 holds the cgroup v2 operations that both the sandbox
// (its helpers' cgroups) and the VM guest's init (its static-keys cgroup)
// need.
package cgroupv2

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// EnableControllers enables controllers for the children of cgroup dir
// (cgroup.subtree_control), skipping those already enabled. It stops at the
// first one the kernel refuses (EBUSY: dir has processes and is not the
// root; ENOENT: dir does not offer it), wrapping that error.
func EnableControllers(dir string, controllers []string) error {
	file := filepath.Join(dir, "cgroup.subtree_control")
	data, _ := os.ReadFile(file)
	enabled := strings.Fields(string(data))
	for _, c := range controllers {
		if slices.Contains(enabled, c) {
			continue
		}
		if err := os.WriteFile(file, []byte("+"+c), 0); err != nil {
			return err
		}
	}
	return nil
}
