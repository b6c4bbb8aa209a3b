// PutBatch: storing many small blobs behind one durability barrier.

package cas

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
)

// PutBatch implements BatchPutter: every blob is verified and written to
// a temp file, one durability barrier covers them all (syncfs(2) where
// available), then they are renamed into place. A kill at any point
// leaves only temp files, which the next start removes. File creation and
// renames, which cost more in the kernel than anything else here, run on
// a few goroutines.
func (s *DiskStore) PutBatch(ctx context.Context, blobs []Blob) []error {
	errs := make([]error, len(blobs))
	// Which blobs to write: valid, new, each digest once.
	var todo []int
	seen := make(map[string]int, len(blobs))
	for i, b := range blobs {
		d := b.Digest
		if err := d.Validate(); err != nil {
			errs[i] = err
			continue
		}
		if int64(len(b.Data)) != d.Size {
			errs[i] = fmt.Errorf("blob %s: got %d bytes: %w", d, len(b.Data), ErrDigestMismatch)
			continue
		}
		if j, dup := seen[d.Hash]; dup && blobs[j].Digest == d {
			continue
		}
		if d.IsEmpty() || s.intact(d) {
			// Still check the data: the caller must learn it was wrong.
			if got := DigestOf(b.Data); got != d {
				errs[i] = fmt.Errorf("blob %s: data hashes to %s: %w", d, got.Hash, ErrDigestMismatch)
			}
			continue
		}
		if s.maxSize > 0 && d.Size > s.maxSize {
			errs[i] = fmt.Errorf("blob %s is larger than the store's size limit of %d bytes: %w", d, s.maxSize, ErrNoSpace)
			continue
		}
		seen[d.Hash] = i
		todo = append(todo, i)
	}
	todo = s.putPackedBatch(blobs, todo, errs)
	for len(todo) > 0 {
		chunk := todo[:min(len(todo), batchChunk)]
		todo = todo[len(chunk):]
		s.putChunk(blobs, chunk, errs)
	}
	// Duplicates within the batch share the first copy's outcome.
	for i, b := range blobs {
		if j, ok := seen[b.Digest.Hash]; ok && j != i && errs[i] == nil && blobs[j].Digest == b.Digest {
			if got := DigestOf(b.Data); got != b.Digest {
				errs[i] = fmt.Errorf("blob %s: data hashes to %s: %w", b.Digest, got.Hash, ErrDigestMismatch)
			} else if errors.Is(errs[j], ErrDigestMismatch) {
				errs[i] = s.Put(ctx, b.Digest, bytes.NewReader(b.Data)) // the first copy was the wrong one
			} else {
				errs[i] = errs[j]
			}
		}
	}
	return errs
}

// putPackedBatch stores the blobs of todo that go to packs, hashing them
// on a few goroutines and appending them together, and returns the rest.
func (s *DiskStore) putPackedBatch(blobs []Blob, todo []int, errs []error) []int {
	var packed, rest []int
	for _, i := range todo {
		if s.packable(blobs[i].Digest.Size) {
			packed = append(packed, i)
		} else {
			rest = append(rest, i)
		}
	}
	if len(packed) == 0 {
		return rest
	}
	parallel(len(packed), func(k int) {
		b := blobs[packed[k]]
		if got := DigestOf(b.Data); got != b.Digest {
			errs[packed[k]] = fmt.Errorf("blob %s: data hashes to %s: %w", b.Digest, got.Hash, ErrDigestMismatch)
		}
	})
	var good []int
	var put []Blob
	for _, i := range packed {
		if errs[i] == nil {
			good = append(good, i)
			put = append(put, blobs[i])
		}
	}
	for len(put) > 0 {
		n := min(len(put), batchChunk)
		for k, err := range s.putPacked(put[:n]) {
			errs[good[k]] = err
		}
		put, good = put[n:], good[n:]
	}
	return rest
}

// batchChunk bounds the temp files a batch holds open at once (unnamed
// temp files live only as long as their descriptor).
const batchChunk = 1024

