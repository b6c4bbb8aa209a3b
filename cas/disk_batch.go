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
	// One syncfs for many files; a few are cheaper to fsync one by one.
	barrier := s.fsync && len(todo) > 8 && syncFSSupported
	tmps := make([]string, len(blobs))
	parallel(len(todo), func(k int) {
		i := todo[k]
		b := blobs[i]
		if got := DigestOf(b.Data); got != b.Digest {
			errs[i] = fmt.Errorf("blob %s: data hashes to %s: %w", b.Digest, got.Hash, ErrDigestMismatch)
			return
		}
		tmps[i], errs[i] = s.writeTemp(b.Digest, b.Data, s.fsync && !barrier)
	})
	if barrier {
		if err := syncFS(s.tmpDir); err != nil {
			err = s.spaceErr(fmt.Errorf("sync batch: %w", err))
			for _, i := range todo {
				if tmps[i] != "" {
					os.Remove(tmps[i])
					errs[i] = err
				}
			}
			return errs
		}
	}
	parallel(len(todo), func(k int) {
		i := todo[k]
		if tmps[i] == "" {
			return
		}
		if err := s.link(tmps[i], blobs[i].Digest, !barrier); err != nil {
			os.Remove(tmps[i])
			errs[i] = err
		}
	})
	if barrier {
		// One more barrier makes the new names durable too.
		if err := syncFS(s.blobDir); err != nil {
			err = s.spaceErr(fmt.Errorf("sync batch names: %w", err))
			for _, i := range todo {
				if errs[i] == nil {
					errs[i] = err
				}
			}
		}
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

// writeTemp writes data to a new read-only temp file, optionally fsynced,
// and returns its name.
func (s *DiskStore) writeTemp(d Digest, data []byte, sync bool) (string, error) {
	f, err := s.createTemp(d.Hash[:16])
	if err != nil {
		return "", fmt.Errorf("blob %s: %w", d, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(0o444)
	}
	if err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", s.spaceErr(fmt.Errorf("write blob %s: %w", d, err))
	}
	return f.Name(), nil
}
