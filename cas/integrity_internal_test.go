package cas

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// rot rewrites the stored file (or pack record) of d with other bytes of
// the same size.
func rot(t testing.TB, s *DiskStore, d Digest) {
	t.Helper()
	if pk, off, packed := s.packedLoc(d); packed {
		os.Chmod(pk.path, 0o644)
		f, err := os.OpenFile(pk.path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := make([]byte, d.Size)
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		for i := range b {
			b[i] ^= 0xff
		}
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		return
	}
	p := s.blobPath(d.Hash)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	for i := range b {
		b[i] ^= 0xff
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o444); err != nil {
		t.Fatal(err)
	}
}

func isVerified(s *DiskStore, d Digest) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.index[d.Hash]
	return ok && e.verified
}

// The verified mark: set by the write path, absent after a restart, set by
// VerifyBlobs, which hashes only what is not marked and quarantines what is
// bad.
func TestVerifyBlobsMarks(t *testing.T) {
	forPacks(t, testVerifyBlobsMarks)
}

// forPacks runs test with blobs in files of their own and in packs.
func forPacks(t *testing.T, test func(t *testing.T, packs Option)) {
	for _, on := range []bool{false, true} {
		t.Run(fmt.Sprintf("packs=%v", on), func(t *testing.T) { test(t, WithSmallBlobPacks(on)) })
	}
}

func testVerifyBlobsMarks(t *testing.T, packs Option) {
	dir := t.TempDir()
	s := newStore(t, dir, WithFsync(false), packs)
	var ds []Digest
	for i := range 4 {
		ds = append(ds, put(t, s, blob(i, 3000+i)))
	}
	for _, d := range ds {
		if !isVerified(s, d) {
			t.Fatalf("%s not marked verified after Put", d)
		}
	}
	rot(t, s, ds[1])
	// Marked since written: VerifyBlobs trusts the mark (a restart is what
	// takes trust away) and does not read the files.
	if bad, err := s.VerifyBlobs(ctx, ds); err != nil || len(bad) != 0 {
		t.Fatalf("VerifyBlobs of marked blobs = %v, %v", bad, err)
	}

	s = newStore(t, dir, WithFsync(false), packs)
	for _, d := range ds {
		if isVerified(s, d) {
			t.Fatalf("%s marked verified right after a restart", d)
		}
	}
	// Within a budget smaller than the bad blob: nothing hashed, nothing reported.
	if bad, err := s.VerifyBlobsWithin(ctx, ds[1:2], ds[1].Size-1); err != nil || len(bad) != 0 || isVerified(s, ds[1]) {
		t.Fatalf("VerifyBlobsWithin over budget = %v, %v (verified %v)", bad, err, isVerified(s, ds[1]))
	}
	absent := DigestOf([]byte("absent"))
	bad, err := s.VerifyBlobs(ctx, append(ds, absent))
	if err != nil || len(bad) != 1 || bad[0] != ds[1] {
		t.Fatalf("VerifyBlobs = %v, %v; want [%s]", bad, err, ds[1])
	}
	if present(t, s, ds[1]) {
		t.Fatal("corrupt blob still present")
	}
	for _, d := range []Digest{ds[0], ds[2], ds[3]} {
		if !isVerified(s, d) {
			t.Fatalf("%s not marked after VerifyBlobs", d)
		}
	}
	if st := s.Stats(); st.Quarantined != 1 || st.Blobs != 3 {
		t.Fatalf("stats %+v, want 1 quarantined, 3 blobs", st)
	}
	checkInvariants(t, s)
}

// Every write path replaces a stored copy that is not known good instead
// of dropping the new, verified, bytes as "already present".
func TestWritePathsHealBadCopies(t *testing.T) {
	for _, path := range []string{"Put", "PutFile", "PutBatch"} {
		t.Run(path, func(t *testing.T) {
			dir := t.TempDir()
			s := newStore(t, dir, WithFsync(false))
			data := blob(7, 20000)
			d := put(t, s, data)
			rot(t, s, d) // same size: only a hash can tell
			s = newStore(t, dir, WithFsync(false))
			switch path {
			case "Put":
				put(t, s, data)
			case "PutFile":
				p := filepath.Join(s.TempDir(), "out")
				if err := os.WriteFile(p, data, 0o644); err != nil {
					t.Fatal(err)
				}
				if got, err := s.PutFile(ctx, p); err != nil || got != d {
					t.Fatalf("PutFile = %v, %v", got, err)
				}
			case "PutBatch":
				if errs := s.PutBatch(ctx, []Blob{{d, data}}); errs[0] != nil {
					t.Fatal(errs[0])
				}
			}
			b, err := os.ReadFile(s.blobPath(d.Hash))
			if err != nil || !bytes.Equal(b, data) {
				t.Fatalf("stored file after %s: %v; still the bad bytes", path, err)
			}
			if !isVerified(s, d) {
				t.Fatal("not marked verified after the heal")
			}
			// Now known good: a second upload is dropped, the file kept.
			before, _ := os.Stat(s.blobPath(d.Hash))
			put(t, s, data)
			after, _ := os.Stat(s.blobPath(d.Hash))
			if !os.SameFile(before, after) {
				t.Fatal("an intact blob was replaced")
			}
			checkInvariants(t, s)
			assertTmpEmpty(t, s)
		})
	}
}

