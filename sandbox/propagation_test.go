//go:build linux

package sandbox_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/actiond/actiond/internal/mountinfo"
	"github.com/actiond/actiond/internal/testutil"
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
