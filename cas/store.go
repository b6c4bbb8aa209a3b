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

	// The methods below are capabilities some stores lack. They are part
	// of the interface, not found by type assertion, so that a decorator
	// embedding a Store keeps them: one that dropped Pin would let inputs
	// be evicted in the middle of an action, one that dropped LocalPath
	// would turn hardlinked input roots into copies. Stores without them
	// embed Base.

	// Pin protects ds from eviction until release is called; pinning a
	// digest that is not stored yet protects it from the moment it is. The
	// executor pins the inputs and outputs of actions in flight. Stores
	// that never evict return a release that does nothing.
	Pin(ds []Digest) (release func())
	// LocalPath returns the path of a read-only local file holding the
	// blob, fetching it first when the store reads through to another.
	// With executable set, the file is a separate copy with the executable
	// bit, so no caller ever changes the mode of a shared blob. The file
	// may be evicted unless d is pinned. A store that does not keep blobs
	// as local files fails with an error wrapping ErrNotLocal, for every
	// digest (see IsLocal).
	LocalPath(ctx context.Context, d Digest, executable bool) (string, error)
	// VerifyBlobs makes sure every blob of ds that is stored has been
	// hashed since the store was opened or since it was written, hashing
	// those that have not (once: the result is remembered). It returns the
	// blobs found corrupt, which are quarantined (missing) when it returns.
	// Stores whose blobs cannot go bad unnoticed return nothing.
	VerifyBlobs(ctx context.Context, ds []Digest) (corrupt []Digest, err error)
}

// Base gives a Store the capabilities of one that keeps no local files and
// never evicts or quarantines: Pin does nothing, LocalPath fails with
// ErrNotLocal and VerifyBlobs finds nothing. Embed it in such a store; a
// decorator embeds the Store it wraps instead, and so keeps its capabilities.
type Base struct{}

// Pin implements Store: nothing is ever evicted.
func (Base) Pin([]Digest) func() { return func() {} }

// LocalPath implements Store: there are no local files.
func (Base) LocalPath(context.Context, Digest, bool) (string, error) {
	return "", ErrNotLocal
}

// VerifyBlobs implements Store: nothing is found corrupt.
func (Base) VerifyBlobs(context.Context, []Digest) ([]Digest, error) { return nil, nil }

var (
	// ErrNotFound is wrapped when a blob is not in the store.
	ErrNotFound = errors.New("blob not found")
	// ErrDigestMismatch is wrapped when data does not hash to its declared digest.
	ErrDigestMismatch = errors.New("data does not match digest")
	// ErrNoSpace is wrapped when the store cannot take a blob: disk full, or
	// the size limit cannot be met without evicting blobs in use.
	ErrNoSpace = errors.New("no space for blob")
	// ErrNotLocal is wrapped by LocalPath of stores that keep no local files.
	ErrNotLocal = errors.New("store keeps no local files")
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

// Pinner is the pinning part of Store, for callers that need no more.
type Pinner interface {
	Pin(ds []Digest) (release func())
}

// LocalStore is a Store of local files seen through the path lookup input
// roots use (executor.LinkInputRoot, actiondfs). Get one from any Store
// with LocalFiles.
type LocalStore interface {
	Store
	// BlobPath is LocalPath without a context.
	BlobPath(d Digest, executable bool) (string, error)
}

// IsLocal reports whether s keeps blobs as local files, that is whether
// its LocalPath works. It asks for the empty blob, which every local store
// has without fetching anything.
func IsLocal(s Store) bool {
	_, err := s.LocalPath(context.Background(), EmptyDigest, false)
	return !errors.Is(err, ErrNotLocal)
}

// LocalFiles returns s as a LocalStore, or false when s keeps no local
// files. A store that is a LocalStore already is returned as it is, so
// what else it implements (such as DiskStore.OnQuarantine) stays visible.
func LocalFiles(s Store) (LocalStore, bool) {
	if !IsLocal(s) {
		return nil, false
	}
	if ls, ok := s.(LocalStore); ok {
		return ls, true
	}
	return localFiles{s}, true
}

// localFiles adds BlobPath to a Store whose LocalPath works.
type localFiles struct{ Store }

func (l localFiles) BlobPath(d Digest, executable bool) (string, error) {
	return l.LocalPath(context.Background(), d, executable)
}
