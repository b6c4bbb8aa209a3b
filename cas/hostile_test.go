package cas

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// sparseFile makes a file of size bytes that holds no data blocks.
func sparseFile(t *testing.T, dir string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, "sparse")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPutFileChecksSizeBeforeHashing: a sparse output larger than the
// store's limit is refused by its size, before any byte is hashed (a
// cancelled context proves nothing was read: hashing would fail with it),
// with an error naming the limit, and nothing stored is evicted.
func TestPutFileChecksSizeBeforeHashing(t *testing.T) {
	s := newStore(t, "", WithFsync(false), WithMaxSize(8<<20))
	kept := put(t, s, blob(1, 4<<20))
	p := sparseFile(t, s.TempDir(), 1<<30)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err := s.PutFile(cctx, p)
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "--max-size") || errors.Is(err, context.Canceled) {
		t.Fatalf("PutFile of a 1 GiB sparse file into an 8 MiB store: %v; want ErrNoSpace naming --max-size, decided before hashing", err)
	}
	if !present(t, s, kept) {
		t.Fatal("a stored blob was evicted for a file that was refused")
	}
	checkInvariants(t, s)
}

// TestPutFileHashingHonoursContext: hashing a large file stops when the
// caller's context ends; nothing is stored.
func TestPutFileHashingHonoursContext(t *testing.T) {
	s := newStore(t, "", WithFsync(false))
	p := sparseFile(t, s.TempDir(), 1<<30)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err := s.PutFile(cctx, p)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("PutFile with a cancelled context: %v, want context.Canceled", err)
	}
	if st := s.Stats(); st.Blobs != 0 {
		t.Fatalf("%d blobs stored after a cancelled PutFile", st.Blobs)
	}
}
