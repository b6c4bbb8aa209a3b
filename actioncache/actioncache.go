// Package actioncache stores REAPI ActionResults in a bbolt database and
// serves the ActionCache gRPC service. A result is only returned while every
// blob it references is still in the CAS, so clients that skip downloading
// outputs (Bazel's --remote_download_minimal) never get a result whose
// outputs were evicted.
package actioncache

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/protobuf/proto"
)

// Cache maps action digests to results.
type Cache interface {
	// Get returns the result for an action, or an error wrapping ErrNotFound
	// when there is none or it references blobs the CAS no longer holds.
	Get(ctx context.Context, action cas.Digest) (*repb.ActionResult, error)
	// Put records the result of an action.
	Put(ctx context.Context, action cas.Digest, result *repb.ActionResult) error
}

// ErrNotFound is wrapped when there is no usable result.
var ErrNotFound = errors.New("action result not found")

var bucket = []byte("ac")

// BoltCache is a Cache in a bbolt file, checked against a CAS.
type BoltCache struct {
	db     *bolt.DB
	store  cas.Store
	hits   atomic.Int64
	misses atomic.Int64
}

// Open opens or creates the database at path.
func Open(path string, store cas.Store) (*BoltCache, error) {
	// The timeout turns a second server on the same root (the file is
	// locked) into an error instead of a hang.
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second, NoFreelistSync: true, FreelistType: bolt.FreelistMapType})
	if err != nil {
		return nil, fmt.Errorf("open action cache %s: %w", path, err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucket)
		return err
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("init action cache %s: %w", path, err)
	}
	return &BoltCache{db: db, store: store}, nil
}

// Close closes the database.
func (c *BoltCache) Close() error { return c.db.Close() }

func key(d cas.Digest) []byte { return []byte(d.String()) }

// Get implements Cache.
func (c *BoltCache) Get(ctx context.Context, action cas.Digest) (*repb.ActionResult, error) {
	var data []byte
	if err := c.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucket).Get(key(action)); v != nil {
			data = append([]byte(nil), v...)
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("read action cache: %w", err)
	}
	if data == nil {
		c.misses.Add(1)
		return nil, fmt.Errorf("action %s: %w", action, ErrNotFound)
	}
	res := &repb.ActionResult{}
	if err := proto.Unmarshal(data, res); err != nil {
		c.misses.Add(1)
		return nil, fmt.Errorf("action %s: stored result is corrupt (%v): %w", action, err, ErrNotFound)
	}
	missing, err := MissingBlobs(ctx, c.store, res)
	if err != nil {
		return nil, err
	}
	if len(missing) > 0 {
		c.misses.Add(1)
		return nil, fmt.Errorf("action %s: result references %d blobs no longer in the CAS (e.g. %s): %w", action, len(missing), missing[0], ErrNotFound)
	}
	c.hits.Add(1)
	return res, nil
}

// Put implements Cache.
func (c *BoltCache) Put(_ context.Context, action cas.Digest, result *repb.ActionResult) error {
	data, err := proto.Marshal(result)
	if err != nil {
		return fmt.Errorf("encode result of %s: %w", action, err)
	}
	if err := c.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucket).Put(key(action), data)
	}); err != nil {
		if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
			return fmt.Errorf("store result of %s: %w: %w", action, cas.ErrNoSpace, err)
		}
		return fmt.Errorf("store result of %s: %w", action, err)
	}
	return nil
}

// Stats are lookup counts since start.
type Stats struct {
	Hits, Misses int64
	Entries      int
}

// Stats returns hit and miss counts and the number of stored results.
func (c *BoltCache) Stats() Stats {
	s := Stats{Hits: c.hits.Load(), Misses: c.misses.Load()}
	c.db.View(func(tx *bolt.Tx) error {
		s.Entries = tx.Bucket(bucket).Stats().KeyN
		return nil
	})
	return s
}

// maxTreeSize bounds the Tree and Directory blobs MissingBlobs reads into
// memory; a result referencing a larger one is treated as incomplete.
const maxTreeSize = 64 << 20

