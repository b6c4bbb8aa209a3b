package executor

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
)

// InputTree is a validated input root: every Directory below Root, keyed by
// digest, and every file blob the tree references.
type InputTree struct {
	Root  cas.Digest
	Dirs  map[cas.Digest]*repb.Directory
	Files []cas.Digest // distinct file digests
	// FileCount counts file entries (with repeats), for logs and metrics.
	FileCount int
	// Entries and Bytes are the size of the tree as staging expands it:
	// every file, directory and symlink below Root (a Directory named
	// twice counts twice) and the bytes of all those files. Directories
	// are shared by digest, so a few small messages can describe a tree
	// exponentially larger than themselves; these are what hardlink and
	// copy staging (and a walk of a FUSE root) cost. Saturated at
	// math.MaxInt64.
	Entries, Bytes int64
}

// Defaults for the limits on an expanded input tree (Options.MaxInputEntries
// and MaxInputBytes). Large real actions have a few hundred thousand inputs;
// staging costs ~0.3 ms per file with hardlinks, so a million is minutes.
const (
	DefaultMaxInputEntries = 1 << 20
	DefaultMaxInputBytes   = 64 << 30
)

// CheckLimits refuses a tree larger, once expanded, than maxEntries entries
// or maxBytes bytes (zero or less: no limit) with INVALID_ARGUMENT naming
// the limit.
func (t *InputTree) CheckLimits(maxEntries, maxBytes int64) error {
	if maxEntries > 0 && t.Entries > maxEntries {
		return invalidf("input root %s expands to %s entries, over this server's limit of %d input entries (--max-input-entries)", t.Root, satString(t.Entries), maxEntries)
	}
	if maxBytes > 0 && t.Bytes > maxBytes {
		return invalidf("input root %s expands to %s bytes of files, over this server's limit of %d input bytes (--max-input-bytes)", t.Root, satString(t.Bytes), maxBytes)
	}
	return nil
}

func satString(n int64) string {
	if n == math.MaxInt64 {
		return "more than 9.2e18"
	}
	return strconv.FormatInt(n, 10)
}

// satAdd adds non-negative numbers, saturating at math.MaxInt64.
func satAdd(a, b int64) int64 {
	if a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

// expand computes t.Entries and t.Bytes bottom-up over the DAG, each
// distinct directory once.
func (t *InputTree) expand() {
	type size struct{ entries, bytes int64 }
	memo := make(map[cas.Digest]size, len(t.Dirs))
	var walk func(d cas.Digest) size
	walk = func(d cas.Digest) size {
		if s, ok := memo[d]; ok {
			return s
		}
		dir := t.Dirs[d]
		var s size
		if dir != nil {
			s.entries = int64(len(dir.Files) + len(dir.Symlinks) + len(dir.Directories))
			for _, f := range dir.Files {
				s.bytes = satAdd(s.bytes, max(f.Digest.GetSizeBytes(), 0))
			}
			for _, sub := range dir.Directories {
				sd, _ := cas.FromProto(sub.Digest)
				ss := walk(sd) // depth is bounded by LoadInputTree
				s.entries = satAdd(s.entries, ss.entries)
				s.bytes = satAdd(s.bytes, ss.bytes)
			}
		}
		memo[d] = s
		return s
	}
	s := walk(t.Root)
	t.Entries, t.Bytes = s.entries, s.bytes
}

// InvalidInputError reports a malformed input tree; it maps to INVALID_ARGUMENT.
type InvalidInputError struct{ Msg string }

func (e *InvalidInputError) Error() string { return e.Msg }

// MissingBlobsError lists blobs an action needs that the CAS does not hold;
// it maps to FAILED_PRECONDITION with MISSING violations.
type MissingBlobsError struct{ Digests []cas.Digest }

func (e *MissingBlobsError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d blobs are missing from the CAS", len(e.Digests))
	for i, d := range e.Digests {
		if i == 3 {
			b.WriteString(", ...")
			break
		}
		if i == 0 {
			b.WriteString(": ")
		} else {
			b.WriteString(", ")
		}
		b.WriteString(d.String())
	}
	return b.String()
}

func invalidf(format string, args ...any) error {
	return &InvalidInputError{Msg: fmt.Sprintf(format, args...)}
}

// LoadInputTree fetches and validates the tree below root, then checks that
// every file blob is present.
func LoadInputTree(ctx context.Context, store cas.Store, root cas.Digest) (*InputTree, error) {
	return (*TreeCache)(nil).LoadInputTree(ctx, store, root)
}

// LoadInputTree is the package's LoadInputTree with c's memory of
// validated directories and trees; a nil c remembers nothing. The returned
// tree may be shared with other callers: it must not be modified.
func (c *TreeCache) LoadInputTree(ctx context.Context, store cas.Store, root cas.Digest) (*InputTree, error) {
	if t := c.tree(root); t != nil {
		// Validated before; the blobs may have been evicted since.
		m, err := findMissing(ctx, store, t.Files)
		if err != nil {
			return nil, fmt.Errorf("check input blobs: %w", err)
		}
		if len(m) > 0 {
			return nil, &MissingBlobsError{Digests: m}
		}
		if err := verifyInputs(ctx, store, t.Files); err != nil {
			return nil, err
		}
		return t, nil
	}
	t := &InputTree{Root: root, Dirs: make(map[cas.Digest]*repb.Directory)}
	var missing []cas.Digest
	files := make(map[cas.Digest]bool)
	level := []cas.Digest{root}
	for depth := 0; len(level) > 0; depth++ {
		if depth > 256 {
			return nil, invalidf("input root %s is more than 256 directories deep", root)
		}
		var next []cas.Digest
		for _, d := range level {
			if _, ok := t.Dirs[d]; ok {
				continue
			}
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("load input root %s: %w", root, err)
			}
			dir := c.dir(d)
			if dir == nil {
				if d.Size > MaxMessageSize {
					return nil, invalidf("input directory %s is %d bytes; Directory messages may be at most %d bytes", d, d.Size, MaxMessageSize)
				}
				data, err := cas.ReadAll(ctx, store, d)
				if errors.Is(err, cas.ErrNotFound) {
					missing = append(missing, d)
					t.Dirs[d] = nil
					continue
				}
				if err != nil {
					return nil, fmt.Errorf("read directory %s: %w", d, err)
				}
				dir = &repb.Directory{}
				if err := proto.Unmarshal(data, dir); err != nil {
					return nil, invalidf("blob %s in the input root is not a Directory message: %v", d, err)
				}
				if err := ValidateDirectory(dir); err != nil {
					return nil, invalidf("input directory %s: %v", d, err)
				}
				c.addDir(d, dir)
			}
			t.Dirs[d] = dir
			for _, f := range dir.Files {
				fd, _ := cas.FromProto(f.Digest)
				t.FileCount++
				if !files[fd] && !fd.IsEmpty() {
					files[fd] = true
					t.Files = append(t.Files, fd)
				}
			}
			for _, sub := range dir.Directories {
				sd, _ := cas.FromProto(sub.Digest)
				next = append(next, sd)
			}
		}
		level = next
	}
	m, err := findMissing(ctx, store, t.Files)
	if err != nil {
		return nil, fmt.Errorf("check input blobs: %w", err)
	}
	missing = append(missing, m...)
	if len(missing) > 0 {
		return nil, &MissingBlobsError{Digests: missing}
	}
	t.expand()
	if err := verifyInputs(ctx, store, t.Files); err != nil {
		return nil, err
	}
	c.addTree(t)
	return t, nil
}

