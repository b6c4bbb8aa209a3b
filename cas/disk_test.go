package cas

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/actiond/actiond/internal/testutil"
)

var ctx = context.Background()

func newStore(t testing.TB, dir string, opts ...Option) *DiskStore {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	s, err := NewDiskStore(dir, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func put(t testing.TB, s Store, data []byte) Digest {
	t.Helper()
	d := DigestOf(data)
	if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatalf("Put %s: %v", d, err)
	}
	return d
}

func get(t testing.TB, s Store, d Digest, offset int64) []byte {
	t.Helper()
	r, err := s.Get(ctx, d, offset)
	if err != nil {
		t.Fatalf("Get %s at %d: %v", d, offset, err)
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func present(t testing.TB, s Store, d Digest) bool {
	t.Helper()
	m, err := s.FindMissing(ctx, []Digest{d})
	if err != nil {
		t.Fatal(err)
	}
	return len(m) == 0
}

// blob returns n deterministic bytes distinct per seed.
func blob(seed, n int) []byte { return testutil.Data(seed, n) }

func assertTmpEmpty(t testing.TB, s *DiskStore) {
	t.Helper()
	ents, err := os.ReadDir(s.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) > 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("tmp/ holds %v", names)
	}
}

// checkInvariants verifies that every indexed blob has its file or pack
// record (or both) with the right content and that the size accounting
// adds up.
func checkInvariants(t testing.TB, s *DiskStore) {
	t.Helper()
	s.mu.Lock()
	var sum int64
	type loc struct {
		d    Digest
		file bool
		pk   *pack
		off  int64
	}
	var ls []loc
	for h, e := range s.index {
		sum += e.size
		if !e.file && e.pk == nil {
			t.Errorf("indexed blob %s/%d has neither a file nor a pack record", h, e.size)
		}
		ls = append(ls, loc{Digest{h, e.size}, e.file, e.pk, e.pkOff})
	}
	if sum != s.size || s.lru.Len() != len(s.index) {
		t.Errorf("accounting: sum %d, size %d, lru %d, index %d", sum, s.size, s.lru.Len(), len(s.index))
	}
	if s.maxSize > 0 && s.size > s.maxSize {
		t.Errorf("size %d over the limit %d", s.size, s.maxSize)
	}
	var dead int64
	for _, p := range s.packs {
		dead += p.dead
	}
	if dead != s.packDead {
		t.Errorf("pack dead bytes: packs say %d, store %d", dead, s.packDead)
	}
	s.mu.Unlock()
	for _, l := range ls {
		d := l.d
		if l.pk != nil {
			data := make([]byte, d.Size)
			if _, err := l.pk.f.ReadAt(data, l.off); err != nil || DigestOf(data) != d {
				t.Errorf("pack record of %s holds %v (%v)", d, DigestOf(data), err)
			}
		}
		if !l.file {
			continue
		}
		f, err := os.Open(s.blobPath(d.Hash))
		if err != nil {
			t.Errorf("indexed blob %s has no file: %v", d, err)
			continue
		}
		got, err := DigestReader(f)
		f.Close()
		if err != nil || got != d {
			t.Errorf("blob file %s holds %v (%v)", d, got, err)
		}
	}
}

func TestDiskPutGet(t *testing.T) {
	s := newStore(t, "", WithSmallBlobPacks(false))
	data := []byte("hello, world")
	d := put(t, s, data)
	if got := get(t, s, d, 0); !bytes.Equal(got, data) {
		t.Fatalf("Get = %q", got)
	}
	if got := get(t, s, d, 7); string(got) != "world" {
		t.Fatalf("Get at 7 = %q", got)
	}
	if got := get(t, s, d, d.Size); len(got) != 0 {
		t.Fatalf("Get at end = %q", got)
	}
	for _, off := range []int64{-1, d.Size + 1} {
		if _, err := s.Get(ctx, d, off); err == nil {
			t.Errorf("Get at %d succeeded", off)
		}
	}
	// Sharded layout, read-only file.
	p := filepath.Join(s.Dir(), "sha256", d.Hash[:2], d.Hash)
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o444 || fi.Size() != d.Size {
		t.Fatalf("blob file %s: %v %v", p, fi, err)
	}
	// Storing it again is fine and changes nothing.
	put(t, s, data)
	if st := s.Stats(); st.Blobs != 1 || st.Bytes != d.Size {
		t.Fatalf("Stats = %+v", st)
	}
	// Missing blobs.
	other := DigestOf([]byte("other"))
	if _, err := s.Get(ctx, other, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get missing = %v", err)
	}
	if _, err := s.Get(ctx, Digest{d.Hash, d.Size + 1}, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get with the wrong size = %v", err)
	}
	if _, err := ReadAll(ctx, s, other); !errors.Is(err, ErrNotFound) {
		t.Fatalf("ReadAll missing = %v", err)
	}
	if b, err := ReadAll(ctx, s, d); err != nil || !bytes.Equal(b, data) {
		t.Fatalf("ReadAll = %q, %v", b, err)
	}
	assertTmpEmpty(t, s)
}

func TestDiskPutMismatchStoresNothing(t *testing.T) {
	s := newStore(t, "")
	data := []byte("the real data")
	d := DigestOf(data)
	cases := map[string][]byte{
		"different content": []byte("other data!!!"),
		"shorter":           data[:5],
		"longer":            append(append([]byte{}, data...), '!'),
		"empty":             nil,
	}
	for name, wrong := range cases {
		err := s.Put(ctx, d, bytes.NewReader(wrong))
		if !errors.Is(err, ErrDigestMismatch) {
			t.Errorf("%s: Put = %v; want ErrDigestMismatch", name, err)
		}
	}
	if present(t, s, d) {
		t.Fatal("a mismatching Put stored the blob")
	}
	if _, err := os.Stat(s.blobPath(d.Hash)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("blob file exists: %v", err)
	}
	assertTmpEmpty(t, s)
}

func TestDiskEmptyBlob(t *testing.T) {
	s := newStore(t, "")
	if !present(t, s, EmptyDigest) {
		t.Fatal("the empty blob is missing")
	}
	if got := get(t, s, EmptyDigest, 0); len(got) != 0 {
		t.Fatalf("Get(empty) = %q", got)
	}
	if b, err := ReadAll(ctx, s, EmptyDigest); err != nil || len(b) != 0 {
		t.Fatalf("ReadAll(empty) = %q, %v", b, err)
	}
	if err := s.Put(ctx, EmptyDigest, bytes.NewReader(nil)); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, EmptyDigest, strings.NewReader("x")); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Put(empty, x) = %v", err)
	}
	// Size 0 with another hash names data that cannot exist.
	bogus := Digest{Hash: helloHash, Size: 0}
	if present(t, s, bogus) {
		t.Fatal("FindMissing reports a size-0 non-empty digest present")
	}
	if _, err := ReadAll(ctx, s, bogus); !errors.Is(err, ErrNotFound) {
		t.Fatalf("ReadAll(%v) = %v", bogus, err)
	}
	if _, err := s.Get(ctx, bogus, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get(%v) = %v", bogus, err)
	}
	if err := s.Put(ctx, bogus, bytes.NewReader(nil)); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Put(%v) = %v", bogus, err)
	}
	if st := s.Stats(); st.Blobs != 0 {
		t.Fatalf("Stats = %+v", st)
	}
}