// MissingBlobs lists the blobs res references (outputs, the files inside
// output directory trees or below root directories, stdout and stderr) that
// the store does not hold. The list may stop at the first missing blob.
func MissingBlobs(ctx context.Context, store cas.Store, res *repb.ActionResult) ([]cas.Digest, error) {
	var ds []cas.Digest
	add := func(pd *repb.Digest) {
		if pd == nil {
			return
		}
		if d, err := cas.FromProto(pd); err == nil {
			ds = append(ds, d)
		}
	}
	for _, f := range res.OutputFiles {
		add(f.Digest)
	}
	add(res.StdoutDigest)
	add(res.StderrDigest)
	var trees, roots []cas.Digest
	for _, d := range res.OutputDirectories {
		add(d.TreeDigest)
		add(d.RootDirectoryDigest)
		if td, err := cas.FromProto(d.TreeDigest); err == nil {
			trees = append(trees, td)
		} else if rd, err := cas.FromProto(d.RootDirectoryDigest); err == nil {
			// Only a root directory: its subdirectories are blobs too.
			roots = append(roots, rd)
		}
	}
	missing, err := missingOrCorrupt(ctx, store, ds)
	if err != nil || len(missing) > 0 {
		return missing, err
	}
	// The trees are present: check the files inside them too.
	ds = ds[:0]
	read := func(d cas.Digest, m proto.Message) (bool, error) {
		if d.Size > maxTreeSize {
			return false, nil
		}
		data, err := cas.ReadAll(ctx, store, d)
		if err != nil {
			if errors.Is(err, cas.ErrNotFound) { // also a corrupt (now quarantined) blob
				return false, nil
			}
			return false, err
		}
		return proto.Unmarshal(data, m) == nil, nil
	}
	for _, td := range trees {
		tree := &repb.Tree{}
		if ok, err := read(td, tree); !ok || err != nil {
			return []cas.Digest{td}, err
		}
		for _, dir := range append([]*repb.Directory{tree.Root}, tree.Children...) {
			if dir == nil {
				continue
			}
			for _, f := range dir.Files {
				add(f.Digest)
			}
		}
	}
	// Root directories: walk the Directory blobs (each read proves it present).
	seen := map[cas.Digest]bool{}
	for len(roots) > 0 {
		d := roots[0]
		roots = roots[1:]
		if seen[d] {
			continue
		}
		seen[d] = true
		dir := &repb.Directory{}
		if ok, err := read(d, dir); !ok || err != nil {
			return []cas.Digest{d}, err
		}
		for _, f := range dir.Files {
			add(f.Digest)
		}
		for _, sub := range dir.Directories {
			if sd, err := cas.FromProto(sub.Digest); err == nil {
				roots = append(roots, sd)
			} else {
				return []cas.Digest{d}, nil
			}
		}
	}
	return missingOrCorrupt(ctx, store, ds)
}

// missingOrCorrupt is FindMissing, plus the blobs the store finds corrupt
// (and quarantines) when it can verify them: a blob not hashed since the
// server started is hashed once before a result that references it is
// served, so that after a restart (when a power loss or a disk may have
// changed files) a client is not sent to download a blob that fails with
// DATA_LOSS (which Bazel 4 treats as an error, not as a cache miss) but
// runs the action instead. Blobs written or verified since the start cost
// a map lookup. At most verifyBudget bytes are hashed per lookup, so that
// a result with huge outputs still answers within a client's timeout;
// those outputs are verified when they are downloaded.
func missingOrCorrupt(ctx context.Context, store cas.Store, ds []cas.Digest) ([]cas.Digest, error) {
	missing, err := store.FindMissing(ctx, ds)
	if err != nil || len(missing) > 0 {
		return missing, err
	}
	if v, ok := store.(interface {
		VerifyBlobsWithin(context.Context, []cas.Digest, int64) ([]cas.Digest, error)
	}); ok {
		return v.VerifyBlobsWithin(ctx, ds, verifyBudget)
	}
	return nil, nil
}

// verifyBudget is how many bytes of not yet verified outputs one lookup
// hashes: about half a second at SHA-256 speed.
const verifyBudget = 1 << 30
