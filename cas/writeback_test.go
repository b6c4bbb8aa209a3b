package cas

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// crash stops a WriteBack store's flusher without the final flush, as a
// killed server would leave it.
func crash(s *DiskStore) {
	close(s.wb.stop)
	<-s.wb.done
}

func readCheckpointFile(t *testing.T, dir string) syncCheckpoint {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, checkpointFile))
	if err != nil {
		t.Fatal(err)
	}
	var cp syncCheckpoint
	if err := json.Unmarshal(b, &cp); err != nil {
		t.Fatal(err)
	}
	return cp
}

// reboot makes the store believe the kernel booted again until the test ends.
func reboot(t *testing.T, id string) {
	old := bootID
	bootID = func() string { return id }
	t.Cleanup(func() { bootID = old })
}

func shortSlack(t *testing.T) {
	old := ctimeSlack
	ctimeSlack = 50 * time.Millisecond
	t.Cleanup(func() { ctimeSlack = old })
}

// damage replaces a stored blob's bytes with as many wrong ones, or
// truncates it (n < its size).
func damage(t *testing.T, s *DiskStore, d Digest, n int64) {
	t.Helper()
	if pk, off, packed := s.packedLoc(d); packed {
		// A record: n < d.Size cuts the pack there (the torn tail of a
		// pack; d must be its last record).
		f, err := os.OpenFile(pk.path, os.O_RDWR, 0)
		if err != nil {
			os.Chmod(pk.path, 0o644)
			f, err = os.OpenFile(pk.path, os.O_RDWR, 0)
		}
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if n < d.Size {
			err = f.Truncate(off + n)
		} else {
			_, err = f.WriteAt(bytes.Repeat([]byte{'x'}, int(n)), off)
		}
		if err != nil {
			t.Fatal(err)
		}
		return
	}
	p := s.blobPath(d.Hash)
	os.Chmod(p, 0o644)
	if err := os.WriteFile(p, bytes.Repeat([]byte{'x'}, int(n)), 0o444); err != nil {
		t.Fatal(err)
	}
}

// After an unclean stop and a reboot, the blobs placed after the last
// flush are hashed before the store answers, and the damaged ones (what a
// power loss does to unflushed files) are missing from then on; blobs
// flushed before are not hashed again at start-up (reads still verify).
func TestWriteBackChecksBlobsPlacedAfterTheLastFlush(t *testing.T) {
	forPacks(t, testWriteBackChecksBlobsPlacedAfterTheLastFlush)
}

func testWriteBackChecksBlobsPlacedAfterTheLastFlush(t *testing.T, packs Option) {
	shortSlack(t)
	reboot(t, "boot-1")
	for _, reopenAs := range []Durability{WriteBack, GroupCommit} {
		t.Run(reopenAs.String(), func(t *testing.T) {
			dir := t.TempDir()
			s := newStore(t, dir, packs)
			if cp := readCheckpointFile(t, dir); cp.Clean || cp.BootID != "boot-1" {
				t.Fatalf("checkpoint at start %+v: want unclean, on boot-1", cp)
			}
			old := put(t, s, blob(1, 300))
			oldBad := put(t, s, blob(2, 300))
			// Damaged before the flush: bit rot, not a power loss (any
			// write moves ctime, so it must come before the checkpoint).
			damage(t, s, oldBad, oldBad.Size)
			time.Sleep(3 * ctimeSlack)
			if err := s.flush(false); err != nil {
				t.Fatal(err)
			}
			time.Sleep(3 * ctimeSlack)
			good := put(t, s, blob(3, 300))
			bad := put(t, s, blob(4, 300))
			short := put(t, s, blob(5, 300))
			crash(s)
			damage(t, s, bad, bad.Size)
			damage(t, s, short, 10)

			reboot(t, "boot-2")
			s2 := newStore(t, dir, WithDurability(reopenAs), packs)
			all := []Digest{old, oldBad, good, bad, short}
			missing, err := s2.FindMissing(ctx, all)
			if err != nil {
				t.Fatal(err)
			}
			if want := []Digest{bad, short}; !slices.Equal(missing, want) {
				t.Errorf("after the reboot FindMissing = %v, want the two damaged unflushed blobs %v", missing, want)
			}
			if q := s2.Stats().Quarantined; q != 2 {
				t.Errorf("%d blobs quarantined at start, want 2 (only those placed after the last flush are hashed)", q)
			}
			for i, d := range []Digest{old, good} {
				if got := get(t, s2, d, 0); !bytes.Equal(got, blob([]int{1, 3}[i], 300)) {
					t.Errorf("blob %s reads back wrong", d)
				}
			}
			if _, err := ReadAll(ctx, s2, oldBad); err == nil {
				t.Error("a damaged flushed blob was served")
			}
			_, err = os.Stat(filepath.Join(dir, checkpointFile))
			switch reopenAs {
			case WriteBack:
				if cp := readCheckpointFile(t, dir); cp.Clean || cp.BootID != "boot-2" {
					t.Errorf("checkpoint after the restart %+v: want unclean, on boot-2", cp)
				}
			default:
				if !os.IsNotExist(err) {
					t.Errorf("checkpoint left under %s: %v", reopenAs, err)
				}
			}
		})
	}
}

