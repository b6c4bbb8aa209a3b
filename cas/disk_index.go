// The DiskStore's in-memory index and LRU order: lookups, eviction under
// the size limit, pins, and linking a verified file into place as a blob.

package cas

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// touchInterval bounds how often a blob's mtime is refreshed on access: LRU
// order within a run lives in memory, mtime only orders blobs after a restart.
const touchInterval = time.Hour

// FindMissing implements Store. Present blobs count as used.
func (s *DiskStore) FindMissing(ctx context.Context, ds []Digest) ([]Digest, error) {
	var missing []Digest
	var touch []string
	now := time.Now()
	// The index lock is taken per chunk, not for the whole request, so a
	// client asking about millions of digests does not stall every other
	// client's lookups and writes; a cancelled request stops between chunks.
	for len(ds) > 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		chunk := ds[:min(len(ds), findMissingChunk)]
		ds = ds[len(chunk):]
		s.mu.Lock()
		for _, d := range chunk {
			if d.Size == 0 && d.Hash == EmptyDigest.Hash {
				continue
			}
			e, ok := s.index[d.Hash]
			if !ok || e.size != d.Size {
				missing = append(missing, d)
				continue
			}
			touch = s.useLocked(e, now, touch)
		}
		s.mu.Unlock()
	}
	s.touchFiles(touch, now)
	return missing, nil
}

// findMissingChunk is how many digests FindMissing checks per hold of the
// index lock (about a millisecond's work).
const findMissingChunk = 4096

// useLocked marks e most recently used and collects it for an mtime
// refresh when its mtime is stale.
func (s *DiskStore) useLocked(e *entry, now time.Time, touch []string) []string {
	s.lru.MoveToFront(e.elem)
	if e.file && now.Sub(e.diskTime) > touchInterval {
		e.diskTime = now
		touch = append(touch, e.hash)
	}
	return touch
}

// touchFiles refreshes mtimes, the LRU order a restart sees. A few are
// done at once; many (the first lookups after a restart) in the
// background, so FindMissing never waits for thousands of syscalls.
func (s *DiskStore) touchFiles(hashes []string, now time.Time) {
	touch := func() {
		for _, h := range hashes {
			// Best effort: a concurrently evicted blob is fine to miss.
			_ = os.Chtimes(s.blobPath(h), now, now)
		}
	}
	switch {
	case len(hashes) == 0:
	case len(hashes) <= 16:
		touch()
	default:
		go touch()
	}
}

// has reports whether the blob is indexed, marking it used.
func (s *DiskStore) has(d Digest) bool {
	s.mu.Lock()
	e, ok := s.index[d.Hash]
	ok = ok && e.size == d.Size
	var touch []string
	now := time.Now()
	if ok {
		touch = s.useLocked(e, now, nil)
	}
	s.mu.Unlock()
	s.touchFiles(touch, now)
	return ok
}

// forget drops a blob whose file has gone from the index.
func (s *DiskStore) forget(hash string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.index[hash]; ok {
		if _, err := os.Lstat(s.blobPath(hash)); err == nil {
			return // re-added since
		}
		if e.pk != nil {
			e.file = false // the pack record is still there
			return
		}
		s.dropLocked(e)
	}
}

// linkPath moves the verified, read-only (and durable, as the store's
// Durability asks) file tmp into place as blob d: link with a rename.
func (s *DiskStore) linkPath(tmp string, d Digest, syncDir bool) error {
	// syscall.Rename, not os.Rename: that one stats the target first.
	return s.link(d, syncDir, func(dst string) error { return syscall.Rename(tmp, dst) }, func() { os.Remove(tmp) })
}

