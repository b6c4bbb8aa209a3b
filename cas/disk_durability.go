// Durability: what a DiskStore waits for before it acknowledges a blob,
// and the group commit that lets concurrent uploads share the wait.

package cas

import (
	"fmt"
	"os"
	"sync"
)

// Durability is what a DiskStore makes sure of before it acknowledges a
// blob (a ByteStream Write, a batch, an action's output).
type Durability int

const (
	// WriteBack (the default) acknowledges a blob once the kernel has it
	// and its name, and makes it durable a moment later: a flusher syncs
	// the store's file system (one syncfs(2)) every second while blobs
	// are being written, and records the time of each flush, and the
	// kernel's boot ID, in a checkpoint file. A kill -9 of the server
	// loses nothing (the kernel has the data). A power loss or kernel
	// crash may lose the blobs of the last second or so, never serve them
	// wrong: the first start on the next boot hashes every blob placed
	// after the last flush, and quarantines the damaged ones, before it
	// answers anything, so FindMissing reports them missing and clients
	// upload them again (as after an eviction). Where syncfs(2) does not
	// exist it is FsyncEach.
	WriteBack Durability = iota
	// GroupCommit acknowledges a blob once its bytes and its name are on
	// disk, but every upload in flight shares the same durability
	// barriers: one syncfs(2) of the store's file system, after the blob
	// is renamed into place, makes the bytes and the names of all the
	// files written before it started durable at once. A power loss
	// before that round can leave an unacknowledged blob under its name
	// with its bytes missing or short: the index then sees the wrong size
	// and reports it missing (so the client uploads it again, which
	// replaces it), and reads and input checks hash what they use, so it
	// is never served. Where syncfs(2) does not exist it is FsyncEach.
	GroupCommit
	// FsyncEach fsyncs each blob's file, then its directory, by itself:
	// the same guarantee as GroupCommit, at one or two disk flushes per
	// blob. Choose it when the store shares its file system with other
	// heavy writers, whose dirty pages a syncfs(2) would also wait for.
	FsyncEach
	// NoSync never waits for the disk and never flushes it. A kill -9 of
	// the server loses nothing (the kernel has the data); a power loss or
	// kernel crash may lose acknowledged blobs or leave them damaged,
	// which verified reads and input checks then catch (they are
	// quarantined, never served), but FindMissing may report a damaged
	// blob present until something reads it.
	NoSync
)

// durabilities lists the values, the default first.
var durabilities = []Durability{WriteBack, GroupCommit, FsyncEach, NoSync}

// String names d as the --durability flag spells it.
func (d Durability) String() string {
	switch d {
	case WriteBack:
		return "writeback"
	case GroupCommit:
		return "group"
	case FsyncEach:
		return "fsync"
	case NoSync:
		return "none"
	}
	return fmt.Sprintf("Durability(%d)", int(d))
}

// ParseDurability reads a --durability flag value: writeback, group,
// fsync or none.
func ParseDurability(s string) (Durability, error) {
	for _, d := range durabilities {
		if s == d.String() {
			return d, nil
		}
	}
	return 0, fmt.Errorf("durability %q: want writeback, group, fsync or none", s)
}

// WithDurability sets what the store waits for before acknowledging a
// blob (default WriteBack).
func WithDurability(d Durability) Option {
	return func(s *DiskStore) error {
		if d < WriteBack || d > NoSync {
			return fmt.Errorf("unknown durability %d", int(d))
		}
		s.durability = d
		return nil
	}
}

// WithFsync(false) is WithDurability(NoSync); WithFsync(true) keeps the
// default.
func WithFsync(on bool) Option {
	if on {
		return WithDurability(WriteBack)
	}
	return WithDurability(NoSync)
}

// groupSync lets concurrent writers share syncfs(2) calls (group commit).
// A writer that needs its files durable calls wait after writing them; wait
// returns once a syncfs that started after the call has finished. While
// one syncfs runs, every writer that arrives queues for the next one, so
// under load each disk flush covers all the uploads of one round trip of
// the disk instead of one each.
type groupSync struct {
	flush func() error // syncfs of the store's file system

	mu       sync.Mutex
	cond     *sync.Cond
	started  uint64 // rounds started
	finished uint64 // rounds finished
	running  bool
	// failedRound is the last round whose syncfs failed, and failed its
	// error; a writer covered by that round or a later one reports it.
	failedRound uint64
	failed      error
	rounds      uint64 // statistics: syncfs calls made
	waits       uint64 // statistics: wait calls
}

func newGroupSync(dir string) *groupSync {
	g := &groupSync{flush: func() error { return syncFS(dir) }}
	g.cond = sync.NewCond(&g.mu)
	return g
}

// wait returns when everything written before the call is durable, or the
// error of the syncfs that should have made it so.
func (g *groupSync) wait() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.waits++
	// A round already running may have started before our writes: only
	// the next one covers them.
	want := g.started + 1
	for g.finished < want {
		if g.running {
			g.cond.Wait()
			continue
		}
		g.running = true
		g.started++
		round := g.started
		g.rounds++
		g.mu.Unlock()
		err := g.flush()
		g.mu.Lock()
		g.running = false
		g.finished = round
		if err != nil {
			g.failedRound, g.failed = round, err
		}
		g.cond.Broadcast()
	}
	if g.failed != nil && g.failedRound >= want {
		return g.failed
	}
	return nil
}

// stats returns the syncfs calls made and the waits they served.
func (g *groupSync) stats() (rounds, waits uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.rounds, g.waits
}

// syncData makes the bytes of the temp file f durable before it is
// renamed into place, under FsyncEach. Under GroupCommit the round after
// the rename (syncName) covers the bytes too, so one shared flush serves a
// blob; NoSync waits for nothing.
func (s *DiskStore) syncData(f *os.File) error {
	if s.durability != FsyncEach {
		return nil
	}
	return f.Sync()
}

// syncName makes a name just renamed into dir durable: a synced file
// under a name that was never synced can vanish in a power loss (or a VM
// kill) before the file system commits its journal.
func (s *DiskStore) syncName(dir string) error {
	switch {
	case s.durability == NoSync || s.durability == WriteBack:
		return nil
	case s.group != nil:
		return s.group.wait()
	default:
		return fsyncDir(dir)
	}
}

// fsyncDir makes the entries of dir durable.
func fsyncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}