func TestDiskFindMissing(t *testing.T) { forPacks(t, testDiskFindMissing) }

func testDiskFindMissing(t *testing.T, packs Option) {
	s := newStore(t, "", packs)
	var all, want []Digest
	for i := 0; i < 20; i++ {
		data := blob(i, 100+i)
		d := DigestOf(data)
		all = append(all, d)
		if i%3 == 0 {
			want = append(want, d)
			continue
		}
		put(t, s, data)
	}
	wrongSize := Digest{all[1].Hash, all[1].Size + 1}
	all = append(all, wrongSize, EmptyDigest)
	want = append(want, wrongSize)
	got, err := s.FindMissing(ctx, all)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("FindMissing = %v\nwant %v", got, want)
	}
	if got, _ := s.FindMissing(ctx, nil); len(got) != 0 {
		t.Fatalf("FindMissing(nil) = %v", got)
	}
}

// TestDiskFindMissingLargeRequest: a request spanning many lock chunks
// answers as one, in order; a cancelled one stops with the context's error.
func TestDiskFindMissingLargeRequest(t *testing.T) {
	s := newStore(t, "")
	present := put(t, s, blob(1, 64))
	var all, want []Digest
	for i := range 3*findMissingChunk + 5 {
		if i%1000 == 7 {
			all = append(all, present)
			continue
		}
		d := Digest{Hash: fmt.Sprintf("%064x", i+1), Size: int64(i + 1)}
		all, want = append(all, d), append(want, d)
	}
	got, err := s.FindMissing(ctx, all)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) || got[0] != want[0] || got[len(got)-1] != want[len(want)-1] {
		t.Fatalf("FindMissing over %d digests: %d missing, want %d", len(all), len(got), len(want))
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.FindMissing(cancelled, all); !errors.Is(err, context.Canceled) {
		t.Fatalf("FindMissing with a cancelled context = %v, want context.Canceled", err)
	}
}

