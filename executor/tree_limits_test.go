package executor

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// findCallStore records the largest FindMissing call.
type findCallStore struct {
	cas.Store
	mu  sync.Mutex
	max int
}

func (s *findCallStore) FindMissing(ctx context.Context, ds []cas.Digest) ([]cas.Digest, error) {
	s.mu.Lock()
	s.max = max(s.max, len(ds))
	s.mu.Unlock()
	return s.Store.FindMissing(ctx, ds)
}

// TestInputBlobsAreCheckedInChunks: the presence check of a large input
// tree never hands the store (which holds its index lock for a call) more
// than a chunk of digests, so other clients' FindMissingBlobs interleave.
func TestInputBlobsAreCheckedInChunks(t *testing.T) {
	s := newStore(t)
	root := &repb.Directory{}
	var blobs []cas.Blob
	for i := range 3 * findMissingChunk {
		data := []byte(fmt.Sprintf("input %d", i))
		d := cas.DigestOf(data)
		blobs = append(blobs, cas.Blob{Digest: d, Data: data})
		root.Files = append(root.Files, &repb.FileNode{Name: fmt.Sprintf("f%06d", i), Digest: d.Proto()})
	}
	for _, err := range s.PutBatch(context.Background(), blobs) {
		if err != nil {
			t.Fatal(err)
		}
	}
	obs := &findCallStore{Store: s}
	tree, err := LoadInputTree(context.Background(), obs, putDir(t, s, root))
	if err != nil {
		t.Fatal(err)
	}
	if len(tree.Files) != 3*findMissingChunk || obs.max > findMissingChunk {
		t.Fatalf("%d files checked, largest FindMissing call %d digests; want all, at most %d per call", len(tree.Files), obs.max, findMissingChunk)
	}
}

// TestExpandedTreeSize: Entries and Bytes count the tree as staging
// expands it, saturating instead of overflowing.
func TestExpandedTreeSize(t *testing.T) {
	s := newStore(t)
	f := putBlob(t, s, []byte("12345"))
	dir := &repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: f.Proto()}}, Symlinks: []*repb.SymlinkNode{{Name: "l", Target: "f"}}}
	for range 3 {
		d := putDir(t, s, dir).Proto()
		dir = &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "a", Digest: d}, {Name: "b", Digest: d}}}
	}
	tree, err := LoadInputTree(context.Background(), s, putDir(t, s, dir))
	if err != nil {
		t.Fatal(err)
	}
	// 8 leaves of 2 entries, 2+4+8 directories.
	if tree.Entries != 8*2+14 || tree.Bytes != 8*5 {
		t.Fatalf("Entries %d, Bytes %d; want 30 and 40", tree.Entries, tree.Bytes)
	}
	if err := tree.CheckLimits(29, 0); err == nil || !strings.Contains(err.Error(), "--max-input-entries") {
		t.Fatalf("CheckLimits(29 entries) = %v", err)
	}
	if err := tree.CheckLimits(0, 39); err == nil || !strings.Contains(err.Error(), "--max-input-bytes") {
		t.Fatalf("CheckLimits(39 bytes) = %v", err)
	}
	if err := tree.CheckLimits(30, 40); err != nil {
		t.Fatalf("CheckLimits at the limits: %v", err)
	}
	// 70 levels: 2^70 paths, more than an int64 counts; the counts
	// saturate and the tree is refused.
	dir = &repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: f.Proto()}}}
	for range 70 {
		d := putDir(t, s, dir).Proto()
		dir = &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "a", Digest: d}, {Name: "b", Digest: d}}}
	}
	tree, err = LoadInputTree(context.Background(), s, putDir(t, s, dir))
	if err != nil {
		t.Fatal(err)
	}
	if tree.Entries <= 0 || tree.Bytes <= 0 || tree.CheckLimits(DefaultMaxInputEntries, DefaultMaxInputBytes) == nil {
		t.Fatalf("a 2^70-path tree: Entries %d, Bytes %d, not refused", tree.Entries, tree.Bytes)
	}
}
