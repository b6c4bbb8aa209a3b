//go:build linux

package sandbox_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/actiond/actiond/internal/mountinfo"
	"github.com/actiond/actiond/internal/testutil"
	"golang.org/x/sys/unix"
)

// TestNoMountLeaksUnderSharedRoot: on a systemd host / is rshared, so a
// mount made under it (an actiondfs execroot) is in a peer group. The
// helper's copy of that tree must not stay a peer: its binds onto the
// execroot (writable directories) would propagate back to the host and
// leak one mount per action, keeping the FUSE server of each alive.
func TestNoMountLeaksUnderSharedRoot(t *testing.T) {
	if testutil.RunUnderSharedRoot(t) {
		return
	}
	sb := newSandbox(t)
	for i := range 4 {
		root := mountedExecRoot(t)
		if !shared(t, root) {
			t.Fatalf("the execroot mount %s is not shared: the test would prove nothing", root)
		}
		for _, d := range []string{"out", "out/sub", "pkg"} {
			if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		s := shSpec(t, root, `echo written > out/sub/o.txt`)
		s.WritableDirs = []string{"out", "out/sub", "pkg"}
		mustSucceed(t, sb, s)
		if got := testutil.MountsUnder(t, root); len(got) != 1 {
			t.Fatalf("after action %d, %d mounts leaked into the host under its execroot: %s", i, len(got)-1, strings.Join(got[1:], ", "))
		}
		if b, err := os.ReadFile(filepath.Join(root, "out", "sub", "o.txt")); err != nil || string(b) != "written\n" {
			t.Errorf("action %d: output %q, %v", i, b, err)
		}
	}
}

func shared(t *testing.T, point string) bool {
	t.Helper()
	entries, err := mountinfo.Read()
	if err != nil {
		t.Fatal(err)
	}
	for i := len(entries) - 1; i >= 0; i-- {
		if entries[i].Point == point {
			return entries[i].Shared()
		}
	}
	return false
}

// TestIdleHelpersDoNotPinHostMounts: a kept helper holds a copy of the
// host's mounts from when it was cloned. On a systemd host (/ rshared) a
// file system the host unmounts later must leave the helper's namespace
// too, or it stays in use (a USB disk could not be ejected) for as long as
// the helper waits for actions.
func TestIdleHelpersDoNotPinHostMounts(t *testing.T) {
	if testutil.RunUnderSharedRoot(t) {
		return
	}
	dir := filepath.Join(t.TempDir(), "disk")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	if !shared(t, dir) {
		t.Fatalf("%s is not shared: the test would prove nothing", dir)
	}
	sb := newSandbox(t) // its helpers are cloned with a copy of dir's mount
	mustSucceed(t, sb, shSpec(t, newExecRoot(t, false), "true"))
	helpers := ourHelpers(t)
	if len(helpers) == 0 {
		t.Fatal("no idle helper of this process found")
	}
	for _, pid := range helpers {
		if !mountedIn(t, pid, dir) {
			t.Fatalf("helper %d has no copy of %s to begin with: the test would prove nothing", pid, dir)
		}
	}
	if err := unix.Unmount(dir, 0); err != nil {
		t.Fatal(err)
	}
	for _, pid := range helpers {
		if mountedIn(t, pid, dir) {
			t.Errorf("helper %d still has %s mounted after the host unmounted it", pid, dir)
		}
	}
}

// mountedIn reports whether dir is a mount point in process pid's mount
// namespace.
func mountedIn(t *testing.T, pid int, dir string) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}
