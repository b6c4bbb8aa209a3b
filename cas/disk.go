package cas

import (
	"bytes"
	"container/list"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// DiskStore keeps blobs as read-only files under dir/sha256/<2 hex>/<hash>.
// Uploads go to dir/tmp (the same file system), are verified while they are
// written, synced and renamed into place, so a crash never leaves a wrong
// blob under a name. An in-memory index answers FindMissing without stat
// calls and orders blobs for LRU eviction under a size limit.
//
// Invariant: every indexed blob has its file. Evictions delete files under
// mu; a rename into place happens outside mu but only for a hash marked
// pending (under mu, after checking it is not indexed), and pending hashes
// are never evicted, so an eviction can never delete a file that was just
// renamed into place.
type DiskStore struct {
	dir       string
	blobDir   string
	execDir   string
	tmpDir    string
	tmpPrefix string
	tmpSeq    atomic.Uint64
	maxSize   int64
	// durability is what a blob waits for before it is acknowledged;
	// group is the shared syncfs under GroupCommit (nil otherwise).
	durability Durability
	group      *groupSync
	wb         *writeback // the flusher under WriteBack (nil otherwise)
	// anonTemp: uploads are written to unnamed files (O_TMPFILE) and
	// linked into place, instead of named temp files renamed there.
	anonTemp bool
	log      *slog.Logger

	// Packs (see disk_pack.go). packMu serializes appends and guards
	// active and packSeq; it is never taken with mu held.
	packDir string
	noPacks bool
	packMu  sync.Mutex
	active  *pack
	packSeq uint64
	// packCheck, while the store opens after an unclean stop on another
	// boot, is the last flush's mark: records past it are hashed.
	packCheck *packMark

	mu        sync.Mutex
	index     map[string]*entry
	lru       *list.List // of *entry, most recently used at the front
	size      int64      // bytes of all indexed blobs
	reserved  int64      // bytes of blobs being renamed into place
	uploading int64      // bytes in the temp files of unfinished Writers
	pending   map[string]int
	pins      map[string]int
	evictions int64
	// quarantined counts blobs moved aside because their file no longer
	// matched their digest; onQuarantine is told about each.
	quarantined  int64
	onQuarantine []func(Digest)
	scrub        scrubCounters
	// packs are the readable packs by id; packDead their dead bytes.
	packs            map[uint64]*pack
	packDead         int64
	compactQueue     []*pack
	compactorRunning bool
	// opening: the index is being built, without mu; no compaction may
	// start. closing: Close has begun; none may start either.
	opening, closing bool
	// unverifiedReads makes Get return the bare file, as before reads
	// were verified; only benchmarks set it (SetVerifyReads in tests).
	unverifiedReads atomic.Bool
	inlineHash      atomic.Bool // benchmarks: never pipeline the read hash
}

type entry struct {
	hash     string
	size     int64
	elem     *list.Element
	diskTime time.Time // mtime on disk, refreshed lazily for LRU order across restarts
	// verified is set once this process has hashed the file (or written
	// it from bytes it hashed) and found it matches. It lives in memory
	// only, on purpose: what makes files go bad without actiond knowing
	// (a power loss on a --no-fsync root, a disk, an edit while stopped)
	// happens across restarts, so a restart is when trust must be earned
	// again; an on-disk mark would need its own invalidation (mtime and
	// ctime cannot see bit rot) and could itself go stale.
	verified bool
	// Where the blob is: its own file (file), a pack record (pk, the
	// offset of its data pkOff), or both (a packed blob given a file for
	// a hardlinked input root). Every indexed entry has one of them.
	file  bool
	pk    *pack
	pkOff int64
}

// Option configures a DiskStore; one given a value it cannot use makes
// NewDiskStore fail.
type Option func(*DiskStore) error

// WithMaxSize bounds the bytes stored; least recently used blobs that are not
// pinned are evicted to stay under it. Zero means unbounded.
func WithMaxSize(n int64) Option {
	return func(s *DiskStore) error {
		if n < 0 {
			return fmt.Errorf("size limit %d is negative (0 means unbounded)", n)
		}
		s.maxSize = n
		return nil
	}
}

// WithLogger sets the logger for start-up and eviction messages.
func WithLogger(l *slog.Logger) Option {
	return func(s *DiskStore) error {
		if l == nil {
			return errors.New("nil logger")
		}
		s.log = l
		return nil
	}
}

// copyBufSize is the buffer for hashing and copying files.
const copyBufSize = 1 << 20

// NewDiskStore opens (creating if needed) a store in dir. Leftover uploads
// from a previous run are removed and the index is rebuilt from the files.
func NewDiskStore(dir string, opts ...Option) (*DiskStore, error) {
	var rnd [4]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, err
	}
	s := &DiskStore{
		dir:       dir,
		blobDir:   filepath.Join(dir, "sha256"),
		execDir:   filepath.Join(dir, "sha256-exec"),
		tmpDir:    filepath.Join(dir, "tmp"),
		tmpPrefix: hex.EncodeToString(rnd[:]),
		log:       slog.Default(),
		index:     make(map[string]*entry),
		lru:       list.New(),
		pins:      make(map[string]int),
		pending:   make(map[string]int),
		packDir:   filepath.Join(dir, "packs"),
		packs:     make(map[uint64]*pack),
		opening:   true,
	}
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, fmt.Errorf("open CAS in %s: %w", dir, err)
		}
	}
	if (s.durability == GroupCommit || s.durability == WriteBack) && !syncFSSupported {
		s.durability = FsyncEach
	}
	if err := os.RemoveAll(s.tmpDir); err != nil {
		return nil, fmt.Errorf("remove leftover uploads in %s: %w", s.tmpDir, err)
	}
	// Executable copies are cheap to recreate and may be stale after a crash.
	if err := os.RemoveAll(s.execDir); err != nil {
		return nil, fmt.Errorf("remove executable copies in %s: %w", s.execDir, err)
	}
	for _, d := range []string{s.blobDir, s.tmpDir, s.execDir, s.packDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	// All shards exist from the start: no mkdir (which can fail on a full
	// disk, or race with another upload) on the write path.
	for i := 0; i < 256; i++ {
		p := filepath.Join(s.blobDir, fmt.Sprintf("%02x", i))
		if err := os.Mkdir(p, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("create %s: %w", p, err)
		}
	}
	s.anonTemp = anonSupported(s.tmpDir)
	// A checkpoint is left by a WriteBack run: after its unclean stop on
	// another boot, the blobs it placed after its last flush are hashed
	// before anything is answered, whatever this run's durability.
	cp, since, err := s.uncheckedSince()
	if err != nil {
		return nil, fmt.Errorf("open CAS in %s: %w", dir, err)
	}
	if !since.IsZero() {
		s.packCheck = &packMark{cp.PackID, cp.PackEnd}
	}
	recent, err := s.load(since)
	if err != nil {
		return nil, err
	}
	if !since.IsZero() {
		if err := s.checkUnflushed(recent, since); err != nil {
			return nil, fmt.Errorf("open CAS in %s: %w", dir, err)
		}
	}
	if s.durability == WriteBack {
		if err := s.startWriteBack(); err != nil {
			// Without its checkpoint on disk a power loss could not be
			// told from a clean stop: wait for the disk instead (a full
			// disk must not keep the server from starting and evicting).
			s.log.Warn("CAS: cannot start write-back; blobs wait for the disk (group commit) this run", "err", err)
			s.durability = GroupCommit
		}
	}
	if s.durability == GroupCommit {
		s.group = newGroupSync(s.blobDir)
	}
	if s.durability != WriteBack && cp != nil {
		// Checked or flushed above: nothing depends on it any more once
		// the check's quarantines are on disk. Left in place, it only
		// makes the next start check again.
		err := syncFS(s.blobDir)
		if err == nil {
			err = os.Remove(filepath.Join(s.dir, checkpointFile))
		}
		if err != nil {
			s.log.Warn("CAS: cannot retire the write-back checkpoint; the next start checks again", "err", err)
		}
	}
	s.packCheck = nil
	s.mu.Lock()
	s.opening = false
	s.evictLocked(0)
	for _, p := range s.packs {
		if p.end < packTarget/16 && !p.compacting {
			// A small pack of an earlier run joins this run's: packs
			// (and their open descriptors) do not pile up with restarts.
			s.queueCompactionLocked(p)
		} else {
			s.maybeCompactLocked(p)
		}
	}
	s.mu.Unlock()
	return s, nil
}

