// Package castest is a conformance suite for cas.Store implementations:
// every store (the disk store, the remote store over a farm's CAS) must
// pass the same behaviour tests.
package castest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/actiond/actiond/cas"
)

// Blob returns n pseudo-random bytes determined by seed.
func Blob(seed, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(int64(seed))).Read(b)
	return b
}

// TestStore runs the suite; newStore returns an empty store. PutFile test
// files are created in the store's TempDir() when it has one (same file
// system, so they move by rename), else in t.TempDir().
func TestStore(t *testing.T, newStore func(t *testing.T) cas.Store) {
	ctx := context.Background()
	put := func(t *testing.T, s cas.Store, data []byte) cas.Digest {
		t.Helper()
		d := cas.DigestOf(data)
		if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatalf("Put %s: %v", d, err)
		}
		return d
	}
	get := func(t *testing.T, s cas.Store, d cas.Digest, off int64) []byte {
		t.Helper()
		r, err := s.Get(ctx, d, off)
		if err != nil {
			t.Fatalf("Get %s at %d: %v", d, off, err)
		}
		defer r.Close()
		b, err := io.ReadAll(r)
		if err != nil {
			t.Fatalf("read %s: %v", d, err)
		}
		return b
	}

	t.Run("PutGet", func(t *testing.T) {
		s := newStore(t)
		for i, n := range []int{1, 100, 64 << 10, 1 << 20} {
			data := Blob(i, n)
			d := put(t, s, data)
			if got := get(t, s, d, 0); !bytes.Equal(got, data) {
				t.Fatalf("blob of %d bytes: read back %d different bytes", n, len(got))
			}
			if got := get(t, s, d, int64(n/2)); !bytes.Equal(got, data[n/2:]) {
				t.Fatalf("blob of %d bytes at offset %d: wrong data", n, n/2)
			}
			// Storing again is fine.
			put(t, s, data)
		}
	})

	t.Run("LargeBlob", func(t *testing.T) {
		s := newStore(t)
		data := Blob(7, 9<<20+3)
		d := put(t, s, data)
		if got := get(t, s, d, 0); !bytes.Equal(got, data) {
			t.Fatalf("large blob read back wrong (%d bytes)", len(got))
		}
	})

	t.Run("Mismatch", func(t *testing.T) {
		s := newStore(t)
		data := Blob(1, 1000)
		d := cas.DigestOf(data)
		err := s.Put(ctx, d, bytes.NewReader(Blob(2, 1000)))
		if !errors.Is(err, cas.ErrDigestMismatch) {
			t.Fatalf("Put of wrong data: err %v, want ErrDigestMismatch", err)
		}
		if missing, err := s.FindMissing(ctx, []cas.Digest{d}); err != nil || len(missing) != 1 {
			t.Fatalf("after a mismatch FindMissing = %v, %v; want the digest missing", missing, err)
		}
	})

	t.Run("NotFound", func(t *testing.T) {
		s := newStore(t)
		d := cas.DigestOf([]byte("never stored"))
		if _, err := s.Get(ctx, d, 0); !errors.Is(err, cas.ErrNotFound) {
			t.Fatalf("Get of a missing blob: err %v, want ErrNotFound", err)
		}
	})

	t.Run("EmptyBlob", func(t *testing.T) {
		s := newStore(t)
		if got := get(t, s, cas.EmptyDigest, 0); len(got) != 0 {
			t.Fatalf("empty blob read %d bytes", len(got))
		}
		if missing, err := s.FindMissing(ctx, []cas.Digest{cas.EmptyDigest}); err != nil || len(missing) != 0 {
			t.Fatalf("FindMissing(empty) = %v, %v; want none missing", missing, err)
		}
		put(t, s, nil)
	})

	t.Run("FindMissing", func(t *testing.T) {
		s := newStore(t)
		a := put(t, s, Blob(1, 10))
		b := cas.DigestOf(Blob(2, 10))
		c := put(t, s, Blob(3, 10))
		e := cas.DigestOf(Blob(4, 10))
		missing, err := s.FindMissing(ctx, []cas.Digest{b, a, e, c})
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(missing) != fmt.Sprint([]cas.Digest{b, e}) {
			t.Fatalf("FindMissing = %v, want [%v %v] in order", missing, b, e)
		}
	})

	t.Run("PutFile", func(t *testing.T) {
		s := newStore(t)
		dir := t.TempDir()
		if ts, ok := s.(interface{ TempDir() string }); ok {
			dir = ts.TempDir()
		}
		for i, n := range []int{0, 10, 3 << 20} {
			data := Blob(10+i, n)
			path := filepath.Join(dir, fmt.Sprintf("out-%d", i))
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
			d, err := s.PutFile(ctx, path)
			if err != nil {
				t.Fatalf("PutFile: %v", err)
			}
			if d != cas.DigestOf(data) {
				t.Fatalf("PutFile digest %v, want %v", d, cas.DigestOf(data))
			}
			if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("PutFile left %s behind (%v)", path, err)
			}
			if got := get(t, s, d, 0); !bytes.Equal(got, data) {
				t.Fatalf("PutFile blob read back wrong")
			}
			if missing, err := s.FindMissing(ctx, []cas.Digest{d}); err != nil || len(missing) != 0 {
				t.Fatalf("after PutFile FindMissing = %v, %v", missing, err)
			}
		}
	})

	t.Run("Concurrent", func(t *testing.T) {
		s := newStore(t)
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 8 {
					data := Blob(i, 1000+i) // same blobs from every goroutine
					d := cas.DigestOf(data)
					if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
						errs <- fmt.Errorf("goroutine %d: %w", g, err)
						return
					}
					b, err := cas.ReadAll(ctx, s, d)
					if err != nil || !bytes.Equal(b, data) {
						errs <- fmt.Errorf("goroutine %d: read back %v", g, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
}
