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
	"sync"
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

// WriteBehind is a Cache that can also record a result without waiting for
// it to reach the disk. The executor records the results of the actions it
// ran this way: the client already has the result, and an entry lost to a
// crash is only a cache miss, while waiting for the commit (two fdatasyncs
// in bbolt; in the VM guest two flushes of the disk image on the host) would
// add to every action's latency.
type WriteBehind interface {
	Cache
	// PutBehind records result like Put but may return before it is
	// durable. Until it is, Get returns it from memory. A commit that
	// fails is reported to onError (if not nil) and the result is dropped.
	PutBehind(action cas.Digest, result *repb.ActionResult, onError func(error)) error
}

var bucket = []byte("ac")

// BoltCache is a Cache in a bbolt file, checked against a CAS.
type BoltCache struct {
	db     *bolt.DB
	store  cas.Store
	hits   atomic.Int64
	misses atomic.Int64
	limits atomic.Pointer[Limits]

	// Results recorded by PutBehind and not yet committed.
	behindMu sync.Mutex
	pending  map[string]*behindEntry // by key
	writing  chan struct{}           // closed when the running writer ends; nil when none runs
	closed   bool
	// What PutBehind recorded, and the transactions that committed it.
	behindResults, behindCommits atomic.Int64
}

// behindEntry is a result waiting for its commit.
type behindEntry struct {
	data    []byte
	onError func(error)
}

// Limits are the limits Get checks results within (DefaultLimits unless
// set with SetLimits).
func (c *BoltCache) Limits() Limits {
	if l := c.limits.Load(); l != nil {
		return *l
	}
	return DefaultLimits
}

// SetLimits changes the limits Get checks results within.
func (c *BoltCache) SetLimits(l Limits) { c.limits.Store(&l) }

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

// Close commits what PutBehind recorded and closes the database.
func (c *BoltCache) Close() error {
	c.behindMu.Lock()
	c.closed = true
	c.behindMu.Unlock()
	c.Flush()
	return c.db.Close()
}

var _ WriteBehind = (*BoltCache)(nil)

// PutBehind implements WriteBehind. Results recorded while a commit runs
// are committed together in the next one: one transaction (and its syncs)
// for all the actions that finished meanwhile.
func (c *BoltCache) PutBehind(action cas.Digest, result *repb.ActionResult, onError func(error)) error {
	data, err := proto.Marshal(result)
	if err != nil {
		return fmt.Errorf("encode result of %s: %w", action, err)
	}
	c.behindMu.Lock()
	defer c.behindMu.Unlock()
	if c.closed {
		return fmt.Errorf("store result of %s: action cache closed", action)
	}
	if c.pending == nil {
		c.pending = make(map[string]*behindEntry)
	}
	c.pending[string(key(action))] = &behindEntry{data: data, onError: onError}
	c.behindResults.Add(1)
	if c.writing == nil {
		c.writing = make(chan struct{})
		go c.writeBehind(c.writing)
	}
	return nil
}

// writeBehind commits pending results until there are none, then closes
// done.
func (c *BoltCache) writeBehind(done chan struct{}) {
	for {
		c.behindMu.Lock()
		if len(c.pending) == 0 {
			c.writing = nil
			c.behindMu.Unlock()
			close(done)
			return
		}
		batch := make(map[string]*behindEntry, len(c.pending))
		for k, e := range c.pending {
			batch[k] = e
		}
		c.behindMu.Unlock()
		err := c.db.Update(func(tx *bolt.Tx) error {
			b := tx.Bucket(bucket)
			c.behindMu.Lock()
			defer c.behindMu.Unlock()
			for k, e := range batch {
				if c.pending[k] != e {
					continue // a Put replaced it: the newer result stands
				}
				if err := b.Put([]byte(k), e.data); err != nil {
					return err
				}
			}
			return nil
		})
		c.behindCommits.Add(1)
		c.behindMu.Lock()
		for k, e := range batch {
			if c.pending[k] == e { // not replaced by a newer result meanwhile
				delete(c.pending, k)
			}
		}
		c.behindMu.Unlock()
		if err != nil {
			for k, e := range batch {
				if e.onError != nil {
					e.onError(fmt.Errorf("store result of %s: %w", k, storeErr(err)))
				}
			}
		}
	}
}

// Flush waits until every result PutBehind recorded before it was called
// is committed (or failed).
func (c *BoltCache) Flush() {
	for {
		c.behindMu.Lock()
		done := c.writing
		c.behindMu.Unlock()
		if done == nil {
			return
		}
		<-done
	}
}