// A size limit still holds while a truncated copy is replaced.
func TestHealUnderSizeLimit(t *testing.T) { forPacks(t, testHealUnderSizeLimit) }

func testHealUnderSizeLimit(t *testing.T, packs Option) {
	dir := t.TempDir()
	data := blob(3, 10000)
	s := newStore(t, dir, WithFsync(false), WithMaxSize(15000), packs)
	d := put(t, s, data)
	p, cut := s.blobPath(d.Hash), int64(4000)
	if pk, off, packed := s.packedLoc(d); packed {
		p, cut = pk.path, off+4000 // a pack cut in the record
	}
	os.Chmod(p, 0o644)
	if err := os.Truncate(p, cut); err != nil {
		t.Fatal(err)
	}
	s = newStore(t, dir, WithFsync(false), WithMaxSize(15000), packs)
	if present(t, s, d) {
		t.Fatal("truncated blob reported present")
	}
	put(t, s, data)
	if st := s.Stats(); st.Bytes != d.Size || st.Blobs != 1 {
		t.Fatalf("stats %+v after heal, want one blob of %d bytes", st, d.Size)
	}
	if !bytes.Equal(get(t, s, d, 0), data) {
		t.Fatal("content after heal differs")
	}
	checkInvariants(t, s)
}

// Get never hands out all of a wrong blob: the read that would complete it
// fails with ErrCorrupt, which also reads as ErrNotFound.
func TestGetCorruptFailsBeforeTheEnd(t *testing.T) {
	s := newStore(t, "", WithFsync(false))
	data := blob(9, 3<<20+5)
	d := put(t, s, data)
	rot(t, s, d)
	r, err := s.Get(ctx, d, 0)
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	_, err = got.ReadFrom(r)
	r.Close()
	if !errors.Is(err, ErrCorrupt) || !errors.Is(err, ErrNotFound) {
		t.Fatalf("read error %v, want ErrCorrupt and ErrNotFound", err)
	}
	if int64(got.Len()) >= d.Size {
		t.Fatalf("got %d bytes of a corrupt %d-byte blob", got.Len(), d.Size)
	}
	if _, err := s.Get(ctx, d, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after quarantine: %v", err)
	}
	if _, err := ReadAll(ctx, s, d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("ReadAll after quarantine: %v", err)
	}
}

// The scrubber finds a bad blob nobody reads, marks the good ones verified
// and stops with its context.
func TestScrubQuarantines(t *testing.T) { forPacks(t, testScrubQuarantines) }

func testScrubQuarantines(t *testing.T, packs Option) {
	dir := t.TempDir()
	s := newStore(t, dir, WithFsync(false), packs)
	var ds []Digest
	for i := range 10 {
		ds = append(ds, put(t, s, blob(i, 1000*(i+1))))
	}
	rot(t, s, ds[4])
	s = newStore(t, dir, WithFsync(false), packs) // nothing verified
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Scrub(ctx, 1<<30, time.Millisecond) }()
	for deadline := time.Now().Add(30 * time.Second); s.ScrubStats().Passes < 1; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no scrub pass within 30s")
		}
	}
	cancel()
	<-done
	if st := s.Stats(); st.Quarantined != 1 || present(t, s, ds[4]) {
		t.Fatalf("after a scrub pass: %+v, corrupt blob present %v", st, present(t, s, ds[4]))
	}
	for i, d := range ds {
		if i != 4 && !isVerified(s, d) {
			t.Fatalf("blob %d not marked verified by the scrubber", i)
		}
	}
	if sc := s.ScrubStats(); sc.Blobs < 10 || sc.Bytes < 50000 {
		t.Fatalf("scrub stats %+v", sc)
	}
	if _, err := os.Stat(filepath.Join(dir, QuarantineDir, ds[4].Hash)); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkVerifyBlobsMarked is what input verification adds to every
// action in the steady state (inputs written through actiond, or hashed
// once since start): one call over the action's distinct input files.
// Compare with BenchmarkFindMissingMarked, the presence check every action
// already makes over the same list.
func BenchmarkVerifyBlobsMarked(b *testing.B) { benchMarked(b, (*DiskStore).VerifyBlobs) }

func BenchmarkFindMissingMarked(b *testing.B) { benchMarked(b, (*DiskStore).FindMissing) }

// benchMarked times op over 2,000 marked blobs, none of which it may
// return, and reports the time per input.
func benchMarked(b *testing.B, op func(*DiskStore, context.Context, []Digest) ([]Digest, error)) {
	s, ds := markedStore(b, 2000)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if got, err := op(s, ctx, ds); err != nil || len(got) != 0 {
			b.Fatal(got, err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(len(ds)), "ns/input")
}

func markedStore(b *testing.B, n int) (*DiskStore, []Digest) {
	s := newStore(b, "", WithFsync(false))
	var ds []Digest
	for i := range n {
		ds = append(ds, put(b, s, blob(i, 100)))
	}
	return s, ds
}
