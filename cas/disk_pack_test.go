package cas

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// smallPacks makes packs roll over at n bytes for the test.
func smallPacks(t *testing.T, n int64) {
	old := packTarget
	packTarget = n
	t.Cleanup(func() { packTarget = old })
}

func packFiles(t *testing.T, s *DiskStore) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(s.Dir(), "packs", "*.pack"))
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// Small blobs go to packs, not files: every way in (Put, a streamed
// upload, a batch) appends records, a batch in one pack, and they read
// back, also after a restart; a large blob still gets a file.
func TestPackSmallBlobs(t *testing.T) {
	dir := t.TempDir()
	s := newStore(t, dir)
	a := put(t, s, blob(1, 300))
	w, err := s.NewWriter(DigestOf(blob(2, PackMaxBlob)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(blob(2, PackMaxBlob)); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	b := DigestOf(blob(2, PackMaxBlob))
	var batch []Blob
	for i := range 50 {
		data := blob(100+i, 10+i)
		batch = append(batch, Blob{DigestOf(data), data})
	}
	for i, err := range s.PutBatch(ctx, batch) {
		if err != nil {
			t.Fatalf("batch blob %d: %v", i, err)
		}
	}
	large := put(t, s, blob(3, PackMaxBlob+1))
	for _, d := range []Digest{a, b, batch[0].Digest, batch[49].Digest} {
		if _, err := os.Stat(s.blobPath(d.Hash)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("small blob %s has a file (%v)", d, err)
		}
		if _, _, packed := s.packedLoc(d); !packed {
			t.Errorf("small blob %s is not in a pack", d)
		}
	}
	if _, err := os.Stat(s.blobPath(large.Hash)); err != nil {
		t.Errorf("large blob has no file: %v", err)
	}
	p0, off0, _ := s.packedLoc(batch[0].Digest)
	for i, b := range batch {
		p, off, _ := s.packedLoc(b.Digest)
		if p != p0 || off != off0 {
			t.Fatalf("batch blob %d at %d in pack %d, want %d in %d: one append per batch", i, off, p.id, off0, p0.id)
		}
		off0 += b.Digest.Size + int64(packHeader)
	}
	if n := len(packFiles(t, s)); n != 1 {
		t.Errorf("%d packs, want 1", n)
	}
	checkInvariants(t, s)
	want := map[Digest][]byte{a: blob(1, 300), b: blob(2, PackMaxBlob), large: blob(3, PackMaxBlob+1)}
	for _, x := range batch {
		want[x.Digest] = x.Data
	}
	first := packFiles(t, s)[0]
	s2 := newStore(t, dir) // not closed: a kill -9 loses nothing
	s2.WaitCompactions()
	for d, data := range want {
		if got := get(t, s2, d, 0); !bytes.Equal(got, data) {
			t.Fatalf("%s reads back %d bytes, want its %d", d, len(got), len(data))
		}
	}
	if got := get(t, s2, a, 100); !bytes.Equal(got, blob(1, 300)[100:]) {
		t.Error("read at an offset differs")
	}
	if st := s2.Stats(); st.Blobs != len(want) || st.Packs != 1 || st.PackDeadBytes != 0 {
		t.Errorf("stats after a restart %+v", st)
	}
	checkInvariants(t, s2)
	// Appends after a restart go to a new pack: old ones are never
	// appended to. A small old pack is merged into the new one.
	if _, err := os.Stat(first); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the first run's small pack was not merged into the second's: %v", err)
	}
	put(t, s2, blob(4, 300))
	if names := packFiles(t, s2); len(names) != 1 || names[0] == first {
		t.Errorf("packs after a write in a new run: %v", names)
	}
}

// Evicted records are dead bytes; a sealed pack more than half dead is
// compacted: its live records move to the current pack, the old pack goes,
// and nothing live is lost, even for a reader holding the old pack open.
func TestPackCompaction(t *testing.T) {
	smallPacks(t, 8<<10)
	s := newStore(t, "", WithMaxSize(40<<10))
	var ds []Digest
	data := map[Digest][]byte{}
	for i := range 40 {
		b := blob(i, 1000)
		d := put(t, s, b)
		ds = append(ds, d)
		data[d] = b
	}
	// Hold the oldest surviving blob open the way actiondfs does.
	var held Digest
	for _, d := range ds {
		if present(t, s, d) {
			held = d
			break
		}
	}
	fd, off, err := s.OpenSpan(held)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	first, _, _ := s.packedLoc(held)
	// Keep the held one, let the rest of its pack be evicted.
	release := s.Pin([]Digest{held})
	defer release()
	for i := range 40 {
		put(t, s, blob(1000+i, 1000))
	}
	s.WaitCompactions()
	st := s.Stats()
	if st.Evictions == 0 {
		t.Fatal("nothing evicted")
	}
	s.mu.Lock()
	for _, p := range s.packs {
		if p.sealed && p.dead*2 >= p.end {
			t.Errorf("pack %d is %d of %d bytes dead after compaction", p.id, p.dead, p.end)
		}
	}
	s.mu.Unlock()
	if now, _, _ := s.packedLoc(held); now == first {
		t.Error("the held blob's pack was not compacted")
	}
	if _, err := os.Stat(first.path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("compacted pack still there: %v", err)
	}
	if n := len(packFiles(t, s)); n != st.Packs {
		t.Errorf("%d pack files, %d packs indexed: compacted packs were not removed", n, st.Packs)
	}
	if !present(t, s, held) || !bytes.Equal(get(t, s, held, 0), data[held]) {
		t.Fatal("a pinned blob was lost by compaction")
	}
	got := make([]byte, held.Size)
	if _, err := unix.Pread(fd, got, off); err != nil || !bytes.Equal(got, data[held]) {
		t.Fatalf("a descriptor opened before compaction reads %v, %v", got[:8], err)
	}
	checkInvariants(t, s)
}

// A packed blob gets a read-only file of its own when a caller needs a
// path, and an executable copy; OpenSpan serves it from its pack, at its
// offset; a restart keeps the record only (the file was a copy, and a
// second copy would need verifying too); eviction removes every copy.
func TestPackLocalPathAndOpenSpan(t *testing.T) {
	dir := t.TempDir()
	s := newStore(t, dir, WithMaxSize(1<<20))
	data := blob(7, 5000)
	d := put(t, s, data)
	other := put(t, s, blob(8, 300))

	fd, off, err := s.OpenSpan(d)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, d.Size)
	_, rerr := unix.Pread(fd, got, off)
	var st unix.Stat_t
	ferr := unix.Fstat(fd, &st)
	flags, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	unix.Close(fd)
	if rerr != nil || ferr != nil || !bytes.Equal(got, data) {
		t.Fatalf("OpenSpan: read %v %v", rerr, ferr)
	}
	if off == 0 || st.Size < off+d.Size || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("OpenSpan of a packed blob: offset %d in a file of %d bytes, close-on-exec %v", off, st.Size, flags&unix.FD_CLOEXEC != 0)
	}

	p, err := s.LocalPath(ctx, d, false)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(p); err != nil || !bytes.Equal(b, data) {
		t.Fatalf("LocalPath file: %v", err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o444 {
		t.Errorf("LocalPath file mode %v, want read-only", fi.Mode())
	}
	ep, err := s.LocalPath(ctx, other, true)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(ep); err != nil || fi.Mode().Perm() != 0o555 {
		t.Fatalf("executable copy: %v %v", fi, err)
	}
	checkInvariants(t, s)

	s2 := newStore(t, dir, WithMaxSize(1<<20))
	s2.mu.Lock()
	e := s2.index[d.Hash]
	recordOnly := e != nil && !e.file && e.pk != nil
	s2.mu.Unlock()
	if _, err := os.Stat(p); !recordOnly || !errors.Is(err, os.ErrNotExist) || s2.Stats().Blobs != 2 {
		t.Fatalf("after a restart the blob is not indexed once by its record, without its file (%v; stats %+v)", err, s2.Stats())
	}
	if p2, err := s2.LocalPath(ctx, d, false); err != nil || p2 != p {
		t.Fatalf("LocalPath after a restart: %q, %v", p2, err)
	}
	checkInvariants(t, s2)
	if n := s2.Evict(1); n != 2 {
		t.Fatalf("Evict removed %d, want 2", n)
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Error("the evicted blob's file is still there")
	}
	if present(t, s2, d) {
		t.Error("evicted blob present")
	}
	checkInvariants(t, s2)
}

// Concurrent uploads, reads, materialization, evictions and compactions
// of small blobs keep every invariant, under each durability (an upload
// that filled a pack waits for the disk while others evict from it; run
// with -race): every blob the index holds reads back.
func TestPackConcurrency(t *testing.T) {
	for _, dur := range durabilities {
		t.Run(dur.String(), func(t *testing.T) { testPackConcurrency(t, dur) })
	}
}

func testPackConcurrency(t *testing.T, dur Durability) {
	smallPacks(t, 16<<10)
	s := newStore(t, "", WithMaxSize(60<<10), WithDurability(dur))
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 100 {
				data := blob(g*1000+i%30, 500+i%7)
				d := DigestOf(data)
				if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
					t.Error(err)
					return
				}
				switch i % 3 {
				case 0:
					if got, err := ReadAll(ctx, s, d); err == nil && !bytes.Equal(got, data) {
						t.Error("read back wrong bytes")
					}
				case 1:
					if p, err := s.LocalPath(ctx, d, false); err == nil {
						if b, err := os.ReadFile(p); err == nil && !bytes.Equal(b, data) {
							t.Error("materialized file holds wrong bytes")
						}
					}
				case 2:
					if fd, off, err := s.OpenSpan(d); err == nil {
						got := make([]byte, d.Size)
						if _, err := unix.Pread(fd, got, off); err != nil || !bytes.Equal(got, data) {
							t.Error("span reads wrong bytes")
						}
						unix.Close(fd)
					}
				}
			}
		}()
	}
	wg.Wait()
	s.WaitCompactions()
	checkInvariants(t, s)
	s.mu.Lock()
	var held []Digest
	for h, e := range s.index {
		held = append(held, Digest{h, e.size})
	}
	s.mu.Unlock()
	for _, d := range held {
		if _, err := ReadAll(ctx, s, d); err != nil {
			t.Errorf("indexed blob %s does not read: %v", d, err)
		}
	}
}