// load indexes the blobs on disk: most recently modified at the front of
// the LRU list, so the oldest are evicted first. It returns the blobs
// whose file changed at or after since (none for a zero since), with the
// size of their file.
func (s *DiskStore) load(since time.Time) ([]Digest, error) {
	start := time.Now()
	type found struct {
		hash  string
		size  int64
		mtime time.Time
		rec   *packFound // a pack record, not a file
	}
	var all []found
	var recent []Digest
	lastLog := time.Now()
	shards, err := os.ReadDir(s.blobDir)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", s.blobDir, err)
	}
	for i, shard := range shards {
		if !shard.IsDir() || len(shard.Name()) != 2 {
			continue
		}
		sdir := filepath.Join(s.blobDir, shard.Name())
		ents, err := os.ReadDir(sdir)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", sdir, err)
		}
		for _, e := range ents {
			name := e.Name()
			if _, err := NewDigest(name, 0); err != nil || name[:2] != shard.Name() || !e.Type().IsRegular() {
				s.log.Warn("removing stray file from CAS", "path", filepath.Join(sdir, name))
				os.RemoveAll(filepath.Join(sdir, name))
				continue
			}
			info, err := e.Info()
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					continue
				}
				return nil, fmt.Errorf("stat blob %s: %w", name, err)
			}
			all = append(all, found{name, info.Size(), info.ModTime(), nil})
			if !since.IsZero() && !changeTime(info).Before(since) {
				recent = append(recent, Digest{Hash: name, Size: info.Size()})
			}
		}
		if time.Since(lastLog) > 2*time.Second {
			s.log.Info("indexing CAS", "shards", fmt.Sprintf("%d/%d", i+1, len(shards)), "blobs", len(all))
			lastLog = time.Now()
		}
	}
	recs, err := s.loadPacks()
	if err != nil {
		return nil, err
	}
	for i := range recs {
		r := &recs[i]
		all = append(all, found{r.hash, r.size, r.p.mtime, r})
	}
	// Newest first. Which copy of a blob wins (a record over a file, a
	// later record over an earlier one) does not depend on this order:
	// indexRecord and the file branch below decide it.
	sort.Slice(all, func(i, j int) bool { return all[i].mtime.After(all[j].mtime) })
	for _, f := range all {
		if f.rec != nil {
			s.indexRecord(*f.rec)
			continue
		}
		if _, ok := s.index[f.hash]; ok {
			// Its pack record came first: the file is a copy made for a
			// path (or a stray), and would be a second copy to verify.
			os.Remove(s.blobPath(f.hash))
			continue
		}
		e := &entry{hash: f.hash, size: f.size, diskTime: f.mtime, file: true}
		e.elem = s.lru.PushBack(e)
		s.index[f.hash] = e
		s.size += f.size
	}
	s.log.Debug("indexed CAS", "dir", s.dir, "blobs", len(all), "bytes", s.size, "took", time.Since(start))
	return recent, nil
}

