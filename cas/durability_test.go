package cas

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/actiond/actiond/internal/testutil"
)

// A waiter that arrives while a round runs is not covered by it (its
// writes may have come after the syncfs started): it returns only after
// the next round.
func TestGroupSyncWaitsForARoundStartedAfterIt(t *testing.T) {
	g := newGroupSync("")
	release := make(chan struct{})
	var rounds atomic.Int32
	g.flush = func() error {
		rounds.Add(1)
		<-release
		return nil
	}
	first := make(chan error)
	go func() { first <- g.wait() }()
	waitFor(t, func() bool { return rounds.Load() == 1 })
	second := make(chan error)
	go func() { second <- g.wait() }()
	waitFor(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return g.waits == 2 })
	release <- struct{}{} // round 1 ends
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	select {
	case <-second:
		t.Fatal("the second waiter returned after a round that started before it")
	case <-time.After(50 * time.Millisecond):
	}
	waitFor(t, func() bool { return rounds.Load() == 2 })
	release <- struct{}{}
	if err := <-second; err != nil {
		t.Fatal(err)
	}
}

// Concurrent waiters share rounds, and a failed round's error reaches
// the waiters it covered but not later ones.
func TestGroupSyncSharesRoundsAndReportsErrors(t *testing.T) {
	g := newGroupSync("")
	var rounds atomic.Int32
	fail := errors.New("syncfs: input/output error")
	var failing atomic.Bool
	g.flush = func() error {
		rounds.Add(1)
		time.Sleep(2 * time.Millisecond)
		if failing.Load() {
			return fail
		}
		return nil
	}
	const waiters = 64
	var wg sync.WaitGroup
	for i := 0; i < waiters; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := g.wait(); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := rounds.Load(); n >= waiters {
		t.Errorf("%d waiters took %d syncfs rounds: no sharing", waiters, n)
	}
	t.Logf("%d waiters, %d rounds", waiters, rounds.Load())
	failing.Store(true)
	if err := g.wait(); !errors.Is(err, fail) {
		t.Errorf("wait during a failing round = %v, want %v", err, fail)
	}
	failing.Store(false)
	if err := g.wait(); err != nil {
		t.Errorf("wait after the disk recovered = %v", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
	}
}

// Every way into the store (streamed uploads, small and pipelined, an
// upload resumed after Idle, batches, PutFile, replacing a bad stored
// copy) works under every durability, with unnamed temp files and with
// named ones, and what was stored is there, intact, after a reopen, with
// no temp file left behind.
func TestDurabilityModesStoreAndReopen(t *testing.T) { forPacks(t, testDurabilityModesStoreAndReopen) }

func testDurabilityModesStoreAndReopen(t *testing.T, packs Option) {
	for _, dur := range durabilities {
		for _, anon := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/anon=%v", dur, anon), func(t *testing.T) {
				dir := t.TempDir()
				s := newStore(t, dir, WithDurability(dur), packs)
				if anon {
					testutil.Require(t, s.anonTemp, "the test directory's file system has no O_TMPFILE (or /proc is not mounted)")
				}
				s.anonTemp = anon
				var want [][]byte
				add := func(b []byte) { want = append(want, b) }

				small, large := blob(1, 200), blob(2, pipelineMin+12345)
				put(t, s, small)
				put(t, s, large)
				add(small)
				add(large)

				// Resumed: half, Idle (the file must outlive its descriptor), the rest.
				resumed := blob(3, PackMaxBlob+4096) // a file upload: packed ones are not resumable
				w, err := s.NewWriter(DigestOf(resumed))
				if err != nil {
					t.Fatal(err)
				}
				if _, err := w.Write(resumed[:1000]); err != nil {
					t.Fatal(err)
				}
				if err := w.(*Writer).Idle(); err != nil {
					t.Fatal(err)
				}
				if _, err := w.Write(resumed[1000:]); err != nil {
					t.Fatal(err)
				}
				if err := w.Commit(); err != nil {
					t.Fatal(err)
				}
				add(resumed)

				var batch []Blob
				for i := 0; i < 20; i++ {
					b := blob(100+i, 50+i)
					batch = append(batch, Blob{Digest: DigestOf(b), Data: b})
					add(b)
				}
				for i, err := range s.PutBatch(ctx, batch) {
					if err != nil {
						t.Fatalf("batch blob %d: %v", i, err)
					}
				}

				out := filepath.Join(s.TempDir(), "output")
				output := blob(4, 3000)
				if err := os.WriteFile(out, output, 0o644); err != nil {
					t.Fatal(err)
				}
				if _, err := s.PutFile(ctx, out); err != nil {
					t.Fatal(err)
				}
				add(output)

				// A stored copy gone bad is replaced by the next upload.
				bad := DigestOf(small)
				p := s.blobPath(bad.Hash)
				os.Chmod(p, 0o644)
				if err := os.WriteFile(p, bytes.Repeat([]byte{'x'}, len(small)), 0o444); err != nil {
					t.Fatal(err)
				}
				s.mu.Lock()
				s.index[bad.Hash].verified = false
				s.mu.Unlock()
				put(t, s, small)

				if st := s.Stats(); (st.SyncRounds > 0) != (dur == GroupCommit) {
					t.Errorf("durability %s made %d group syncfs rounds", dur, st.SyncRounds)
				}
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				if st := s.Stats(); dur == WriteBack && st.SyncRounds == 0 {
					t.Error("Close made no write-back flush")
				}
				s2 := newStore(t, dir, packs)
				for _, b := range want {
					if got := get(t, s2, DigestOf(b), 0); !bytes.Equal(got, b) {
						t.Errorf("blob %s reads back wrong after a reopen", DigestOf(b))
					}
				}
				if left, _ := os.ReadDir(s2.TempDir()); len(left) != 0 {
					t.Errorf("temp files left: %v", left)
				}
			})
		}
	}
}

func TestParseDurability(t *testing.T) {
	for _, d := range durabilities {
		if got, err := ParseDurability(d.String()); err != nil || got != d {
			t.Errorf("ParseDurability(%q) = %v, %v", d.String(), got, err)
		}
	}
	if _, err := ParseDurability("always"); err == nil {
		t.Error("ParseDurability accepted an unknown value")
	}
}