func TestDiskInvalidDigests(t *testing.T) {
	s := newStore(t, "")
	for _, d := range []Digest{{"", 1}, {"ab", 1}, {"../../etc/passwd", 1}, {helloHash, -1}, {strings.ToUpper(helloHash), 5}} {
		if err := s.Put(ctx, d, strings.NewReader("hello")); !errors.Is(err, ErrInvalidDigest) {
			t.Errorf("Put(%v) = %v", d, err)
		}
		if _, err := s.Get(ctx, d, 0); !errors.Is(err, ErrInvalidDigest) {
			t.Errorf("Get(%v) = %v", d, err)
		}
		if _, err := s.BlobPath(d, true); !errors.Is(err, ErrInvalidDigest) {
			t.Errorf("BlobPath(%v) = %v", d, err)
		}
		if _, err := s.NewWriter(d); !errors.Is(err, ErrInvalidDigest) {
			t.Errorf("NewWriter(%v) = %v", d, err)
		}
		if errs := s.PutBatch(ctx, []Blob{{d, []byte("hello")}}); !errors.Is(errs[0], ErrInvalidDigest) {
			t.Errorf("PutBatch(%v) = %v", d, errs[0])
		}
	}
}

func TestDiskWriter(t *testing.T) { forPacks(t, testDiskWriter) }

func testDiskWriter(t *testing.T, packs Option) {
	s := newStore(t, "", packs)
	data := blob(1, 10000)
	d := DigestOf(data)
	w, err := s.NewWriter(d)
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += 3000 {
		if present(t, s, d) {
			t.Fatal("blob visible before Commit")
		}
		if _, err := w.Write(data[off:min(off+3000, len(data))]); err != nil {
			t.Fatal(err)
		}
	}
	if w.Written() != d.Size {
		t.Fatalf("Written = %d", w.Written())
	}
	if _, err := w.Write([]byte{1}); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("write past the size = %v", err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	w.Abort() // harmless after Commit
	if !bytes.Equal(get(t, s, d, 0), data) {
		t.Fatal("content differs")
	}
	if err := w.Commit(); err == nil {
		t.Fatal("second Commit succeeded")
	}

	// Aborted and short uploads leave nothing behind.
	d2 := DigestOf(blob(2, 100))
	w, _ = s.NewWriter(d2)
	w.Write(blob(2, 50))
	w.Abort()
	w, _ = s.NewWriter(d2)
	w.Write(blob(2, 50))
	if err := w.Commit(); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("short Commit = %v", err)
	}
	if present(t, s, d2) {
		t.Fatal("short upload stored")
	}
	assertTmpEmpty(t, s)
}