func key(d cas.Digest) []byte { return []byte(d.String()) }

// Get implements Cache.
func (c *BoltCache) Get(ctx context.Context, action cas.Digest) (*repb.ActionResult, error) {
	// An empty result (exit 0, nothing else) encodes as no bytes: found
	// tells it from none.
	var data []byte
	found := false
	c.behindMu.Lock()
	if e := c.pending[string(key(action))]; e != nil {
		data, found = e.data, true // never changed once recorded
	}
	c.behindMu.Unlock()
	if !found {
		if err := c.db.View(func(tx *bolt.Tx) error {
			if v := tx.Bucket(bucket).Get(key(action)); v != nil {
				data, found = append([]byte(nil), v...), true
			}
			return nil
		}); err != nil {
			return nil, fmt.Errorf("read action cache: %w", err)
		}
	}
	if !found {
		c.misses.Add(1)
		return nil, fmt.Errorf("action %s: %w", action, ErrNotFound)
	}
	res := &repb.ActionResult{}
	if err := proto.Unmarshal(data, res); err != nil {
		c.misses.Add(1)
		return nil, fmt.Errorf("action %s: stored result is corrupt (%v): %w", action, err, ErrNotFound)
	}
	missing, err := missingBlobs(ctx, c.store, res, c.Limits())
	if errors.Is(err, ErrTooLarge) {
		// Stored before the limits (UpdateActionResult refuses such
		// results now): not worth checking, so not a hit.
		c.misses.Add(1)
		return nil, fmt.Errorf("action %s: %w: %w", action, err, ErrNotFound)
	}
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
	// A result recorded behind for the same action is older: it must not
	// be committed over this one (the writer checks under behindMu, in its
	// transaction, which this one's follows if it is running).
	c.behindMu.Lock()
	delete(c.pending, string(key(action)))
	c.behindMu.Unlock()
	if err := c.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucket).Put(key(action), data)
	}); err != nil {
		return fmt.Errorf("store result of %s: %w", action, storeErr(err))
	}
	return nil
}

// storeErr marks a commit that failed for want of space as cas.ErrNoSpace.
func storeErr(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: %w", cas.ErrNoSpace, err)
	}
	return err
}

// Stats are lookup counts since start.
type Stats struct {
	Hits, Misses int64
	Entries      int
	// BehindResults are the results PutBehind recorded since start, and
	// BehindCommits the transactions that committed them: results per
	// commit is how much each commit was shared.
	BehindResults, BehindCommits int64
}

// Stats returns hit and miss counts and the number of stored results
// (once what PutBehind recorded is committed).
func (c *BoltCache) Stats() Stats {
	c.Flush()
	s := Stats{Hits: c.hits.Load(), Misses: c.misses.Load(), BehindResults: c.behindResults.Load(), BehindCommits: c.behindCommits.Load()}
	c.db.View(func(tx *bolt.Tx) error {
		s.Entries = tx.Bucket(bucket).Stats().KeyN
		return nil
	})
	return s
}

// maxTreeSize bounds the Tree and Directory blobs MissingBlobs reads into
// memory; a result referencing a larger one is treated as incomplete.
const maxTreeSize = 64 << 20

// Limits bound the work of checking that a result is complete. Each
// distinct blob is checked once and each distinct Tree read once, so a
// result naming one Tree many times costs no more than naming it once;
// these bound what is left.
type Limits struct {
	// MaxBlobs is how many distinct blobs a result may reference (output
	// files, trees and every file inside them, stdout, stderr).
	MaxBlobs int
	// MaxTreeBytes is how many bytes of distinct Tree and Directory blobs
	// a result's output directories may take in all.
	MaxTreeBytes int64
}

// DefaultLimits are the limits of Open and NewService: far above what a
// build writes (a million output files), far below what would stall the
// server for other clients.
var DefaultLimits = Limits{MaxBlobs: 1 << 20, MaxTreeBytes: 256 << 20}

// OrDefault returns l with each zero field replaced by DefaultLimits'.
func (l Limits) OrDefault() Limits {
	if l.MaxBlobs == 0 {
		l.MaxBlobs = DefaultLimits.MaxBlobs
	}
	if l.MaxTreeBytes == 0 {
		l.MaxTreeBytes = DefaultLimits.MaxTreeBytes
	}
	return l
}

// ErrTooLarge is wrapped when a result references more than Limits allow.
var ErrTooLarge = errors.New("action result is too large")

// findMissingChunk is how many digests go to the store in one FindMissing
// call: the disk store holds its index lock for a call, and other
// clients' lookups must not wait for a whole large result.
const findMissingChunk = 4096

