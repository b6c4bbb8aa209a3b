//go:build linux

package fs_test

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// waitNodes waits (the kernel sends FORGET asynchronously) until the
// mount keeps at most max inodes, and returns how many it keeps.
func waitNodes(m interface{ Nodes() int }, max int) int {
	deadline := time.Now().Add(30 * time.Second)
	for {
		n := m.Nodes()
		if n <= max || time.Now().After(deadline) {
			return n
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestCreateUnlinkForgetsNodes: an action that creates and removes many
// files leaves nothing behind in the server once the kernel has
// forgotten them (it was 26 MB for 50k files, outside the action's cgroup).
func TestCreateUnlinkForgetsNodes(t *testing.T) {
	e := newEnv(t)
	m := e.mount(e.tree(map[string]string{"in.txt": "input\n", "out/": ""}), false)
	before := m.Nodes()
	for i := range 5000 {
		p := filepath.Join(m.Dir(), "out", fmt.Sprintf("tmp%d", i))
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
		if i%100 == 0 {
			d := filepath.Join(m.Dir(), "out", fmt.Sprintf("d%d", i))
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(d); err != nil {
				t.Fatal(err)
			}
		}
	}
	// What the action keeps stays.
	writeFile(t, filepath.Join(m.Dir(), "out", "kept"), "kept\n")
	if got := waitNodes(m, before+10); got > before+10 {
		t.Fatalf("the mount keeps %d inodes after 5,050 files and directories were created and removed (%d before)", got, before)
	}
	if got := readFile(t, filepath.Join(m.Dir(), "out", "kept")); got != "kept\n" {
		t.Fatalf("kept file reads %q", got)
	}
}

// TestWalkForgetsInputNodes: walking a large input tree makes an inode per
// entry; once the kernel lets them go (here: drop_caches), so does the
// server, and the tree reads the same afterwards.
func TestWalkForgetsInputNodes(t *testing.T) {
	e := newEnv(t)
	spec := map[string]string{}
	for i := range 2000 {
		spec[fmt.Sprintf("d%d/f%d.txt", i%20, i)] = fmt.Sprintf("file %d\n", i)
	}
	m := e.mount(e.tree(spec), false)
	walk := func() int {
		n := 0
		err := filepath.WalkDir(m.Dir(), func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if _, err := os.Lstat(p); err != nil {
				return err
			}
			n++
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := walk(); n != 2021 {
		t.Fatalf("walk saw %d entries, want 2021", n)
	}
	if m.Nodes() < 2000 {
		t.Fatalf("the mount keeps %d inodes during the walk; the test needs the kernel to hold them", m.Nodes())
	}
	// Ask the kernel to evict unused dentries and inodes (not page cache).
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("2"), 0); err != nil {
		t.Fatal(err)
	}
	if got := waitNodes(m, 50); got > 50 {
		t.Fatalf("the mount keeps %d inodes after the kernel dropped its caches", got)
	}
	if n := walk(); n != 2021 {
		t.Fatalf("second walk saw %d entries, want 2021", n)
	}
	if got := readFile(t, filepath.Join(m.Dir(), "d7", "f1007.txt")); got != "file 1007\n" {
		t.Fatalf("d7/f1007.txt reads %q after its node was dropped and made again", got)
	}
}
