package executor_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/testutil"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// TestHardlinkStagingSurvivesTheLinkLimit: ext4 allows 65,000 links to one
// inode. Staging used to hardlink every empty input, of every concurrent
// action, to the store's one empty blob, and every copy of a popular file
// to its blob, so 66k empty inputs failed with EMLINK. Empty files are now
// created, and a link refused with EMLINK is a copy.
func TestHardlinkStagingSurvivesTheLinkLimit(t *testing.T) {
	testutil.SkipIfShort(t, "stages 65,000 files")
	dir := t.TempDir()
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err == nil && sfs.Type != unix.EXT4_SUPER_MAGIC {
		t.Logf("%s is not on ext4 (magic %#x): its link limit may differ, so this may not reach EMLINK", dir, sfs.Type)
	}
	store, err := cas.NewDiskStore(filepath.Join(dir, "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	put := func(b []byte) cas.Digest {
		d := cas.DigestOf(b)
		if err := store.Put(ctx, d, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
		return d
	}
	// More names of one blob than ext4 allows links to one inode (65,000).
	const n = 65010
	popular := put([]byte("#pragma once\n"))
	root := &repb.Directory{}
	for i := range 3 {
		root.Files = append(root.Files, &repb.FileNode{Name: fmt.Sprintf("e%06d", i), Digest: cas.EmptyDigest.Proto(), IsExecutable: i == 1})
	}
	for i := range n {
		root.Files = append(root.Files, &repb.FileNode{Name: fmt.Sprintf("p%06d", i), Digest: popular.Proto(), IsExecutable: i == 0})
	}
	data, err := proto.Marshal(root)
	if err != nil {
		t.Fatal(err)
	}
	tree, err := executor.LoadInputTree(ctx, store, put(data))
	if err != nil {
		t.Fatal(err)
	}
	stage := filepath.Join(dir, "stage")
	if _, err := (executor.LinkInputRoot{Store: store}).Stage(ctx, tree, stage); err != nil {
		t.Fatalf("staging %d identical inputs: %v", n, err)
	}
	for _, c := range []struct {
		name, want string
		mode       os.FileMode
	}{
		{"e000000", "", 0o444}, {"e000001", "", 0o555}, {"e000002", "", 0o444},
		{"p000000", "#pragma once\n", 0o555}, {fmt.Sprintf("p%06d", n-1), "#pragma once\n", 0o444},
	} {
		p := filepath.Join(stage, c.name)
		b, err := os.ReadFile(p)
		if err != nil || string(b) != c.want {
			t.Errorf("%s = %q, %v; want %q", c.name, b, err, c.want)
		}
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != c.mode {
			t.Errorf("%s: mode %v, %v; want %v", c.name, fi.Mode().Perm(), err, c.mode)
		}
	}
	// Empty inputs are files of their own, not more links to one inode
	// that every action's empty inputs share.
	for _, name := range []string{"e000000", "e000001", "e000002"} {
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(stage, name), &st); err != nil || st.Nlink != 1 {
			t.Errorf("empty input %s has %d links (%v); want a file of its own", name, st.Nlink, err)
		}
	}
}