// A store closed cleanly is not checked at the next start, even on another
// boot; one stopped uncleanly on the same boot (a kill -9: the kernel still
// has its writes) is not either.
func TestWriteBackTrustsACleanCloseAndTheSameBoot(t *testing.T) {
	forPacks(t, testWriteBackTrustsACleanCloseAndTheSameBoot)
}

func testWriteBackTrustsACleanCloseAndTheSameBoot(t *testing.T, packs Option) {
	shortSlack(t)
	reboot(t, "boot-1")
	for _, how := range []string{"closed", "killed on the same boot"} {
		t.Run(how, func(t *testing.T) {
			dir := t.TempDir()
			s := newStore(t, dir, packs)
			d := put(t, s, blob(1, 300))
			if how == "closed" {
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				if cp := readCheckpointFile(t, dir); !cp.Clean {
					t.Errorf("checkpoint after Close %+v: want clean", cp)
				}
				reboot(t, "boot-2")
			} else {
				crash(s)
			}
			damage(t, s, d, d.Size) // not by a power loss: only a read finds it
			s2 := newStore(t, dir, packs)
			if q := s2.Stats().Quarantined; q != 0 {
				t.Errorf("%d blobs hashed and quarantined at start", q)
			}
			if _, err := ReadAll(ctx, s2, d); err == nil {
				t.Error("a damaged blob was served")
			}
		})
	}
}

// A checkpoint that cannot be read is a possible power loss at any time:
// every blob is hashed at start.
func TestWriteBackUnreadableCheckpointChecksEverything(t *testing.T) {
	forPacks(t, testWriteBackUnreadableCheckpointChecksEverything)
}

func testWriteBackUnreadableCheckpointChecksEverything(t *testing.T, packs Option) {
	dir := t.TempDir()
	s := newStore(t, dir, packs)
	d := put(t, s, blob(1, 300))
	crash(s)
	damage(t, s, d, d.Size)
	if err := os.WriteFile(filepath.Join(dir, checkpointFile), []byte("{garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	s2 := newStore(t, dir, packs)
	if missing, _ := s2.FindMissing(ctx, []Digest{d}); len(missing) != 1 {
		t.Error("a damaged blob is reported present after an unreadable checkpoint")
	}
}

// The flusher flushes by itself while blobs are placed, and moves the
// checkpoint past them.
func TestWriteBackFlushesInTheBackground(t *testing.T) {
	dir := t.TempDir()
	s := newStore(t, dir)
	start := readCheckpointFile(t, dir).SyncedThrough
	time.Sleep(10 * time.Millisecond)
	put(t, s, blob(1, 300))
	placed := time.Now()
	deadline := time.Now().Add(30 * time.Second)
	for s.Stats().SyncRounds == 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if s.Stats().SyncRounds == 0 {
		t.Fatalf("no flush %v after a blob was placed", 30*time.Second)
	}
	cp := readCheckpointFile(t, dir)
	if !cp.SyncedThrough.After(placed) || !cp.SyncedThrough.After(start) || cp.Clean {
		t.Errorf("checkpoint after a flush %+v; started at %v, blob placed at %v", cp, start, placed)
	}
	rounds := s.Stats().SyncRounds
	time.Sleep(3 * writebackInterval)
	if got := s.Stats().SyncRounds; got != rounds {
		t.Errorf("%d flushes while nothing was written", got-rounds)
	}
}

// A store that cannot write its checkpoint (a full disk) still opens, and
// waits for the disk instead: group commit for that run.
func TestWriteBackFallsBackWithoutItsCheckpoint(t *testing.T) {
	dir := t.TempDir()
	s := newStore(t, dir)
	put(t, s, blob(1, 300))
	crash(s)
	checkpointFault = errors.New("no space left on device (test)")
	defer func() { checkpointFault = nil }()
	s2 := newStore(t, dir)
	if s2.durability != GroupCommit || s2.wb != nil {
		t.Fatalf("durability %s without a checkpoint, want group", s2.durability)
	}
	d := put(t, s2, blob(2, 300))
	if st := s2.Stats(); st.SyncRounds == 0 {
		t.Error("a blob was acknowledged without waiting for the disk")
	}
	if _, err := os.Stat(filepath.Join(dir, checkpointFile)); !os.IsNotExist(err) {
		t.Errorf("the previous run's checkpoint was kept: %v", err)
	}
	if got := get(t, s2, d, 0); !bytes.Equal(got, blob(2, 300)) {
		t.Error("blob reads back wrong")
	}
}