// findMissing is store.FindMissing in chunks, stopping at the first chunk
// with a missing blob.
func findMissing(ctx context.Context, store cas.Store, ds []cas.Digest) ([]cas.Digest, error) {
	for len(ds) > 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n := min(len(ds), findMissingChunk)
		missing, err := store.FindMissing(ctx, ds[:n])
		if err != nil || len(missing) > 0 {
			return missing, err
		}
		ds = ds[n:]
	}
	return nil, nil
}

// digestSet collects distinct digests up to a limit.
type digestSet struct {
	seen  map[cas.Digest]struct{}
	list  []cas.Digest
	limit int
}

func (s *digestSet) add(pd *repb.Digest) error {
	if pd == nil {
		return nil
	}
	d, err := cas.FromProto(pd)
	if err != nil {
		return nil // Validate refuses these; a stored one is never found
	}
	if _, ok := s.seen[d]; ok {
		return nil
	}
	if s.limit > 0 && len(s.list) >= s.limit {
		return fmt.Errorf("%w: it references more than %d distinct blobs (the limit)", ErrTooLarge, s.limit)
	}
	s.seen[d] = struct{}{}
	s.list = append(s.list, d)
	return nil
}

// MissingBlobs lists the blobs res references (outputs, the files inside
// output directory trees or below root directories, stdout and stderr) that
// the store does not hold, within DefaultLimits. The list may stop at the
// first missing blob.
func MissingBlobs(ctx context.Context, store cas.Store, res *repb.ActionResult) ([]cas.Digest, error) {
	return missingBlobs(ctx, store, res, DefaultLimits)
}

// missingBlobs is MissingBlobs within l; a result over l is an error
// wrapping ErrTooLarge.
func missingBlobs(ctx context.Context, store cas.Store, res *repb.ActionResult, l Limits) ([]cas.Digest, error) {
	ds := &digestSet{seen: make(map[cas.Digest]struct{}), limit: l.MaxBlobs}
	for _, f := range res.OutputFiles {
		if err := ds.add(f.Digest); err != nil {
			return nil, err
		}
	}
	if err := ds.add(res.StdoutDigest); err != nil {
		return nil, err
	}
	if err := ds.add(res.StderrDigest); err != nil {
		return nil, err
	}
	var trees, roots []cas.Digest
	seenTree := map[cas.Digest]bool{}
	for _, d := range res.OutputDirectories {
		if err := ds.add(d.TreeDigest); err != nil {
			return nil, err
		}
		if err := ds.add(d.RootDirectoryDigest); err != nil {
			return nil, err
		}
		if td, err := cas.FromProto(d.TreeDigest); err == nil {
			if !seenTree[td] {
				seenTree[td] = true
				trees = append(trees, td)
			}
		} else if rd, err := cas.FromProto(d.RootDirectoryDigest); err == nil {
			// Only a root directory: its subdirectories are blobs too.
			roots = append(roots, rd)
		}
	}
	missing, err := missingOrCorrupt(ctx, store, ds.list)
	if err != nil || len(missing) > 0 {
		return missing, err
	}
	// The trees are present: check the files inside them too.
	checked := len(ds.list)
	var treeBytes int64
	read := func(d cas.Digest, m proto.Message) (bool, error) {
		if d.Size > maxTreeSize {
			return false, nil
		}
		if treeBytes += d.Size; l.MaxTreeBytes > 0 && treeBytes > l.MaxTreeBytes {
			return false, fmt.Errorf("%w: its output directories take more than %d bytes of Tree and Directory blobs (the limit)", ErrTooLarge, l.MaxTreeBytes)
		}
		if err := ctx.Err(); err != nil {
			return false, err
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
				if err := ds.add(f.Digest); err != nil {
					return nil, err
				}
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
			if err := ds.add(f.Digest); err != nil {
				return nil, err
			}
		}
		for _, sub := range dir.Directories {
			if sd, err := cas.FromProto(sub.Digest); err == nil {
				roots = append(roots, sd)
			} else {
				return []cas.Digest{d}, nil
			}
		}
	}
	return missingOrCorrupt(ctx, store, ds.list[checked:])
}

// CheckLimits reports, wrapping ErrTooLarge, whether res references more
// than l allows. Blobs that are not stored yet are not counted.
func CheckLimits(ctx context.Context, store cas.Store, res *repb.ActionResult, l Limits) error {
	_, err := missingBlobs(ctx, store, res, l)
	if errors.Is(err, ErrTooLarge) {
		return err
	}
	return nil
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
	missing, err := findMissing(ctx, store, ds)
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
