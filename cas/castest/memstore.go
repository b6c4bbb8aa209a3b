package castest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/actiond/actiond/cas"
)

// MemStore is a cas.Store that keeps blobs in memory and does nothing
// else: no files, no durability, no eviction. Benchmarks serve it to
// measure what the gRPC services cost on their own, next to the disk
// store in the same run.
type MemStore struct {
	cas.Base
	mu    sync.RWMutex
	blobs map[cas.Digest][]byte
}

// NewMemStore returns an empty MemStore.
func NewMemStore() *MemStore { return &MemStore{blobs: map[cas.Digest][]byte{}} }

// FindMissing implements cas.Store.
func (s *MemStore) FindMissing(_ context.Context, ds []cas.Digest) ([]cas.Digest, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var missing []cas.Digest
	for _, d := range ds {
		if _, ok := s.blobs[d]; !ok && !d.IsEmpty() {
			missing = append(missing, d)
		}
	}
	return missing, nil
}

// Get implements cas.Store.
func (s *MemStore) Get(_ context.Context, d cas.Digest, offset int64) (io.ReadCloser, error) {
	if err := cas.ValidateRead(d, offset); err != nil {
		return nil, err
	}
	if d.IsEmpty() {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	s.mu.RLock()
	b, ok := s.blobs[d]
	s.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", d, cas.ErrNotFound)
	}
	return io.NopCloser(bytes.NewReader(b[offset:])), nil
}

// Put implements cas.Store.
func (s *MemStore) Put(_ context.Context, d cas.Digest, r io.Reader) error {
	if err := d.Validate(); err != nil {
		return err
	}
	b, err := io.ReadAll(io.LimitReader(r, d.Size+1))
	if err != nil {
		return err
	}
	if got := cas.DigestOf(b); got != d {
		return fmt.Errorf("blob %s: got %d bytes hashing to %s: %w", d, len(b), got, cas.ErrDigestMismatch)
	}
	s.mu.Lock()
	s.blobs[d] = b
	s.mu.Unlock()
	return nil
}

// PutFile implements cas.Store.
func (s *MemStore) PutFile(_ context.Context, path string) (cas.Digest, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return cas.Digest{}, err
	}
	d := cas.DigestOf(b)
	s.mu.Lock()
	s.blobs[d] = b
	s.mu.Unlock()
	return d, os.Remove(path)
}
