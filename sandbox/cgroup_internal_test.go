//go:build linux

package sandbox

import (
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/actiond/actiond/internal/testutil"
)

// TestStaleHelperCgroupsAreRemoved: the empty cgroups of helpers whose
// server was killed (and so could not remove them) go when the next
// sandbox starts; those of a live process stay.
func TestStaleHelperCgroupsAreRemoved(t *testing.T) {
	testutil.RequireRoot(t)
	m := newCgroupManager(slog.New(slog.NewTextHandler(io.Discard, nil)))
	parent := m.v2
	for _, dir := range m.v1 {
		parent = dir
	}
	testutil.Require(t, parent != "", "a cgroup hierarchy this process can make cgroups in")
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(parent, helperCgroupName(gone.Process.Pid, 1))
	live := filepath.Join(parent, helperCgroupName(os.Getppid(), 1<<40))
	other := filepath.Join(parent, "actiond-not-a-helper")
	for _, dir := range []string{stale, live, other} {
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(dir) })
	}
	m.removeStale()
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("the cgroup of a helper of a process that is gone is still there (%v)", err)
	}
	for _, dir := range []string{live, other} {
		if _, err := os.Stat(dir); err != nil {
			t.Errorf("%s was removed: %v", dir, err)
		}
	}
}