// TestDiskWriterLarge covers the pipelined path of large uploads: odd
// chunk sizes, content, abort mid-way, mismatch detected at Commit.
func TestDiskWriterLarge(t *testing.T) {
	for _, fsync := range []bool{true, false} {
		s := newStore(t, "", WithFsync(fsync))
		data := blob(7, 9<<20+13)
		d := DigestOf(data)
		w, err := s.NewWriter(d)
		if err != nil {
			t.Fatal(err)
		}
		for off, step := 0, 1; off < len(data); step = step*3 + 1 {
			n := min(step%(3<<20)+1, len(data)-off)
			if _, err := w.Write(data[off : off+n]); err != nil {
				t.Fatal(err)
			}
			off += n
		}
		if err := w.Commit(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(get(t, s, d, 0), data) || !bytes.Equal(get(t, s, d, 5<<20), data[5<<20:]) {
			t.Fatal("content differs")
		}
		// Abort half way.
		other := blob(8, 6<<20)
		w, _ = s.NewWriter(DigestOf(other))
		w.Write(other[:3<<20+5])
		w.Abort()
		w.Abort()
		// Wrong data, found at Commit.
		wrong := append([]byte{}, other...)
		wrong[4<<20] ^= 1
		w, _ = s.NewWriter(DigestOf(other))
		w.Write(wrong)
		if err := w.Commit(); !errors.Is(err, ErrDigestMismatch) {
			t.Fatalf("Commit of wrong data = %v", err)
		}
		if present(t, s, DigestOf(other)) {
			t.Fatal("stored")
		}
		assertTmpEmpty(t, s)
	}
}

func TestDiskLRUEviction(t *testing.T) { forPacks(t, testDiskLRUEviction) }

func testDiskLRUEviction(t *testing.T, packs Option) {
	s := newStore(t, "", WithMaxSize(300), packs)
	a := put(t, s, blob(1, 100))
	b := put(t, s, blob(2, 100))
	c := put(t, s, blob(3, 100))
	get(t, s, a, 0) // a is now more recent than b and c
	present(t, s, b)
	d := put(t, s, blob(4, 100)) // evicts c, the least recently used
	for _, x := range []Digest{a, b, d} {
		if !present(t, s, x) {
			t.Errorf("%v was evicted", x)
		}
	}
	if present(t, s, c) {
		t.Fatal("c was not evicted")
	}
	if _, err := os.Stat(s.blobPath(c.Hash)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("c's file is still there")
	}
	if st := s.Stats(); st.Blobs != 3 || st.Bytes != 300 || st.Evictions != 1 {
		t.Fatalf("Stats = %+v", st)
	}
	// A blob over the whole limit is refused up front.
	big := blob(5, 301)
	if err := s.Put(ctx, DigestOf(big), bytes.NewReader(big)); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Put over the limit = %v", err)
	}
	// Evict shrinks on demand, oldest first.
	if n := s.Evict(100); n != 2 {
		t.Fatalf("Evict(100) removed %d", n)
	}
	if !present(t, s, d) || present(t, s, b) {
		t.Fatal("Evict did not keep the most recent blob")
	}
	checkInvariants(t, s)
	assertTmpEmpty(t, s)
}

func TestDiskLRUAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	s := newStore(t, dir, WithSmallBlobPacks(false))
	a := put(t, s, blob(1, 100))
	b := put(t, s, blob(2, 100))
	c := put(t, s, blob(3, 100))
	// Pretend they were written long ago, a first.
	now := time.Now()
	for i, d := range []Digest{a, b, c} {
		ago := now.Add(-time.Duration(3-i) * 2 * time.Hour)
		if err := os.Chtimes(s.blobPath(d.Hash), ago, ago); err != nil {
			t.Fatal(err)
		}
	}
	// A restart orders by mtime: a is the oldest.
	s = newStore(t, dir, WithSmallBlobPacks(false))
	present(t, s, a) // a is used: its stale mtime is refreshed
	// Restart with room for two: b (now the oldest on disk) goes.
	s = newStore(t, dir, WithMaxSize(200), WithSmallBlobPacks(false))
	if !present(t, s, a) || present(t, s, b) || !present(t, s, c) {
		t.Fatalf("after restart: a %v b %v c %v; want a and c kept", present(t, s, a), present(t, s, b), present(t, s, c))
	}
	if _, err := os.Stat(s.blobPath(b.Hash)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("b's file is still there")
	}
	checkInvariants(t, s)
}

func TestDiskPin(t *testing.T) { forPacks(t, testDiskPin) }

func testDiskPin(t *testing.T, packs Option) {
	s := newStore(t, "", WithMaxSize(200), packs)
	a := put(t, s, blob(1, 100))
	b := put(t, s, blob(2, 100))
	release := s.Pin([]Digest{a, b})
	c := blob(3, 100)
	cd := DigestOf(c)
	err := s.Put(ctx, cd, bytes.NewReader(c))
	if !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Put with everything pinned = %v; want ErrNoSpace", err)
	}
	if !present(t, s, a) || !present(t, s, b) || present(t, s, cd) {
		t.Fatal("a pinned blob was evicted, or c was stored")
	}
	if _, err := os.Stat(s.blobPath(cd.Hash)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("c's file is in place although it was refused")
	}
	if errs := s.PutBatch(ctx, []Blob{{cd, c}}); !errors.Is(errs[0], ErrNoSpace) {
		t.Fatalf("PutBatch with everything pinned = %v", errs[0])
	}
	assertTmpEmpty(t, s)
	release()
	release() // idempotent
	put(t, s, c)
	if !present(t, s, cd) || present(t, s, a) || !present(t, s, b) {
		t.Fatal("after release, c should replace a (the least recently used)")
	}

	// Pins nest, and a pin taken before a blob exists protects it once it does.
	e := blob(5, 100)
	ed := DigestOf(e)
	r1 := s.Pin([]Digest{ed})
	r2 := s.Pin([]Digest{ed})
	put(t, s, e)
	r1()
	put(t, s, blob(6, 100))
	put(t, s, blob(7, 100))
	if !present(t, s, ed) {
		t.Fatal("a blob pinned twice and released once was evicted")
	}
	r2()
	put(t, s, blob(8, 100))
	put(t, s, blob(9, 100))
	if present(t, s, ed) {
		t.Fatal("a released blob was never evicted")
	}
	checkInvariants(t, s)
}

