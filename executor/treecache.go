package executor

import (
	"sync"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/lru"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// TreeCache remembers what LoadInputTree learns that can never change:
// Directory messages that parsed and validated, by digest, and whole
// validated trees by root digest. An input root seen before then costs one
// presence check of its blobs instead of reading, parsing and validating
// every Directory, and a similar root (most directories shared) reads only
// the directories that are new. That per-file work is most of what an
// input root costs to set up once staging itself is O(1) (actiondfs).
//
// Blob presence is not remembered: every load checks it (FindMissing),
// since the CAS may have evicted blobs in between.
type TreeCache struct {
	maxDirBytes  int64
	maxTreeFiles int

	mu    sync.Mutex
	dirs  lru.Cache[cas.Digest, *repb.Directory] // cost: encoded size
	trees lru.Cache[cas.Digest, *InputTree]      // cost: distinct files
}

// NewTreeCache returns a cache holding at most maxDirBytes of (encoded)
// Directory messages and whole trees referencing at most maxTreeFiles
// distinct files in all.
func NewTreeCache(maxDirBytes int64, maxTreeFiles int) *TreeCache {
	return &TreeCache{maxDirBytes: maxDirBytes, maxTreeFiles: maxTreeFiles}
}

// Defaults for the executor's TreeCache.
const (
	DefaultTreeCacheDirBytes = 64 << 20
	DefaultTreeCacheFiles    = 1 << 20
)

// dir returns the validated Directory with digest d, or nil.
func (c *TreeCache) dir(d cas.Digest) *repb.Directory {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	dir, _ := c.dirs.Get(d)
	return dir
}

// addDir remembers a validated Directory.
func (c *TreeCache) addDir(d cas.Digest, dir *repb.Directory) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dirs.Admit(d, dir, d.Size, c.maxDirBytes)
}

// tree returns the validated tree with root digest root, or nil.
func (c *TreeCache) tree(root cas.Digest) *InputTree {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	t, _ := c.trees.Get(root)
	return t
}

// addTree remembers a complete, validated tree.
func (c *TreeCache) addTree(t *InputTree) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.trees.Admit(t.Root, t, int64(len(t.Files)), int64(c.maxTreeFiles))
}
