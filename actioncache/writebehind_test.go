package actioncache

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// resultFor is a distinct, complete (it references no blob) result.
func resultFor(i int) (cas.Digest, *repb.ActionResult) {
	return cas.DigestOf([]byte(fmt.Sprintf("action %d", i))), &repb.ActionResult{ExitCode: int32(i % 100)}
}

func openTestCache(t *testing.T, path string) *BoltCache {
	t.Helper()
	store, err := cas.NewDiskStore(filepath.Join(filepath.Dir(path), "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	c, err := Open(path, store)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Results recorded behind are served at once (from memory until they are
// committed), and after Close they are on disk: a reopened cache has them.
func TestPutBehindServesAtOnceAndPersistsOnClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ac.db")
	c := openTestCache(t, path)
	// A write transaction of ours holds the writer at its first commit,
	// so that most results are still pending when Close is called.
	tx, err := c.db.Begin(true)
	if err != nil {
		t.Fatal(err)
	}
	const n = 200
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			d, res := resultFor(i)
			if err := c.PutBehind(d, res, func(err error) { t.Errorf("commit of %d: %v", i, err) }); err != nil {
				t.Error(err)
			}
			if got, err := c.Get(context.Background(), d); err != nil || got.ExitCode != res.ExitCode {
				t.Errorf("Get right after PutBehind(%d) = %v, %v", i, got, err)
			}
		})
	}
	wg.Wait()
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if d, res := resultFor(n); c.PutBehind(d, res, nil) == nil {
		t.Error("PutBehind after Close succeeded")
	}
	c = openTestCache(t, path)
	defer c.Close()
	if got := c.Stats().Entries; got != n {
		t.Errorf("reopened cache has %d entries, want %d", got, n)
	}
	for i := range n {
		d, res := resultFor(i)
		if got, err := c.Get(context.Background(), d); err != nil || got.ExitCode != res.ExitCode {
			t.Errorf("Get(%d) after reopening = %v, %v", i, got, err)
		}
	}
}

// What is recorded while a commit runs is committed together, in one
// transaction.
func TestPutBehindCommitsTogether(t *testing.T) {
	c := openTestCache(t, filepath.Join(t.TempDir(), "ac.db"))
	defer c.Close()
	// As if a commit were running: PutBehind starts no writer.
	running := make(chan struct{})
	c.behindMu.Lock()
	c.writing = running
	c.behindMu.Unlock()
	const n = 50
	for i := range n {
		if d, res := resultFor(i); c.PutBehind(d, res, nil) != nil {
			t.Fatal("PutBehind failed")
		}
	}
	writes := func() int64 { st := c.db.Stats(); return st.TxStats.GetWrite() }
	before := writes()
	c.writeBehind(running) // the writer's next round
	<-running
	c.behindMu.Lock()
	left := len(c.pending)
	c.behindMu.Unlock()
	if left != 0 {
		t.Errorf("%d results left pending", left)
	}
	if st := c.Stats(); st.Entries != n || st.BehindResults != n || st.BehindCommits != 1 {
		t.Errorf("stats %+v: want %d entries and results in 1 commit", st, n)
	}
	// One transaction writes each dirty page once and the meta page: far
	// fewer writes than a transaction per result would make.
	if w := writes() - before; w >= n {
		t.Errorf("%d page writes for %d results: not one transaction", w, n)
	}
}

// A commit that fails reports to each result's onError and drops the
// results: a cache miss, never a wrong answer.
func TestPutBehindReportsAFailedCommit(t *testing.T) {
	c := openTestCache(t, filepath.Join(t.TempDir(), "ac.db"))
	if err := c.db.Close(); err != nil { // every commit fails from now on
		t.Fatal(err)
	}
	failed := make(chan error, 1)
	d, res := resultFor(1)
	if err := c.PutBehind(d, res, func(err error) { failed <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-failed; err == nil {
		t.Fatal("onError got nil")
	}
	c.Flush()
	c.behindMu.Lock()
	left := len(c.pending)
	c.behindMu.Unlock()
	if left != 0 {
		t.Errorf("a failed result stays pending (%d)", left)
	}
	if _, err := c.Get(context.Background(), d); err == nil || errors.Is(err, ErrNotFound) {
		// The database is closed: reading it fails, which is not "found".
		if err == nil {
			t.Error("Get found the dropped result")
		}
	}
}

// A result stored with Put is newer than one recorded behind for the same
// action and not yet committed: it stands.
func TestPutReplacesAPendingResult(t *testing.T) {
	c := openTestCache(t, filepath.Join(t.TempDir(), "ac.db"))
	defer c.Close()
	tx, err := c.db.Begin(true) // holds the writer
	if err != nil {
		t.Fatal(err)
	}
	d, old := resultFor(1)
	if err := c.PutBehind(d, old, nil); err != nil {
		t.Fatal(err)
	}
	newer := &repb.ActionResult{ExitCode: 42}
	put := make(chan error, 1)
	go func() { put <- c.Put(context.Background(), d, newer) }()
	// Put has dropped the pending result before it waits for the
	// database; the writer then commits nothing over it, whichever of the
	// two transactions comes first.
	for start := time.Now(); ; runtime.Gosched() {
		c.behindMu.Lock()
		n := len(c.pending)
		c.behindMu.Unlock()
		if n == 0 {
			break
		}
		if time.Since(start) > 10*time.Second {
			tx.Rollback()
			t.Fatal("Put left the older result pending")
		}
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	if err := <-put; err != nil {
		t.Fatal(err)
	}
	c.Flush()
	if got, err := c.Get(context.Background(), d); err != nil || got.ExitCode != 42 {
		t.Errorf("Get = %v, %v; want the result of Put", got, err)
	}
}