// putChunk stores blobs[i] for every i in todo, setting errs[i].
func (s *DiskStore) putChunk(blobs []Blob, todo []int, errs []error) {
	// One barrier for many files: a shared group-commit round, or under
	// FsyncEach a syncfs of its own for a batch large enough to pay for it.
	barrier := s.group != nil || (s.durability == FsyncEach && len(todo) > 8 && syncFSSupported)
	tmps := make([]tempFile, len(todo)) // tmps[k] holds blobs[todo[k]]
	defer func() {
		for _, t := range tmps {
			t.close()
		}
	}()
	parallel(len(todo), func(k int) {
		i := todo[k]
		b := blobs[i]
		if got := DigestOf(b.Data); got != b.Digest {
			errs[i] = fmt.Errorf("blob %s: data hashes to %s: %w", b.Digest, got.Hash, ErrDigestMismatch)
			return
		}
		tmps[k], errs[i] = s.writeTemp(b.Digest, b.Data, s.durability == FsyncEach && !barrier)
	})
	// Under group commit the one round after the renames covers the bytes
	// too (see GroupCommit); a syncfs of its own makes them durable first.
	if barrier && s.group == nil {
		if err := s.batchBarrier(); err != nil {
			err = s.spaceErr(fmt.Errorf("sync batch: %w", err))
			for _, i := range todo {
				if errs[i] == nil {
					errs[i] = err
				}
			}
			return
		}
	}
	parallel(len(todo), func(k int) {
		i := todo[k]
		if errs[i] != nil {
			return
		}
		if errs[i] = s.placeTemp(tmps[k], blobs[i].Digest, !barrier); errs[i] == nil {
			tmps[k].name = "" // renamed into place, or removed as a duplicate
		}
	})
	if barrier {
		// One more barrier makes the new names (and under group commit
		// the bytes) durable.
		if err := s.batchBarrier(); err != nil {
			err = s.spaceErr(fmt.Errorf("sync batch names: %w", err))
			for _, i := range todo {
				if errs[i] == nil {
					errs[i] = err
				}
			}
		}
	}
}

// batchBarrier makes everything written so far durable: a group-commit
// round shared with other uploads, or a syncfs of its own.
func (s *DiskStore) batchBarrier() error {
	if s.group != nil {
		return s.group.wait()
	}
	return syncFS(s.blobDir)
}

// batchWorkers is how many goroutines PutBatch uses for file operations.
const batchWorkers = 4

// parallel runs fn(0..n-1) on up to batchWorkers goroutines.
func parallel(n int, fn func(int)) {
	workers := min(batchWorkers, (n+15)/16)
	if workers <= 1 {
		for i := 0; i < n; i++ {
			fn(i)
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				fn(i)
			}
		}()
	}
	wg.Wait()
}

// tempFile is a verified blob written to a temp file: unnamed and open
// (f), or named and closed (name).
type tempFile struct {
	f    *os.File
	name string
}

// close releases t: an unnamed file vanishes, a named one is removed
// unless it was placed.
func (t tempFile) close() {
	if t.f != nil {
		t.f.Close()
	}
	if t.name != "" {
		os.Remove(t.name)
	}
}

// placeTemp makes t the blob d (see link).
func (s *DiskStore) placeTemp(t tempFile, d Digest, syncDir bool) error {
	if t.f != nil {
		return s.linkAnonFile(t.f, d, syncDir)
	}
	return s.linkPath(t.name, d, syncDir)
}

// writeTemp writes data to a new read-only temp file, optionally fsynced.
func (s *DiskStore) writeTemp(d Digest, data []byte, sync bool) (tempFile, error) {
	var t tempFile
	var f *os.File
	var err error
	if s.anonTemp {
		f, err = openAnon(s.tmpDir)
		t.f = f
	} else if f, err = s.createTemp(d.Hash[:16]); err == nil {
		t.name = f.Name()
	}
	if err != nil {
		return tempFile{}, s.spaceErr(fmt.Errorf("blob %s: %w", d, err))
	}
	_, err = f.Write(data)
	if err == nil && t.name != "" {
		err = f.Chmod(0o444)
	}
	if err == nil && sync {
		err = f.Sync()
	}
	if t.name != "" {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		t.close()
		return tempFile{}, s.spaceErr(fmt.Errorf("write blob %s: %w", d, err))
	}
	return t, nil
}
