//go:build linux

package fs_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/actiond/actiond/executor"
	actiondfs "github.com/actiond/actiond/fs"
)

// otherUID is a local user that is neither root nor any mount's user.
const otherUID = 54321

// runAs runs script with sh as uid (gid the same, no groups) and returns
// its combined output and whether it succeeded.
func runAs(t *testing.T, uid int, script string) (string, bool) {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: []uint32{}}}
	out, err := cmd.CombinedOutput()
	return string(out), err == nil
}

// TestMountServesOnlyItsUser: mounts are allow_other, so that the action's
// user can use them; the server itself refuses everyone else (here with a
// path to the mount that anyone can traverse), who can neither read, list,
// create nor leave negative entries behind.
func TestMountServesOnlyItsUser(t *testing.T) {
	e := newEnv(t, actiondfs.WithSpareMounts(0))
	const user = 61000
	dir := filepath.Join(e.dir, "m")
	m, err := e.root.Mount(context.Background(), e.tree(map[string]string{"a.txt": "alpha\n", "out/": ""}).Root, dir,
		actiondfs.MountOptions{User: &executor.User{UID: user, GID: user}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Unmount()
	if err := os.Chmod(filepath.Join(dir, "out"), 0o1777); err != nil {
		t.Fatal(err)
	}
	for _, step := range []string{
		"cat " + dir + "/a.txt",
		"ls " + dir,
		": > " + dir + "/out/x",
		"stat " + dir + "/later.txt",
	} {
		out, ok := runAs(t, otherUID, step)
		if ok || !strings.Contains(out, "Permission denied") {
			t.Errorf("as uid %d, %s: %v %q; want Permission denied", otherUID, step, ok, out)
		}
	}
	if out, ok := runAs(t, user, "cat "+dir+"/a.txt && : > "+dir+"/out/x && ls "+dir+"/out"); !ok || out != "alpha\nx\n" {
		t.Errorf("as the mount's user: %v %q", ok, out)
	}
}

// TestSpareForgetsLookups: names looked up in a spare mount (the empty
// tree) before it becomes an action's root must not be remembered as
// missing, by the server or by the kernel's dentry cache. Root (a `find /`
// by a host tool) is served; another user is refused outright.
func TestSpareForgetsLookups(t *testing.T) {
	e := newEnv(t, actiondfs.WithSpareMounts(2))
	mnt := filepath.Join(e.dir, "fs", "mnt")
	deadline := time.Now().Add(10 * time.Second)
	for e.root.SpareMounts() != 2 || mountsBelow(mnt) != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d spares ready", e.root.SpareMounts())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// As if the state directory were reachable (it is private).
	for _, d := range []string{filepath.Join(e.dir, "fs"), mnt} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ents, err := os.ReadDir(mnt)
	if err != nil || len(ents) != 2 {
		t.Fatalf("spares: %v %v", ents, err)
	}
	for _, ent := range ents {
		spare := filepath.Join(mnt, ent.Name())
		if _, err := os.Stat(filepath.Join(spare, "data.txt")); !os.IsNotExist(err) {
			t.Fatalf("stat of a name in a spare: %v", err)
		}
		if out, ok := runAs(t, otherUID, "stat "+spare+"/data.txt; ls "+spare); ok || !strings.Contains(out, "Permission denied") {
			t.Errorf("as uid %d in a spare: %v %q; want Permission denied", otherUID, ok, out)
		}
	}
	tree := e.tree(map[string]string{"data.txt": "the input\n"})
	for i, uid := range []int{61001, 61002} {
		s, err := e.root.StageWithOptions(context.Background(), tree, filepath.Join(e.dir, "unused"), executor.StageOptions{User: &executor.User{UID: uid, GID: uid}})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(s.Dir, mnt+"/") {
			t.Fatalf("staged at %q, not on a spare", s.Dir)
		}
		if got := readFile(t, filepath.Join(s.Dir, "data.txt")); got != "the input\n" {
			t.Errorf("spare %d as root: data.txt = %q", i, got)
		}
		if out, ok := runAs(t, uid, "cat "+s.Dir+"/data.txt"); !ok || out != "the input\n" {
			t.Errorf("spare %d as its user: %v %q", i, ok, out)
		}
		if out, ok := runAs(t, otherUID, "cat "+s.Dir+"/data.txt"); ok || !strings.Contains(out, "Permission denied") {
			t.Errorf("spare %d as uid %d: %v %q; want Permission denied", i, otherUID, ok, out)
		}
		if err := s.Cleanup(); err != nil {
			t.Fatal(err)
		}
	}
}

// mountsBelow counts the mounts below dir.
func mountsBelow(dir string) int {
	data, _ := os.ReadFile("/proc/self/mountinfo")
	n := 0
	for _, l := range strings.Split(string(data), "\n") {
		if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			n++
		}
	}
	return n
}
