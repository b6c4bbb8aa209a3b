package executor

import (
	"container/list"
	"sync"

	"github.com/actiond/actiond/cas"
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

	mu        sync.Mutex
	dirs      map[cas.Digest]*list.Element // of *cachedDir
	dirLRU    *list.List                   // most recently used at the front
	dirBytes  int64
	trees     map[cas.Digest]*list.Element // of *InputTree
	treeLRU   *list.List
	treeFiles int
}

type cachedDir struct {
	d   cas.Digest
	dir *repb.Directory
}

// NewTreeCache returns a cache holding at most maxDirBytes of (encoded)
// Directory messages and whole trees referencing at most maxTreeFiles
// distinct files in all.
func NewTreeCache(maxDirBytes int64, maxTreeFiles int) *TreeCache {
	return &TreeCache{
		maxDirBytes: maxDirBytes, maxTreeFiles: maxTreeFiles,
		dirs: make(map[cas.Digest]*list.Element), dirLRU: list.New(),
		trees: make(map[cas.Digest]*list.Element), treeLRU: list.New(),
	}
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
	if el, ok := c.dirs[d]; ok {
		c.dirLRU.MoveToFront(el)
		return el.Value.(*cachedDir).dir
	}
	return nil
}

// addDir remembers a validated Directory.
func (c *TreeCache) addDir(d cas.Digest, dir *repb.Directory) {
	if c == nil || d.Size > c.maxDirBytes {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.dirs[d]; ok {
		return
	}
	c.dirs[d] = c.dirLRU.PushFront(&cachedDir{d, dir})
	c.dirBytes += d.Size
	for c.dirBytes > c.maxDirBytes {
		el := c.dirLRU.Back()
		old := el.Value.(*cachedDir)
		c.dirLRU.Remove(el)
		delete(c.dirs, old.d)
		c.dirBytes -= old.d.Size
	}
}

// tree returns the validated tree with root digest root, or nil.
func (c *TreeCache) tree(root cas.Digest) *InputTree {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.trees[root]; ok {
		c.treeLRU.MoveToFront(el)
		return el.Value.(*InputTree)
	}
	return nil
}

// addTree remembers a complete, validated tree.
func (c *TreeCache) addTree(t *InputTree) {
	if c == nil || len(t.Files) > c.maxTreeFiles {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.trees[t.Root]; ok {
		return
	}
	c.trees[t.Root] = c.treeLRU.PushFront(t)
	c.treeFiles += len(t.Files)
	for c.treeFiles > c.maxTreeFiles {
		el := c.treeLRU.Back()
		old := el.Value.(*InputTree)
		c.treeLRU.Remove(el)
		delete(c.trees, old.Root)
		c.treeFiles -= len(old.Files)
	}
}
