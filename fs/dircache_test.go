package fs

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/cas/castest"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// The directories actiondfs reads from the CAS itself (those the executor
// did not hand over already validated) follow the executor's rules, the
// absolute symlink targets Capabilities disallow included.
func TestDirCacheValidates(t *testing.T) {
	store, err := cas.NewDiskStore(filepath.Join(t.TempDir(), "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	put := func(dir *repb.Directory) cas.Digest { return castest.PutProto(t, store, dir) }
	c := newDirCache(store, 1<<20)
	good := put(&repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "l", Target: "../x"}}})
	if dir, err := c.get(context.Background(), good); err != nil || len(dir.Symlinks) != 1 {
		t.Fatalf("get(valid directory) = %v, %v", dir, err)
	}
	abs := put(&repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "l", Target: "/etc/shadow"}}})
	if _, err := c.get(context.Background(), abs); err == nil || !strings.Contains(err.Error(), "absolute target") {
		t.Fatalf("get(absolute symlink target) = %v, want an error about the absolute target", err)
	}
	unsorted := put(&repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "b", Target: "x"}, {Name: "a", Target: "x"}}})
	if _, err := c.get(context.Background(), unsorted); err == nil {
		t.Fatal("get(unsorted directory) succeeded")
	}
}

func TestFindNamed(t *testing.T) {
	dir := &repb.Directory{Files: []*repb.FileNode{{Name: "a"}, {Name: "c"}, {Name: "e"}}}
	for _, name := range []string{"a", "c", "e"} {
		if f := findFile(dir, name); f == nil || f.Name != name {
			t.Errorf("findFile(%q) = %v", name, f)
		}
	}
	for _, name := range []string{"", "b", "d", "f"} {
		if f := findFile(dir, name); f != nil {
			t.Errorf("findFile(%q) = %v, want nil", name, f)
		}
	}
	if findDir(&repb.Directory{}, "a") != nil || findSymlink(&repb.Directory{}, "a") != nil {
		t.Error("found an entry in an empty directory")
	}
}