// Dead records stay dead across restarts: an evicted blob does not come
// back, and a damaged one found at a start after a power loss is still
// missing at the start after that (its tombstone), while a later good
// upload of it is what is found.
func TestPackTombstones(t *testing.T) {
	shortSlack(t)
	reboot(t, "boot-1")
	dir := t.TempDir()
	s := newStore(t, dir, WithMaxSize(2500))
	a := put(t, s, blob(1, 1000))
	b := put(t, s, blob(2, 1000))
	put(t, s, blob(3, 1000)) // evicts a
	if present(t, s, a) {
		t.Fatal("a was not evicted")
	}
	if err := s.flush(false); err != nil {
		t.Fatal(err)
	}
	bad := put(t, s, blob(4, 300))
	crash(s)
	damage(t, s, bad, bad.Size)

	reboot(t, "boot-2")
	s2 := newStore(t, dir) // checks what came after the flush
	if present(t, s2, a) {
		t.Error("an evicted blob came back after a restart")
	}
	if present(t, s2, bad) || !present(t, s2, b) {
		t.Fatalf("after the reboot: damaged blob present %v, b present %v", present(t, s2, bad), present(t, s2, b))
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	s3 := newStore(t, dir) // clean: checks nothing
	if present(t, s3, bad) {
		t.Error("a damaged record came back at the next clean start")
	}
	put(t, s3, blob(4, 300))
	crash(s3)
	s4 := newStore(t, dir)
	if got := get(t, s4, bad, 0); !bytes.Equal(got, blob(4, 300)) {
		t.Error("the re-uploaded blob reads back wrong")
	}
	checkInvariants(t, s4)
}

// A kill -9 in the middle of a compaction leaves the moved records twice;
// the next start indexes one copy of each, compacts the dead pack only
// once the index is built (run with -race), and loses nothing. Small
// packs of earlier runs join the new run's pack.
func TestPackStartAfterInterruptedCompaction(t *testing.T) {
	dir := t.TempDir()
	s := newStore(t, dir)
	want := map[Digest][]byte{}
	for i := range 30 {
		data := blob(i, 700)
		want[put(t, s, data)] = data
	}
	packs := packFiles(t, s)
	if len(packs) != 1 {
		t.Fatalf("%d packs, want 1", len(packs))
	}
	crash(s)
	// The copy a compaction makes: the same records in a newer pack.
	b, err := os.ReadFile(packs[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "packs", "00000000000000ff.pack"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	s2 := newStore(t, dir)
	s2.WaitCompactions()
	if st := s2.Stats(); st.Blobs != len(want) || st.Packs != 1 || st.PackDeadBytes != 0 {
		t.Errorf("after the start %+v: want %d blobs in one pack", st, len(want))
	}
	for d, data := range want {
		if got := get(t, s2, d, 0); !bytes.Equal(got, data) {
			t.Fatalf("%s lost", d)
		}
	}
	checkInvariants(t, s2)
}

// A compaction moves the record of a blob that also has a file (a copy
// made for a path, never synced): the record stays the durable copy.
func TestPackCompactionKeepsRecordsOfMaterializedBlobs(t *testing.T) {
	smallPacks(t, 4<<10)
	s := newStore(t, "")
	keep := put(t, s, blob(1, 1000))
	var rest []Digest
	for i := range 4 {
		rest = append(rest, put(t, s, blob(10+i, 1000)))
	}
	if _, err := s.LocalPath(ctx, keep, false); err != nil {
		t.Fatal(err)
	}
	first, _, _ := s.packedLoc(keep)
	s.mu.Lock()
	for _, d := range rest {
		if e := s.index[d.Hash]; e != nil && e.pk == first {
			s.dropLocked(e)
		}
	}
	s.mu.Unlock()
	s.WaitCompactions()
	now, _, packed := s.packedLoc(keep)
	if !packed || now == first {
		t.Fatalf("after compaction: packed %v, same pack %v; want its record moved", packed, now == first)
	}
	checkInvariants(t, s)
}