func (s *DiskStore) blobPath(hash string) string {
	return filepath.Join(s.blobDir, hash[:2], hash)
}

// Stats reports what the store holds.
type Stats struct {
	Blobs     int
	Bytes     int64
	MaxBytes  int64
	Evictions int64
	// Quarantined counts blobs found not to match their digest (on a read,
	// before use as an input, by the scrubber) and moved aside.
	Quarantined int64
	// SyncRounds counts the syncfs calls of group commit, or the flushes
	// of write-back, and SyncWaits the durability waits group commit's
	// rounds served (their ratio is the batching).
	SyncRounds, SyncWaits uint64
	// Packs counts the pack files of small blobs, PackDeadBytes their
	// records nothing refers to any more (reclaimed by compaction).
	Packs         int
	PackDeadBytes int64
}

// Stats returns current counts.
func (s *DiskStore) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Stats{Blobs: len(s.index), Bytes: s.size, MaxBytes: s.maxSize, Evictions: s.evictions, Quarantined: s.quarantined, Packs: len(s.packs), PackDeadBytes: s.packDead}
	if s.group != nil {
		st.SyncRounds, st.SyncWaits = s.group.stats()
	}
	if s.wb != nil {
		st.SyncRounds = s.wb.rounds.Load()
	}
	return st
}