// link puts a verified, read-only (and durable, as the store's Durability
// asks) file into place as blob d with place(dst), and indexes it. If d is
// already stored intact, discard is called instead. Room is made before
// placing, so a blob that cannot be kept (everything else pinned) is never
// put in place. Placing runs without holding mu, so lookups never wait
// for the disk.
//
// With syncDir the shard directory's new entry is made durable too (see
// syncName) before the blob is indexed.
func (s *DiskStore) link(d Digest, syncDir bool, place func(dst string) error, discard func()) error {
	// Discard only for a stored copy that is known good: one indexed by
	// hash alone may be truncated or rotten, and the new file is verified,
	// so it replaces that copy (a rename over it, no costlier than the
	// remove).
	if s.intact(d) {
		discard()
		return nil
	}
	s.mu.Lock()
	// The pending mark keeps an indexed copy this replaces from eviction.
	s.pending[d.Hash]++
	grow := d.Size
	if e, ok := s.index[d.Hash]; ok {
		grow = max(d.Size-e.size, 0)
	}
	if s.maxSize > 0 {
		fail := ""
		if d.Size > s.maxSize {
			fail = fmt.Sprintf("blob %s is larger than the store's size limit of %d bytes", d, s.maxSize)
		} else if !s.evictLocked(grow) {
			fail = fmt.Sprintf("store %d bytes for blob %s: the size limit of %d bytes is taken by blobs of actions in flight", d.Size, d, s.maxSize)
		}
		if fail != "" {
			if s.pending[d.Hash]--; s.pending[d.Hash] <= 0 {
				delete(s.pending, d.Hash)
			}
			s.mu.Unlock()
			return fmt.Errorf("%s: %w", fail, ErrNoSpace)
		}
	}
	s.reserved += grow
	s.mu.Unlock()

	err := place(s.blobPath(d.Hash))
	if err == nil {
		s.placed()
		if syncDir {
			err = s.syncName(filepath.Dir(s.blobPath(d.Hash)))
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	s.reserved -= grow
	if s.pending[d.Hash]--; s.pending[d.Hash] <= 0 {
		delete(s.pending, d.Hash)
	}
	if err != nil {
		return s.spaceErr(fmt.Errorf("move blob %s into place: %w", d, err))
	}
	if e, ok := s.index[d.Hash]; ok { // replaced, or another upload of d got there first
		s.size += d.Size - e.size
		if e.pk != nil && (e.size != d.Size || !e.verified) {
			// A record not known good: the verified file replaces it.
			s.deadEntryLocked(e)
			e.pk = nil
		}
		e.size, e.verified, e.diskTime, e.file = d.Size, true, time.Now(), true
		s.lru.MoveToFront(e.elem)
		return nil
	}
	e := &entry{hash: d.Hash, size: d.Size, diskTime: time.Now(), verified: true, file: true}
	e.elem = s.lru.PushFront(e)
	s.index[d.Hash] = e
	s.size += d.Size
	return nil
}

// evictLocked removes least recently used blobs that are neither pinned
// nor being written until need more bytes fit under the limit, and reports
// whether they do.
func (s *DiskStore) evictLocked(need int64) bool {
	if s.maxSize <= 0 {
		return true
	}
	for el := s.lru.Back(); el != nil && s.size+s.reserved+s.uploading+need > s.maxSize; {
		e := el.Value.(*entry)
		prev := el.Prev()
		if s.pins[e.hash] == 0 && s.pending[e.hash] == 0 {
			file := e.file
			s.dropLocked(e)
			s.evictions++
			if file {
				os.Remove(s.blobPath(e.hash))
			}
			os.Remove(filepath.Join(s.execDir, e.hash))
		}
		el = prev
	}
	return s.size+s.reserved+s.uploading+need <= s.maxSize
}

// Evict shrinks the store to at most max bytes now (max <= 0 uses the
// configured limit), returning how many blobs were removed.
func (s *DiskStore) Evict(max int64) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	before := s.evictions
	saved := s.maxSize
	if max > 0 {
		s.maxSize = max
	}
	s.evictLocked(0)
	s.maxSize = saved
	return s.evictions - before
}

// Pin implements Store. Pinning a digest that is not stored yet protects
// it from the moment it is.
func (s *DiskStore) Pin(ds []Digest) func() {
	s.mu.Lock()
	for _, d := range ds {
		s.pins[d.Hash]++
	}
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			for _, d := range ds {
				if s.pins[d.Hash]--; s.pins[d.Hash] <= 0 {
					delete(s.pins, d.Hash)
				}
			}
			s.evictLocked(0)
			s.mu.Unlock()
		})
	}
}
