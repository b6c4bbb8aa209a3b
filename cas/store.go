package cas

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// Store is the blob storage every part of actiond reads and writes through.
// Implementations must be safe for concurrent use and must never return a
// blob whose content does not match its digest.
type Store interface {
	// FindMissing returns the digests in ds that the store does not hold,
	// in the order of ds.
	FindMissing(ctx context.Context, ds []Digest) ([]Digest, error)
	// Get opens a blob for reading from offset. A missing blob is an error
	// wrapping ErrNotFound.
	Get(ctx context.Context, d Digest, offset int64) (io.ReadCloser, error)
	// Put stores the content r yields under d, failing with an error
	// wrapping ErrDigestMismatch (and storing nothing) when it does not hash to d.
	Put(ctx context.Context, d Digest, r io.Reader) error
	// PutFile moves the file at path into the store and returns its digest;
	// path no longer exists afterwards. It is the cheap way to store outputs.
	PutFile(ctx context.Context, path string) (Digest, error)
}

var (
	// ErrNotFound is wrapped when a blob is not in the store.
	ErrNotFound = errors.New("blob not found")
	// ErrDigestMismatch is wrapped when data does not hash to its declared digest.
	ErrDigestMismatch = errors.New("data does not match digest")
	// ErrNoSpace is wrapped when the store cannot take a blob: disk full, or
	// the size limit cannot be met without evicting blobs in use.
	ErrNoSpace = errors.New("no space for blob")
)

// ReadAll reads a whole blob into memory; for blobs known to be small
// (protos, batch reads): callers bound d.Size before calling.
func ReadAll(ctx context.Context, s Store, d Digest) ([]byte, error) {
	if d.IsEmpty() {
		return []byte{}, nil
	}
	if d.Size == 0 {
		// Only the empty blob has size 0: a digest with another hash
		// names data that cannot exist.
		return nil, fmt.Errorf("blob %s: %w", d, ErrNotFound)
	}
	r, err := s.Get(ctx, d, 0)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	b := make([]byte, d.Size)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("read blob %s: %w", d, err)
	}
	return b, nil
}

// Blob is a digest with its content, for batch writes.
type Blob struct {
	Digest Digest
	Data   []byte
}

// BatchPutter is implemented by stores that can store many small blobs
// more cheaply together than one by one (one durability barrier for the
// batch instead of one per blob).
type BatchPutter interface {
	// PutBatch stores every blob whose data hashes to its digest and
	// returns one error per blob (nil for success), in order.
	PutBatch(ctx context.Context, blobs []Blob) []error
}

// Pinner is implemented by stores with a size limit: pinned digests are not
// evicted until the returned release function is called. The executor pins
// the inputs and outputs of actions in flight.
type Pinner interface {
	Pin(ds []Digest) (release func())
}

// LocalStore is implemented by stores that keep blobs as local files, which
// lets input roots hardlink them instead of copying.
type LocalStore interface {
	Store
	// BlobPath returns the path of a read-only file holding the blob. With
	// executable set, the file is a separate copy with the executable bit,
	// so no caller ever changes the mode of a shared blob.
	BlobPath(d Digest, executable bool) (string, error)
}
