package executor

import (
	"context"
	"errors"
	"io"
	"sync/atomic"
	"testing"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// countingStore counts blob reads.
type countingStore struct {
	cas.Store
	gets atomic.Int64
}

func (s *countingStore) Get(ctx context.Context, d cas.Digest, off int64) (io.ReadCloser, error) {
	s.gets.Add(1)
	return s.Store.Get(ctx, d, off)
}

func TestTreeCache(t *testing.T) {
	ds := newStore(t)
	s := &countingStore{Store: ds}
	ctx := context.Background()
	f1 := putBlob(t, ds, []byte("one"))
	f2 := putBlob(t, ds, []byte("two"))
	shared := putDir(t, ds, &repb.Directory{Files: []*repb.FileNode{{Name: "a", Digest: f1.Proto()}}})
	root1 := putDir(t, ds, &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "lib", Digest: shared.Proto()}}})
	root2 := putDir(t, ds, &repb.Directory{
		Files:       []*repb.FileNode{{Name: "b", Digest: f2.Proto()}},
		Directories: []*repb.DirectoryNode{{Name: "lib", Digest: shared.Proto()}},
	})
	c := NewTreeCache(1<<20, 1000)

	t1, err := c.LoadInputTree(ctx, s, root1)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.gets.Load(); n != 2 {
		t.Errorf("first load read %d blobs, want 2", n)
	}
	again, err := c.LoadInputTree(ctx, s, root1)
	if err != nil || again != t1 {
		t.Errorf("repeated root: %p %v, want the cached tree %p", again, err, t1)
	}
	if n := s.gets.Load(); n != 2 {
		t.Errorf("repeated root read %d more blobs, want none", n-2)
	}
	// A similar root reads only its new directory.
	t2, err := c.LoadInputTree(ctx, s, root2)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.gets.Load(); n != 3 {
		t.Errorf("similar root read %d blobs, want 1", n-2)
	}
	if t2.FileCount != 2 || len(t2.Files) != 2 || t2.Dirs[shared] == nil {
		t.Errorf("similar root: %+v", t2)
	}
	// Blob presence is checked every time: an evicted input is missing.
	ds.Evict(1)
	_, err = c.LoadInputTree(ctx, s, root1)
	var missing *MissingBlobsError
	if !errors.As(err, &missing) {
		t.Errorf("cached tree with evicted blobs: %v, want MissingBlobsError", err)
	}
	// Invalid directories are never cached.
	bad := putDir(t, ds, &repb.Directory{Files: []*repb.FileNode{{Name: "x/y", Digest: f1.Proto()}}})
	for range 2 {
		var invalid *InvalidInputError
		if _, err := c.LoadInputTree(ctx, s, bad); !errors.As(err, &invalid) {
			t.Errorf("malformed directory: %v, want InvalidInputError", err)
		}
	}
}

func TestTreeCacheBounds(t *testing.T) {
	c := NewTreeCache(100, 3)
	for i := range 10 {
		d := cas.DigestOf([]byte{byte(i)})
		d.Size = 40
		c.addDir(d, &repb.Directory{})
		c.addTree(&InputTree{Root: d, Files: []cas.Digest{d}})
	}
	if c.dirs.Cost() > 100 || c.dirs.Len() != 2 || c.trees.Cost() > 3 || c.trees.Len() != 3 {
		t.Errorf("cache holds %d dirs (%d bytes), %d trees (%d files)", c.dirs.Len(), c.dirs.Cost(), c.trees.Len(), c.trees.Cost())
	}
}
