package fs

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/lru"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
)

// maxDirectorySize bounds the Directory messages the cache reads: a larger
// one is refused rather than read into memory.
const maxDirectorySize = 64 << 20

// dirCache holds parsed, validated Directory messages by digest, bounded by
// their encoded size and shared by every mount of an InputRoot: directories
// are immutable, and similar input roots share most of them.
type dirCache struct {
	store cas.Store
	max   int64

	mu   sync.Mutex
	dirs lru.Cache[cas.Digest, *repb.Directory] // cost: encoded size
}

func newDirCache(store cas.Store, max int64) *dirCache {
	return &dirCache{store: store, max: max}
}

// get returns the Directory with digest d, reading and validating it on a miss.
func (c *dirCache) get(ctx context.Context, d cas.Digest) (*repb.Directory, error) {
	if d.Size == 0 {
		return &repb.Directory{}, nil
	}
	c.mu.Lock()
	dir, ok := c.dirs.Get(d)
	c.mu.Unlock()
	if ok {
		return dir, nil
	}
	if d.Size > maxDirectorySize {
		return nil, fmt.Errorf("directory %s is larger than %d bytes", d, maxDirectorySize)
	}
	data, err := cas.ReadAll(ctx, c.store, d)
	if err != nil {
		return nil, fmt.Errorf("read directory %s: %w", d, err)
	}
	dir = &repb.Directory{}
	if err := proto.Unmarshal(data, dir); err != nil {
		return nil, fmt.Errorf("blob %s is not a Directory message: %w", d, err)
	}
	if err := executor.ValidateDirectory(dir); err != nil {
		return nil, fmt.Errorf("directory %s: %w", d, err)
	}
	c.add(d, dir)
	return dir, nil
}

// add caches dir (already validated) under d.
func (c *dirCache) add(d cas.Digest, dir *repb.Directory) {
	if c.max <= 0 { // caching off
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dirs.Admit(d, dir, d.Size, c.max)
}

// Lookups in a validated Directory: entries are sorted by name per kind.

func findFile(dir *repb.Directory, name string) *repb.FileNode { return findNamed(dir.Files, name) }

func findDir(dir *repb.Directory, name string) *repb.DirectoryNode {
	return findNamed(dir.Directories, name)
}

func findSymlink(dir *repb.Directory, name string) *repb.SymlinkNode {
	return findNamed(dir.Symlinks, name)
}

// findNamed returns the entry called name of nodes, sorted by name, or
// the zero T (nil).
func findNamed[T interface{ GetName() string }](nodes []T, name string) T {
	i, found := sort.Find(len(nodes), func(i int) int { return strings.Compare(name, nodes[i].GetName()) })
	if !found {
		var none T
		return none
	}
	return nodes[i]
}