// findMissingChunk is how many digests go to the store in one FindMissing
// call: the disk store holds its index lock for a call, and other clients'
// lookups must not wait for the whole of a large input tree.
const findMissingChunk = 4096

// findMissing is store.FindMissing in chunks.
func findMissing(ctx context.Context, store cas.Store, ds []cas.Digest) ([]cas.Digest, error) {
	var missing []cas.Digest
	for len(ds) > 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n := min(len(ds), findMissingChunk)
		m, err := store.FindMissing(ctx, ds[:n])
		if err != nil {
			return nil, err
		}
		missing = append(missing, m...)
		ds = ds[n:]
	}
	return missing, nil
}

// cleanRelPath checks a path relative to the execroot or working directory:
// no absolute paths, no "..", nothing empty. It returns the cleaned path.
func cleanRelPath(what, p string) (string, error) {
	if p == "" {
		return "", invalidf("%s is empty", what)
	}
	if strings.HasPrefix(p, "/") {
		return "", invalidf("%s %q is absolute; it must be relative", what, p)
	}
	parts := strings.Split(p, "/")
	out := parts[:0]
	for _, c := range parts {
		switch c {
		case "", ".":
			continue
		case "..":
			return "", invalidf("%s %q contains \"..\"", what, p)
		}
		if strings.ContainsRune(c, 0) {
			return "", invalidf("%s %q contains a NUL byte", what, p)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return "", invalidf("%s %q names the directory itself", what, p)
	}
	return strings.Join(out, "/"), nil
}

// verifyInputs makes sure no file blob backs an input (hardlink, copy or
// actiondfs alike) unless it was hashed since the store opened or since it
// was written: the cost is paid once per blob, not per action, and blobs
// uploaded through actiond cost nothing (they were hashed on the way in).
// It runs here, before staging, rather than when actiondfs first opens a
// file: a bad blob then fails the action with FAILED_PRECONDITION MISSING
// for its digest, which makes the client upload it again, instead of an
// EIO in the middle of the command whose result would have to be thrown
// away; and the tree walk that lists the files is already paid for. The
// price is hashing inputs the command may never open, once per blob per
// server lifetime, and the background scrubber pays most of it ahead.
func verifyInputs(ctx context.Context, store cas.Store, files []cas.Digest) error {
	v, ok := store.(cas.Verifier)
	if !ok {
		return nil
	}
	corrupt, err := v.VerifyBlobs(ctx, files)
	if err != nil {
		return fmt.Errorf("verify input blobs: %w", err)
	}
	if len(corrupt) > 0 {
		return &MissingBlobsError{Digests: corrupt}
	}
	return nil
}
