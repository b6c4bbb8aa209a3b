package fs

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/actiond/actiond/cas"
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
	if err := validateDirectory(dir); err != nil {
		return nil, fmt.Errorf("directory %s: %w", d, err)
	}
	c.add(d, dir)
	return dir, nil
}

// add caches dir (already validated) under d.
func (c *dirCache) add(d cas.Digest, dir *repb.Directory) {
	if c.max <= 0 || d.Size > c.max {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dirs.Contains(d) {
		return
	}
	c.dirs.Add(d, dir, d.Size)
	c.dirs.TrimTo(c.max, nil)
}

// validateDirectory checks what lookups rely on: valid names, sorted and
// unique within each kind, no name used by two kinds, valid digests.
func validateDirectory(dir *repb.Directory) error {
	seen := make(map[string]bool, len(dir.Files)+len(dir.Directories)+len(dir.Symlinks))
	check := func(kind string, names []string) error {
		for i, n := range names {
			if n == "" || n == "." || n == ".." || strings.ContainsAny(n, "/\x00") {
				return fmt.Errorf("%s name %q is not a valid file name", kind, n)
			}
			if i > 0 && n <= names[i-1] {
				return fmt.Errorf("%s %q is not sorted after %q", kind, n, names[i-1])
			}
			if seen[n] {
				return fmt.Errorf("name %q is used twice", n)
			}
			seen[n] = true
		}
		return nil
	}
	var names []string
	for _, f := range dir.Files {
		if _, err := cas.FromProto(f.Digest); err != nil {
			return fmt.Errorf("file %q: %w", f.Name, err)
		}
		names = append(names, f.Name)
	}
	if err := check("file", names); err != nil {
		return err
	}
	names = names[:0]
	for _, s := range dir.Directories {
		if _, err := cas.FromProto(s.Digest); err != nil {
			return fmt.Errorf("directory %q: %w", s.Name, err)
		}
		names = append(names, s.Name)
	}
	if err := check("directory", names); err != nil {
		return err
	}
	names = names[:0]
	for _, s := range dir.Symlinks {
		if s.Target == "" {
			return errors.New("symlink " + s.Name + " has an empty target")
		}
		names = append(names, s.Name)
	}
	return check("symlink", names)
}

// Lookups in a validated Directory: entries are sorted by name per kind.

func findFile(dir *repb.Directory, name string) *repb.FileNode {
	i := sort.Search(len(dir.Files), func(i int) bool { return dir.Files[i].Name >= name })
	if i < len(dir.Files) && dir.Files[i].Name == name {
		return dir.Files[i]
	}
	return nil
}

func findDir(dir *repb.Directory, name string) *repb.DirectoryNode {
	i := sort.Search(len(dir.Directories), func(i int) bool { return dir.Directories[i].Name >= name })
	if i < len(dir.Directories) && dir.Directories[i].Name == name {
		return dir.Directories[i]
	}
	return nil
}

func findSymlink(dir *repb.Directory, name string) *repb.SymlinkNode {
	i := sort.Search(len(dir.Symlinks), func(i int) bool { return dir.Symlinks[i].Name >= name })
	if i < len(dir.Symlinks) && dir.Symlinks[i].Name == name {
		return dir.Symlinks[i]
	}
	return nil
}