func TestDiskPutFile(t *testing.T) {
	s := newStore(t, "")
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	root := os.Geteuid() == 0
	data := blob(1, 5000)
	p := write("out", data)
	if root {
		if err := os.Chown(p, 65534, 65534); err != nil {
			t.Fatal(err)
		}
	}
	d, err := s.PutFile(ctx, p)
	if err != nil || d != DigestOf(data) {
		t.Fatalf("PutFile = %v, %v", d, err)
	}
	if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("PutFile left the file in place")
	}
	fi, err := os.Stat(s.blobPath(d.Hash))
	if err != nil || fi.Mode().Perm() != 0o444 {
		t.Fatalf("blob: %v %v", fi, err)
	}
	if root {
		if uid := fileUID(fi); uid != 0 {
			t.Fatalf("blob owned by uid %d; want 0", uid)
		}
	}
	if !bytes.Equal(get(t, s, d, 0), data) {
		t.Fatal("content differs")
	}

	// Dedup: the same content again is just removed; the blob is unchanged.
	before, _ := os.Stat(s.blobPath(d.Hash))
	p2 := write("again", data)
	if d2, err := s.PutFile(ctx, p2); err != nil || d2 != d {
		t.Fatalf("PutFile again = %v, %v", d2, err)
	}
	after, _ := os.Stat(s.blobPath(d.Hash))
	if _, err := os.Lstat(p2); !errors.Is(err, os.ErrNotExist) || !os.SameFile(before, after) {
		t.Fatal("dedup replaced the blob or left the file")
	}

	// The empty file.
	if d, err := s.PutFile(ctx, write("empty", nil)); err != nil || d != EmptyDigest {
		t.Fatalf("PutFile(empty) = %v, %v", d, err)
	}

	// Symbolic links are refused and their targets untouched.
	target := write("target", []byte("secret"))
	link := filepath.Join(dir, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutFile(ctx, link); err == nil {
		t.Fatal("PutFile followed a symlink")
	}
	if fi, err := os.Stat(target); err != nil || fi.Mode().Perm() != 0o644 {
		t.Fatalf("symlink target changed: %v %v", fi, err)
	}
	if present(t, s, DigestOf([]byte("secret"))) {
		t.Fatal("symlink target stored")
	}
	// Directories are refused.
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutFile(ctx, filepath.Join(dir, "sub")); err == nil {
		t.Fatal("PutFile took a directory")
	}
	// A file with another hard link is copied: the other name keeps its
	// own inode and mode, and the blob is a separate file.
	hl := write("hardlinked", blob(2, 3000))
	other := filepath.Join(dir, "other-name")
	if err := os.Link(hl, other); err != nil {
		t.Fatal(err)
	}
	d3, err := s.PutFile(ctx, hl)
	if err != nil {
		t.Fatal(err)
	}
	ofi, err := os.Stat(other)
	bfi, _ := os.Stat(s.blobPath(d3.Hash))
	if err != nil || ofi.Mode().Perm() != 0o644 || os.SameFile(ofi, bfi) {
		t.Fatalf("hard-linked file: other name %v (%v), same inode as blob %v", ofi, err, os.SameFile(ofi, bfi))
	}
	if _, err := os.Lstat(hl); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("hard-linked name left in place")
	}
	if _, err := s.PutFile(ctx, filepath.Join(dir, "nonexistent")); err == nil {
		t.Fatal("PutFile of a missing file succeeded")
	}
	checkInvariants(t, s)
}

// TestDiskPutFileCrossDevice moves a file from another file system, which
// cannot be renamed and must be copied.
func TestDiskPutFileCrossDevice(t *testing.T) {
	s := newStore(t, "")
	shm, err := os.MkdirTemp("/dev/shm", "actiond-test-")
	testutil.Require(t, err == nil, fmt.Sprintf("needs /dev/shm as a second file system: %v", err))
	defer os.RemoveAll(shm)
	var a, b syscall.Statfs_t
	testutil.Require(t, syscall.Statfs(shm, &a) == nil && syscall.Statfs(s.Dir(), &b) == nil && a.Fsid != b.Fsid,
		"needs /dev/shm on another file system than the test's temp dir")
	data := blob(7, 7000)
	p := filepath.Join(shm, "f")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := s.PutFile(ctx, p)
	if err != nil || d != DigestOf(data) || !bytes.Equal(get(t, s, d, 0), data) {
		t.Fatalf("PutFile across devices = %v, %v", d, err)
	}
	if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("source left in place")
	}
	assertTmpEmpty(t, s)
}

func TestDiskBlobPath(t *testing.T) { forPacks(t, testDiskBlobPath) }

