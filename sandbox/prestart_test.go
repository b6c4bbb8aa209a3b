//go:build linux

package sandbox_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPrestartedHelpersSeeLaterMounts: helpers are started before their
// actions, so an execroot that is a mount made after that (as actiondfs
// makes one per action) must still be what the action sees, with its
// writable directories, for several actions in a row (spares and their
// replacements alike).
func TestPrestartedHelpersSeeLaterMounts(t *testing.T) {
	sb := newSandbox(t)
	time.Sleep(200 * time.Millisecond) // let the spares start
	for i := range 4 {
		root := mountedExecRoot(t)
		if err := os.Mkdir(filepath.Join(root, "out"), 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(root, "in.txt"), "mounted later\n", 0o444)
		s := shSpec(t, root, `cat in.txt && echo written > out/o.txt && (echo x > in2.txt) 2>/dev/null; cat /proc/self/cgroup`)
		stdout := mustSucceed(t, sb, s)
		lines := strings.Split(strings.TrimSpace(stdout), "\n")
		if lines[0] != "mounted later" {
			t.Fatalf("action %d read %q from the execroot, want the mount made after the sandbox started", i, lines[0])
		}
		if b, err := os.ReadFile(filepath.Join(root, "out", "o.txt")); err != nil || string(b) != "written\n" {
			t.Errorf("action %d: output %q, %v", i, b, err)
		}
		if _, err := os.Stat(filepath.Join(root, "in2.txt")); err == nil {
			t.Errorf("action %d wrote outside its writable directories", i)
		}
		// The command's cgroup namespace is rooted at its own cgroups: it
		// learns nothing of the host's hierarchy.
		for _, l := range lines[1:] {
			if !strings.HasSuffix(l, ":/") {
				t.Errorf("action %d sees cgroup %q, want its namespace root /", i, l)
			}
		}
	}
}

// mountedExecRoot makes an empty execroot that is a mount of its own (a
// tmpfs, unmounted when the test ends), as actiondfs execroots are.
func mountedExecRoot(t *testing.T) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "execroot")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", root, "tmpfs", 0, "mode=0755"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(root, unix.MNT_DETACH) })
	return root
}
