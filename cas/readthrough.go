// ReadThrough: one Store in front of another as its read-through cache
// (a farm worker's local disk in front of the farm's CAS).

package cas

import (
	"context"
	"fmt"
	"io"
	"sync"
)

// ReadThrough is a Store that keeps a cache Store in front of an origin
// Store. The origin is the source of truth: FindMissing asks it, so a blob
// only in the cache is missing. Reads are served from the cache, fetching
// each blob from the origin once (callers wanting a blob being fetched wait
// for that download); writes go to the cache, then to the origin unless it
// has the blob. Pins, local paths and verification are the cache's: input
// roots hardlink from a local cache, and a cached copy found corrupt is
// quarantined there and fetched again, never reported missing (the
// origin's copy is the one that counts).
type ReadThrough struct {
	cache, origin Store

	mu       sync.Mutex
	fetching map[Digest]*fetch // in-flight downloads, shared by callers
}

// fetch is one download of a blob into the cache that every caller
// wanting the blob meanwhile waits for.
type fetch struct {
	done chan struct{}
	err  error
}

// NewReadThrough returns a Store reading through cache to origin.
func NewReadThrough(cache, origin Store) *ReadThrough {
	return &ReadThrough{cache: cache, origin: origin, fetching: make(map[Digest]*fetch)}
}

// Cache is the store in front.
func (s *ReadThrough) Cache() Store { return s.cache }

// Origin is the store behind, the source of truth.
func (s *ReadThrough) Origin() Store { return s.origin }

// FindMissing implements Store by asking the origin.
func (s *ReadThrough) FindMissing(ctx context.Context, ds []Digest) ([]Digest, error) {
	return s.origin.FindMissing(ctx, ds)
}

// Get implements Store: from the cache, fetching the blob from the origin
// first when it is not there.
func (s *ReadThrough) Get(ctx context.Context, d Digest, offset int64) (io.ReadCloser, error) {
	if err := s.ensureCached(ctx, d); err != nil {
		return nil, err
	}
	return s.cache.Get(ctx, d, offset)
}

// LocalPath implements Store with the cache's file, fetching the blob
// first if needed.
func (s *ReadThrough) LocalPath(ctx context.Context, d Digest, executable bool) (string, error) {
	if err := s.ensureCached(ctx, d); err != nil {
		return "", err
	}
	return s.cache.LocalPath(ctx, d, executable)
}

// Pin implements Store on the cached copies.
func (s *ReadThrough) Pin(ds []Digest) func() { return s.cache.Pin(ds) }

// VerifyBlobs implements Store on the cached copies: one that went bad is
// quarantined in the cache and fetched again when it is next read, so it
// is never reported corrupt.
func (s *ReadThrough) VerifyBlobs(ctx context.Context, ds []Digest) ([]Digest, error) {
	_, err := s.cache.VerifyBlobs(ctx, ds)
	return nil, err
}

// Put implements Store: the blob is verified and stored in the cache, then
// written to the origin unless it has it.
func (s *ReadThrough) Put(ctx context.Context, d Digest, r io.Reader) error {
	if err := s.cache.Put(ctx, d, r); err != nil {
		return err
	}
	return s.upload(ctx, d)
}

// PutFile implements Store: the file moves into the cache (by rename, for
// a disk cache) and is then written to the origin.
func (s *ReadThrough) PutFile(ctx context.Context, path string) (Digest, error) {
	d, err := s.cache.PutFile(ctx, path)
	if err != nil {
		return d, err
	}
	return d, s.upload(ctx, d)
}

// ensureCached fetches d into the cache unless it is there.
func (s *ReadThrough) ensureCached(ctx context.Context, d Digest) error {
	if err := d.Validate(); err != nil {
		return err
	}
	if d.IsEmpty() {
		return nil
	}
	missing, err := s.cache.FindMissing(ctx, []Digest{d})
	if err != nil {
		return err
	}
	if len(missing) == 0 {
		return nil
	}
	// Runners staging the same inputs download each blob once.
	s.mu.Lock()
	f, ok := s.fetching[d]
	if !ok {
		f = &fetch{done: make(chan struct{})}
		s.fetching[d] = f
	}
	s.mu.Unlock()
	if ok {
		select {
		case <-f.done:
		case <-ctx.Done():
			return fmt.Errorf("wait for download of %s: %w", d, ctx.Err())
		}
		if f.err == nil {
			return nil
		}
		// The other download may have failed for its own reasons (its
		// context ended): try ourselves.
	}
	err = s.fetch(ctx, d)
	if !ok {
		f.err = err
		s.mu.Lock()
		delete(s.fetching, d)
		s.mu.Unlock()
		close(f.done)
	}
	return err
}

// fetch copies d from the origin into the cache, which verifies it.
func (s *ReadThrough) fetch(ctx context.Context, d Digest) error {
	r, err := s.origin.Get(ctx, d, 0)
	if err != nil {
		return err
	}
	defer r.Close()
	if err := s.cache.Put(ctx, d, r); err != nil {
		return fmt.Errorf("cache blob %s fetched from the origin: %w", d, err)
	}
	return nil
}

// upload writes the cached d to the origin unless it has it.
func (s *ReadThrough) upload(ctx context.Context, d Digest) error {
	if d.IsEmpty() {
		return nil
	}
	missing, err := s.origin.FindMissing(ctx, []Digest{d})
	if err != nil {
		return err
	}
	if len(missing) == 0 {
		return nil
	}
	r, err := s.cache.Get(ctx, d, 0)
	if err != nil {
		return fmt.Errorf("upload %s: %w", d, err)
	}
	defer r.Close()
	return s.origin.Put(ctx, d, r)
}