func testDiskBlobPath(t *testing.T, packs Option) {
	s := newStore(t, "", WithMaxSize(1000), packs)
	data := blob(1, 500)
	d := put(t, s, data)
	p, err := s.BlobPath(d, false)
	if err != nil || p != s.blobPath(d.Hash) {
		t.Fatalf("BlobPath = %q, %v", p, err)
	}
	ep, err := s.BlobPath(d, true)
	if err != nil || ep == p {
		t.Fatalf("BlobPath(exec) = %q, %v", ep, err)
	}
	fi, _ := os.Stat(p)
	efi, err := os.Stat(ep)
	if err != nil || efi.Mode().Perm() != 0o555 || fi.Mode().Perm() != 0o444 || os.SameFile(fi, efi) {
		t.Fatalf("exec copy %v, shared blob %v, same file %v", efi, fi, os.SameFile(fi, efi))
	}
	if b, _ := os.ReadFile(ep); !bytes.Equal(b, data) {
		t.Fatal("exec copy content differs")
	}
	if ep2, err := s.BlobPath(d, true); err != nil || ep2 != ep {
		t.Fatalf("second BlobPath(exec) = %q, %v", ep2, err)
	}
	for _, exec := range []bool{false, true} {
		ep, err := s.BlobPath(EmptyDigest, exec)
		fi, serr := os.Stat(ep)
		want := os.FileMode(0o444)
		if exec {
			want = 0o555
		}
		if err != nil || serr != nil || fi.Size() != 0 || fi.Mode().Perm() != want {
			t.Fatalf("BlobPath(empty, %v) = %q %v %v", exec, ep, fi, err)
		}
	}
	if _, err := s.BlobPath(DigestOf([]byte("nope")), true); !errors.Is(err, ErrNotFound) {
		t.Fatalf("BlobPath(missing) = %v", err)
	}
	// Eviction removes the executable copy too.
	put(t, s, blob(2, 500))
	put(t, s, blob(3, 500))
	if present(t, s, d) {
		t.Fatal("not evicted")
	}
	if _, err := os.Stat(ep); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("exec copy outlived its blob")
	}
	assertTmpEmpty(t, s)
}

func TestDiskRestartCleansUp(t *testing.T) { forPacks(t, testDiskRestartCleansUp) }

func testDiskRestartCleansUp(t *testing.T, packs Option) {
	dir := t.TempDir()
	s := newStore(t, dir, packs)
	a := put(t, s, blob(1, 100))
	if _, err := s.BlobPath(a, true); err != nil {
		t.Fatal(err)
	}
	// Debris of a crash: half-written uploads, files that are not blobs,
	// a blob in the wrong shard.
	w, _ := s.NewWriter(DigestOf(blob(2, 1000)))
	w.Write(blob(2, 500)) // never committed
	os.WriteFile(filepath.Join(s.TempDir(), "partial"), []byte("xx"), 0o644)
	os.MkdirAll(filepath.Join(s.TempDir(), "sub", "dir"), 0o755)
	os.WriteFile(filepath.Join(dir, "sha256", a.Hash[:2], "junk"), []byte("junk"), 0o644)
	wrong := DigestOf([]byte("misplaced"))
	shard := "00"
	if wrong.Hash[:2] == shard {
		shard = "01"
	}
	os.WriteFile(filepath.Join(dir, "sha256", shard, wrong.Hash), []byte("misplaced"), 0o444)

	s = newStore(t, dir, packs)
	assertTmpEmpty(t, s)
	if !present(t, s, a) || present(t, s, wrong) {
		t.Fatal("index after restart is wrong")
	}
	if st := s.Stats(); st.Blobs != 1 {
		t.Fatalf("Stats = %+v", st)
	}
	for _, p := range []string{filepath.Join(dir, "sha256", a.Hash[:2], "junk"), filepath.Join(dir, "sha256", shard, wrong.Hash), filepath.Join(dir, "sha256-exec", a.Hash)} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s survived the restart", p)
		}
	}
	checkInvariants(t, s)
}

func TestDiskPutBatch(t *testing.T) { forPacks(t, testDiskPutBatch) }

