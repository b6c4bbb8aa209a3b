package cgroupv2

import (
	"os"
	"path/filepath"
	"testing"
)

// A plain directory stands in for the cgroup: each write replaces the
// file, so what is left is the last controller asked for.
func TestEnableControllersSkipsEnabled(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "cgroup.subtree_control")
	if err := os.WriteFile(file, []byte("memory pids\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := EnableControllers(dir, []string{"memory", "cpu", "pids"}); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(file); string(got) != "+cpu" {
		t.Errorf("subtree_control = %q; want only cpu written", got)
	}
	if err := EnableControllers(filepath.Join(dir, "missing"), []string{"cpu"}); err == nil {
		t.Error("no error for a cgroup that does not exist")
	}
}
