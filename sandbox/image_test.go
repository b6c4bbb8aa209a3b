//go:build linux

package sandbox_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/actiond/actiond/internal/mountinfo"
	"github.com/actiond/actiond/internal/testutil"
	"github.com/actiond/actiond/sandbox"
)

// makeImage builds a SquashFS runtime image at path from a tiny tree: the
// static probe as /bin/probe and the given /etc files.
func makeImage(t *testing.T, path string, etc map[string]string) {
	t.Helper()
	tree := t.TempDir()
	for _, d := range []string{"bin", "etc", "usr"} {
		if err := os.Mkdir(filepath.Join(tree, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(t, probeBinary(t), filepath.Join(tree, "bin/probe"), 0o755)
	if err := os.Symlink("/bin", filepath.Join(tree, "usr/bin")); err != nil {
		t.Fatal(err)
	}
	for name, content := range etc {
		writeFile(t, filepath.Join(tree, "etc", name), content, 0o644)
	}
	tmp := path + ".tmp"
	out, err := exec.Command("mksquashfs", tree, tmp, "-noappend", "-quiet", "-all-root").CombinedOutput()
	if err != nil {
		t.Fatalf("mksquashfs: %v\n%s", err, out)
	}
	if err := os.Rename(tmp, path); err != nil { // a new inode, as a rebuilt image would have
		t.Fatal(err)
	}
}

// mountCount counts the mounts on dir.
func mountCount(t *testing.T, dir string) int {
	t.Helper()
	return testutil.CountMounts(t, func(e mountinfo.Entry) bool { return e.Point == dir })
}

func TestLoadRuntimes(t *testing.T) {
	testutil.RequireRoot(t)
	_, err := exec.LookPath("mksquashfs")
	testutil.Require(t, err == nil, "needs mksquashfs (Debian package squashfs-tools)")

	images, mnt := t.TempDir(), t.TempDir()
	// "tiny" has the files the sandbox replaces; "bare" lacks them.
	makeImage(t, filepath.Join(images, "tiny.squashfs"), map[string]string{
		"os-release": "ID=tiny\n", "hosts": "10.0.0.1 evil\n", "passwd": "root:x:0:0::/:/bin/probe\n", "group": "root:x:0:\n",
	})
	makeImage(t, filepath.Join(images, "bare.squashfs"), map[string]string{"os-release": "ID=bare\n"})
	writeFile(t, filepath.Join(images, "notes.txt"), "not an image", 0o644)
	t.Cleanup(func() { // in case the test fails before Close
		for _, name := range []string{"tiny", "bare"} {
			for mountCount(t, filepath.Join(mnt, name)) > 0 {
				if exec.Command("umount", "-l", filepath.Join(mnt, name)).Run() != nil {
					break
				}
			}
		}
	})

	rts, err := sandbox.LoadRuntimes(images, mnt)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, rt := range rts {
		names = append(names, rt.Name)
	}
	if !slices.Equal(names, []string{"bare", "tiny"}) {
		t.Fatalf("runtimes %q; want bare, tiny", names)
	}
	// A second load, as after a crash that left the mounts: reused.
	if _, err := sandbox.LoadRuntimes(images, mnt); err != nil {
		t.Fatal(err)
	}
	tinyDir := filepath.Join(mnt, "tiny")
	if n := mountCount(t, tinyDir); n != 1 {
		t.Errorf("%d mounts on %s after loading twice; want 1", n, tinyDir)
	}

	sb, err := sandbox.New(sandbox.Config{Runtimes: append(rts, sandbox.HostRuntime()), StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if got := sb.Runtimes(); !slices.Equal(got, []string{"bare", "host", "tiny"}) {
		t.Errorf("Runtimes() = %q", got)
	}
	root := newExecRoot(t, false)
	probe := func(rt string, args ...string) string {
		s := spec(t, root, append([]string{"probe"}, args...)...) // found through PATH=/usr/bin:/bin
		s.Runtime = rt
		return mustSucceed(t, sb, s)
	}
	for rt, want := range map[string]string{"tiny": "ID=tiny\n", "bare": "ID=bare\n"} {
		if got := probe(rt, "cat", "/etc/os-release"); got != want {
			t.Errorf("%s: /etc/os-release = %q; want %q", rt, got, want)
		}
		if got := probe(rt, "cat", "/etc/hosts"); got != "127.0.0.1\tlocalhost\n::1\tlocalhost\n" {
			t.Errorf("%s: /etc/hosts = %q; want the generated one", rt, got)
		}
		if got := probe(rt, "cat", "/etc/passwd"); !strings.Contains(got, "nobody:x:65534:65534:") {
			t.Errorf("%s: /etc/passwd = %q; want the generated one", rt, got)
		}
		if got := probe(rt, "exists", "/usr/bin/sh"); got != "false\n" {
			t.Errorf("%s: the host's /usr/bin/sh is visible", rt)
		}
		if got, want := probe(rt, "id"), fmt.Sprintf("uid=%[1]d euid=%[1]d gid=%[1]d egid=%[1]d", sandbox.DefaultFirstID); !strings.HasPrefix(got, want) {
			t.Errorf("%s: id = %q", rt, got)
		}
	}

	// A rebuilt image replaces the stale mount of the old one.
	makeImage(t, filepath.Join(images, "tiny.squashfs"), map[string]string{"os-release": "ID=tiny2\n"})
	if _, err := sandbox.LoadRuntimes(images, mnt); err != nil {
		t.Fatal(err)
	}
	if got := probe("tiny", "cat", "/etc/os-release"); got != "ID=tiny2\n" {
		t.Errorf("after rebuilding: /etc/os-release = %q", got)
	}

	if err := sb.Close(); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"tiny", "bare"} {
		if n := mountCount(t, filepath.Join(mnt, name)); n != 0 {
			t.Errorf("%d mounts left on %s after Close", n, name)
		}
	}
}

// TestKeptHelperRootTemplate: a kept helper builds the part of its actions'
// roots that does not depend on the action once per runtime, and each
// action's root starts as a copy of it. Actions on the same runtime share
// that read-only base but get /tmp of their own, and the base follows the
// runtime: another runtime, or a rebuilt image of the same one, is seen by
// the next action on the same helper.
func TestKeptHelperRootTemplate(t *testing.T) {
	testutil.RequireRoot(t)
	_, err := exec.LookPath("mksquashfs")
	testutil.Require(t, err == nil, "needs mksquashfs (Debian package squashfs-tools)")
	images, mnt := t.TempDir(), t.TempDir()
	makeImage(t, filepath.Join(images, "tiny.squashfs"), map[string]string{"os-release": "ID=tiny\n"})
	t.Cleanup(func() {
		for mountCount(t, filepath.Join(mnt, "tiny")) > 0 {
			if exec.Command("umount", "-l", filepath.Join(mnt, "tiny")).Run() != nil {
				break
			}
		}
	})
	rts, err := sandbox.LoadRuntimes(images, mnt)
	if err != nil {
		t.Fatal(err)
	}
	// No prestarted helpers: the helper started for the first action is
	// the only idle one when each next one comes.
	sb := newSandboxWith(t, sandbox.Config{Runtimes: append(rts, sandbox.HostRuntime()), PrestartedHelpers: -1})
	root := newExecRoot(t, true)
	lastPID := 0
	probe := func(rt string, args ...string) string {
		t.Helper()
		s := spec(t, root, append([]string{"./probe"}, args...)...)
		s.Runtime = rt
		return mustSucceed(t, sb, s)
	}
	// born returns when the action's / and /tmp were created (device
	// numbers of freed file systems are reused, birth times are not), and
	// checks that the helper was kept (pids grow in its PID namespace).
	born := func(rt string) (string, string) {
		t.Helper()
		f := strings.Fields(probe(rt, "btime", "/", "/tmp"))
		if len(f) != 3 {
			t.Fatalf("probe btime printed %q", f)
		}
		pid, err := strconv.Atoi(strings.TrimPrefix(f[2], "pid="))
		if err != nil {
			t.Fatal(err)
		}
		if pid <= lastPID {
			t.Fatalf("probe's pid %d after %d: the helper was not kept, so this test proves nothing", pid, lastPID)
		}
		lastPID = pid
		return f[0], f[1]
	}
	if got := probe("tiny", "cat", "/etc/os-release"); got != "ID=tiny\n" {
		t.Fatalf("/etc/os-release = %q", got)
	}
	root1, tmp1 := born("tiny")
	root2, tmp2 := born("tiny")
	if root1 != root2 {
		t.Errorf("two actions on one runtime and helper have roots made at %s and %s: the template was not used", root1, root2)
	}
	if tmp1 == tmp2 {
		t.Errorf("two actions share /tmp (made at %s)", tmp1)
	}
	// The shared base is read-only: nothing an action leaves there can
	// reach the next one.
	for _, p := range []string{"/left", "/etc/left", "/dev/left", "/etc/hosts"} {
		s := spec(t, root, "./probe", "write", p, "left")
		s.Runtime = "tiny"
		if res, _, _ := run(t, sb, s); res.ExitCode == 0 {
			t.Errorf("an action wrote %s", p)
		}
		if got := probe("tiny", "exists", p); p != "/etc/hosts" && got != "false\n" {
			t.Errorf("%s, written by the previous action, exists", p)
		}
	}
	if got := probe("host", "cat", "/etc/hosts"); got != "127.0.0.1\tlocalhost\n::1\tlocalhost\n" {
		t.Errorf("host runtime after tiny: /etc/hosts = %q", got)
	}
	hostRoot, _ := born("host")
	if hostRoot == root2 {
		t.Errorf("the host runtime's action has the tiny runtime's root (made at %s)", hostRoot)
	}
	if got := probe("tiny", "cat", "/etc/os-release"); got != "ID=tiny\n" {
		t.Errorf("tiny after host: /etc/os-release = %q", got)
	}

	// A rebuilt image, loaded again under the same name and path.
	makeImage(t, filepath.Join(images, "tiny.squashfs"), map[string]string{"os-release": "ID=tiny2\n"})
	if _, err := sandbox.LoadRuntimes(images, mnt); err != nil {
		t.Fatal(err)
	}
	if got := probe("tiny", "cat", "/etc/os-release"); got != "ID=tiny2\n" {
		t.Errorf("after rebuilding the image: /etc/os-release = %q; want the new one", got)
	}
	born("tiny") // still the same helper
}