// Dir is the directory the store lives in.
func (s *DiskStore) Dir() string { return s.dir }

// TempDir is a directory on the store's file system for files that will be
// moved in with PutFile.
func (s *DiskStore) TempDir() string { return s.tmpDir }

// Get implements Store. The reader hashes what it reads: a file that does
// not match d is quarantined and the read fails with ErrCorrupt (see
// verifyingReader).
func (s *DiskStore) Get(_ context.Context, d Digest, offset int64) (io.ReadCloser, error) {
	if err := ValidateRead(d, offset); err != nil {
		return nil, err
	}
	if d.IsEmpty() {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	if !s.has(d) {
		return nil, fmt.Errorf("blob %s: %w", d, ErrNotFound)
	}
	if data, packed, err := s.readPacked(d); packed {
		if err != nil {
			return nil, err
		}
		return io.NopCloser(bytes.NewReader(data[offset:])), nil
	}
	f, err := os.Open(s.blobPath(d.Hash))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			// Evicted since the index said present, or removed by hand.
			s.forget(d.Hash)
			return nil, fmt.Errorf("blob %s: %w", d, ErrNotFound)
		}
		return nil, fmt.Errorf("open blob %s: %w", d, err)
	}
	if fi, err := f.Stat(); err == nil && fi.Size() != d.Size {
		err := s.corruptErr(d, f, fmt.Sprintf("the file has %d bytes", fi.Size()))
		f.Close()
		return nil, err
	}
	if s.unverifiedReads.Load() {
		if _, err := f.Seek(offset, io.SeekStart); err != nil {
			f.Close()
			return nil, fmt.Errorf("seek blob %s: %w", d, err)
		}
		return f, nil
	}
	r, err := s.newVerifyingReader(d, f, offset)
	if err != nil {
		f.Close()
		return nil, err
	}
	return r, nil
}

// Put implements Store.
func (s *DiskStore) Put(ctx context.Context, d Digest, r io.Reader) error {
	if err := d.Validate(); err != nil {
		return err
	}
	if d.Size == 0 {
		// Only the empty blob has size 0; still verify the caller sent nothing.
		n, err := io.Copy(io.Discard, r)
		if err != nil {
			return err
		}
		if n != 0 || !d.IsEmpty() {
			return fmt.Errorf("blob %s: got %d bytes hashing to something else: %w", d, n, ErrDigestMismatch)
		}
		return nil
	}
	w, err := s.NewWriter(d)
	if err != nil {
		return err
	}
	defer w.Abort()
	if _, err := io.Copy(w, r); err != nil {
		return err
	}
	return w.Commit()
}

// spaceErr marks out-of-space errors with ErrNoSpace.
func (s *DiskStore) spaceErr(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: %w", ErrNoSpace, err)
	}
	return err
}