func testDiskPutBatch(t *testing.T, packs Option) {
	for _, fsync := range []bool{true, false} {
		t.Run(fmt.Sprintf("fsync=%v", fsync), func(t *testing.T) {
			s := newStore(t, "", WithFsync(fsync), packs)
			old := put(t, s, blob(0, 10))
			var blobs []Blob
			// A digest sent twice, first with the wrong data.
			dupData := blob(99, 99)
			blobs = append(blobs, Blob{DigestOf(dupData), blob(98, 99)}, Blob{DigestOf(dupData), dupData})
			for i := 1; i <= 50; i++ {
				data := blob(i, i*10)
				blobs = append(blobs, Blob{DigestOf(data), data})
			}
			blobs = append(blobs,
				Blob{blobs[3].Digest, blobs[3].Data}, // duplicate
				Blob{old, blob(0, 10)},               // already stored
				Blob{EmptyDigest, nil},
				Blob{blobs[5].Digest, blobs[6].Data}, // mismatch (same size)
				Blob{Digest{"xyz", 3}, []byte("xyz")},
			)
			errs := s.PutBatch(ctx, blobs)
			for i, err := range errs {
				switch i {
				case 0, len(blobs) - 2:
					if !errors.Is(err, ErrDigestMismatch) {
						t.Errorf("mismatch: %v", err)
					}
				case len(blobs) - 1:
					if !errors.Is(err, ErrInvalidDigest) {
						t.Errorf("invalid: %v", err)
					}
				default:
					if err != nil {
						t.Errorf("blob %d: %v", i, err)
					}
				}
			}
			for _, b := range blobs[1:52] {
				if !bytes.Equal(get(t, s, b.Digest, 0), b.Data) {
					t.Fatalf("blob %v differs", b.Digest)
				}
			}
			if st := s.Stats(); st.Blobs != 52 {
				t.Fatalf("Stats = %+v", st)
			}
			assertTmpEmpty(t, s)
			checkInvariants(t, s)
		})
	}
}

// TestDiskConcurrency hammers one store with uploads of the same and of
// different blobs, reads and lookups under a size limit; run with -race.
func TestDiskConcurrency(t *testing.T) { forPacks(t, testDiskConcurrency) }

func testDiskConcurrency(t *testing.T, packs Option) {
	s := newStore(t, "", WithMaxSize(20*1000), WithFsync(false), packs)
	var wg sync.WaitGroup
	errc := make(chan error, 100)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 60; i++ {
				seed := i % 30 // every goroutine writes the same 30 blobs
				if g%2 == 1 {
					seed = 1000 + g*100 + i // and half also their own
				}
				data := blob(seed, 1000)
				d := DigestOf(data)
				var err error
				switch i % 3 {
				case 0:
					err = s.Put(ctx, d, bytes.NewReader(data))
				case 1:
					err = s.PutBatch(ctx, []Blob{{d, data}, {DigestOf(blob(seed+7, 500)), blob(seed+7, 500)}})[0]
				case 2:
					p := filepath.Join(s.TempDir(), fmt.Sprintf("out-%d-%d", g, i))
					if err = os.WriteFile(p, data, 0o644); err == nil {
						_, err = s.PutFile(ctx, p)
					}
				}
				if err != nil {
					errc <- err
					return
				}
				release := s.Pin([]Digest{d})
				if r, err := s.Get(ctx, d, 0); err == nil {
					got, rerr := DigestReader(r)
					r.Close()
					if rerr != nil || got != d {
						errc <- fmt.Errorf("read %v back as %v (%v)", d, got, rerr)
					}
				} else if !errors.Is(err, ErrNotFound) {
					errc <- err
				}
				release()
				s.FindMissing(ctx, []Digest{d, DigestOf(blob(seed+1, 1000))})
			}
		}(g)
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	checkInvariants(t, s)
	assertTmpEmpty(t, s)
}
