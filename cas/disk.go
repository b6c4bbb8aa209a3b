package cas

import (
	"bytes"
	"container/list"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
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
	fsync     bool
	log       *slog.Logger

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
}

// Option configures a DiskStore.
type Option func(*DiskStore)

// WithMaxSize bounds the bytes stored; least recently used blobs that are not
// pinned are evicted to stay under it. Zero means unbounded.
func WithMaxSize(n int64) Option { return func(s *DiskStore) { s.maxSize = n } }

// WithLogger sets the logger for start-up and eviction messages.
func WithLogger(l *slog.Logger) Option { return func(s *DiskStore) { s.log = l } }

// WithFsync controls whether each blob is fsynced before it is renamed into
// place (default true). Without it a kill -9 is still safe, a power loss
// may not be.
func WithFsync(on bool) Option { return func(s *DiskStore) { s.fsync = on } }

// touchInterval bounds how often a blob's mtime is refreshed on access: LRU
// order within a run lives in memory, mtime only orders blobs after a restart.
const touchInterval = time.Hour

// writeBehindChunk is how much an upload writes before the kernel is asked
// to start writing it back, so that the fsync at the end waits only for the
// tail instead of the whole blob.
const writeBehindChunk = 8 << 20

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
		fsync:     true,
		log:       slog.Default(),
		index:     make(map[string]*entry),
		lru:       list.New(),
		pins:      make(map[string]int),
		pending:   make(map[string]int),
	}
	for _, o := range opts {
		o(s)
	}
	if err := os.RemoveAll(s.tmpDir); err != nil {
		return nil, fmt.Errorf("remove leftover uploads in %s: %w", s.tmpDir, err)
	}
	// Executable copies are cheap to recreate and may be stale after a crash.
	if err := os.RemoveAll(s.execDir); err != nil {
		return nil, fmt.Errorf("remove executable copies in %s: %w", s.execDir, err)
	}
	for _, d := range []string{s.blobDir, s.tmpDir, s.execDir} {
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
	if err := s.load(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.evictLocked(0)
	s.mu.Unlock()
	return s, nil
}

// load indexes the blobs on disk: most recently modified at the front of
// the LRU list, so the oldest are evicted first.
func (s *DiskStore) load() error {
	start := time.Now()
	type found struct {
		hash  string
		size  int64
		mtime time.Time
	}
	var all []found
	lastLog := time.Now()
	shards, err := os.ReadDir(s.blobDir)
	if err != nil {
		return fmt.Errorf("read %s: %w", s.blobDir, err)
	}
	for i, shard := range shards {
		if !shard.IsDir() || len(shard.Name()) != 2 {
			continue
		}
		sdir := filepath.Join(s.blobDir, shard.Name())
		ents, err := os.ReadDir(sdir)
		if err != nil {
			return fmt.Errorf("read %s: %w", sdir, err)
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
				return fmt.Errorf("stat blob %s: %w", name, err)
			}
			all = append(all, found{name, info.Size(), info.ModTime()})
		}
		if time.Since(lastLog) > 2*time.Second {
			s.log.Info("indexing CAS", "shards", fmt.Sprintf("%d/%d", i+1, len(shards)), "blobs", len(all))
			lastLog = time.Now()
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].mtime.After(all[j].mtime) })
	for _, f := range all {
		e := &entry{hash: f.hash, size: f.size, diskTime: f.mtime}
		e.elem = s.lru.PushBack(e)
		s.index[f.hash] = e
		s.size += f.size
	}
	s.log.Debug("indexed CAS", "dir", s.dir, "blobs", len(all), "bytes", s.size, "took", time.Since(start))
	return nil
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
}

// Stats returns current counts.
func (s *DiskStore) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Stats{Blobs: len(s.index), Bytes: s.size, MaxBytes: s.maxSize, Evictions: s.evictions, Quarantined: s.quarantined}
}

// Dir is the directory the store lives in.
func (s *DiskStore) Dir() string { return s.dir }

// TempDir is a directory on the store's file system for files that will be
// moved in with PutFile.
func (s *DiskStore) TempDir() string { return s.tmpDir }

// FindMissing implements Store. Present blobs count as used.
func (s *DiskStore) FindMissing(ctx context.Context, ds []Digest) ([]Digest, error) {
	var missing []Digest
	var touch []string
	now := time.Now()
	// The index lock is taken per chunk, not for the whole request, so a
	// client asking about millions of digests does not stall every other
	// client's lookups and writes; a cancelled request stops between chunks.
	for len(ds) > 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		chunk := ds[:min(len(ds), findMissingChunk)]
		ds = ds[len(chunk):]
		s.mu.Lock()
		for _, d := range chunk {
			if d.Size == 0 && d.Hash == EmptyDigest.Hash {
				continue
			}
			e, ok := s.index[d.Hash]
			if !ok || e.size != d.Size {
				missing = append(missing, d)
				continue
			}
			touch = s.useLocked(e, now, touch)
		}
		s.mu.Unlock()
	}
	s.touchFiles(touch, now)
	return missing, nil
}

// findMissingChunk is how many digests FindMissing checks per hold of the
// index lock (about a millisecond's work).
const findMissingChunk = 4096

// useLocked marks e most recently used and collects it for an mtime
// refresh when its mtime is stale.
func (s *DiskStore) useLocked(e *entry, now time.Time, touch []string) []string {
	s.lru.MoveToFront(e.elem)
	if now.Sub(e.diskTime) > touchInterval {
		e.diskTime = now
		touch = append(touch, e.hash)
	}
	return touch
}

// touchFiles refreshes mtimes, the LRU order a restart sees. A few are
// done at once; many (the first lookups after a restart) in the
// background, so FindMissing never waits for thousands of syscalls.
func (s *DiskStore) touchFiles(hashes []string, now time.Time) {
	touch := func() {
		for _, h := range hashes {
			// Best effort: a concurrently evicted blob is fine to miss.
			_ = os.Chtimes(s.blobPath(h), now, now)
		}
	}
	switch {
	case len(hashes) == 0:
	case len(hashes) <= 16:
		touch()
	default:
		go touch()
	}
}

// has reports whether the blob is indexed, marking it used.
func (s *DiskStore) has(d Digest) bool {
	s.mu.Lock()
	e, ok := s.index[d.Hash]
	ok = ok && e.size == d.Size
	var touch []string
	now := time.Now()
	if ok {
		touch = s.useLocked(e, now, nil)
	}
	s.mu.Unlock()
	s.touchFiles(touch, now)
	return ok
}

// Get implements Store. The reader hashes what it reads: a file that does
// not match d is quarantined and the read fails with ErrCorrupt (see
// verifyingReader).
func (s *DiskStore) Get(_ context.Context, d Digest, offset int64) (io.ReadCloser, error) {
	if err := d.Validate(); err != nil {
		return nil, err
	}
	if offset < 0 || offset > d.Size {
		return nil, fmt.Errorf("read %s at offset %d: offset out of range", d, offset)
	}
	if d.IsEmpty() {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	if !s.has(d) {
		return nil, fmt.Errorf("blob %s: %w", d, ErrNotFound)
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

// forget drops a blob whose file has gone from the index.
func (s *DiskStore) forget(hash string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.index[hash]; ok {
		if _, err := os.Lstat(s.blobPath(hash)); err == nil {
			return // re-added since
		}
		s.lru.Remove(e.elem)
		delete(s.index, hash)
		s.size -= e.size
	}
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

// createTemp creates a new file in tmp/ with a unique name; the name
// starts with the blob's hash prefix so leftovers are recognisable.
func (s *DiskStore) createTemp(what string) (*os.File, error) {
	name := filepath.Join(s.tmpDir, what+"-"+s.tmpPrefix+"-"+strconv.FormatUint(s.tmpSeq.Add(1), 10))
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, s.spaceErr(fmt.Errorf("create upload file: %w", err))
	}
	return f, nil
}

// Writer streams one blob into the store. Bytes are hashed as they are
// written; Commit verifies and makes the blob visible. Writers are how
// resumable ByteStream uploads keep their state between streams.
//
// For large blobs, writing to the file runs in a goroutine of its own, fed
// 1 MiB buffers, so that hashing (the caller's goroutine) and the copy into
// the page cache overlap instead of adding up.
type Writer struct {
	s       *DiskStore
	d       Digest
	f       *os.File // nil while idle (see Idle)
	name    string   // of the temp file
	h       hash.Hash
	written int64 // bytes accepted (hashed)
	fileOff int64 // bytes written to f; owned by whoever writes f
	synced  int64 // bytes of f handed to write-behind
	counted int64 // bytes of the temp file counted in s.uploading
	done    bool

	buf   []byte        // pipelined: the buffer being filled
	queue chan []byte   // pipelined: full buffers for the file writer
	ended chan struct{} // pipelined: closed when the file writer exits
	werr  atomic.Pointer[error]
}

// pipelineMin is the blob size from which writes are pipelined.
const pipelineMin = 2 << 20

var chunkPool = sync.Pool{New: func() any { b := make([]byte, 0, 1<<20); return &b }}

// NewWriter starts an upload of d.
func (s *DiskStore) NewWriter(d Digest) (*Writer, error) {
	if err := d.Validate(); err != nil {
		return nil, err
	}
	if s.maxSize > 0 && d.Size > s.maxSize {
		return nil, fmt.Errorf("blob %s is larger than the store's size limit of %d bytes: %w", d, s.maxSize, ErrNoSpace)
	}
	f, err := s.createTemp(d.Hash[:16])
	if err != nil {
		return nil, fmt.Errorf("upload of %s: %w", d, err)
	}
	return &Writer{s: s, d: d, f: f, name: f.Name(), h: sha256.New()}, nil
}

// Idle releases what an upload holds between streams of a resumable
// upload: its buffers and file writer goroutine (written out first) and its
// file descriptor. The next Write or Commit reopens the file. An idle
// upload costs its hash state and its bytes on disk.
func (w *Writer) Idle() error {
	if w.done {
		return nil
	}
	err := w.drain()
	if w.buf != nil {
		b := w.buf[:0]
		chunkPool.Put(&b)
		w.buf = nil
	}
	if w.f != nil {
		if cerr := w.f.Close(); err == nil {
			err = cerr
		}
		w.f = nil
	}
	return err
}

// reopen opens the temp file of an idle upload again.
func (w *Writer) reopen() error {
	if w.f != nil {
		return nil
	}
	f, err := os.OpenFile(w.name, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("reopen upload of %s: %w", w.d, err)
	}
	if _, err := f.Seek(w.fileOff, io.SeekStart); err != nil {
		f.Close()
		return fmt.Errorf("reopen upload of %s: %w", w.d, err)
	}
	w.f = f
	return nil
}

// count adds n bytes written to the temp file to the store's total, which
// the size limit covers: an unfinished upload takes disk space like a blob.
func (w *Writer) count(n int64) error {
	s := w.s
	if s.maxSize <= 0 || n == 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.uploading += n
	w.counted += n
	if !s.evictLocked(0) {
		return fmt.Errorf("upload of %s: the size limit of %d bytes (--max-size) is taken by pinned blobs and uploads in progress: %w", w.d, s.maxSize, ErrNoSpace)
	}
	return nil
}

// uncount removes the Writer's bytes from the store's total.
func (w *Writer) uncount() {
	if w.counted == 0 {
		return
	}
	w.s.mu.Lock()
	w.s.uploading -= w.counted
	w.s.mu.Unlock()
	w.counted = 0
}

// Written is how many bytes have been accepted so far.
func (w *Writer) Written() int64 { return w.written }

// Write implements io.Writer; it refuses data past the declared size.
func (w *Writer) Write(p []byte) (int, error) {
	if w.done {
		return 0, fmt.Errorf("blob %s: write after the upload ended", w.d)
	}
	if w.written+int64(len(p)) > w.d.Size {
		return 0, fmt.Errorf("blob %s: more than %d bytes written: %w", w.d, w.d.Size, ErrDigestMismatch)
	}
	if err := w.reopen(); err != nil {
		return 0, err
	}
	if w.d.Size < pipelineMin {
		n, err := w.writeFile(p)
		w.h.Write(p[:n])
		w.written += int64(n)
		return n, err
	}
	if errp := w.werr.Load(); errp != nil {
		return 0, *errp
	}
	w.h.Write(p)
	w.written += int64(len(p))
	for rest := p; len(rest) > 0; {
		if w.buf == nil {
			w.buf = (*chunkPool.Get().(*[]byte))[:0]
		}
		n := min(len(rest), cap(w.buf)-len(w.buf))
		w.buf = append(w.buf, rest[:n]...)
		rest = rest[n:]
		if len(w.buf) == cap(w.buf) {
			w.flush()
		}
	}
	return len(p), nil
}

// flush hands the filled buffer to the file writer, starting it if needed.
func (w *Writer) flush() {
	if len(w.buf) == 0 {
		return
	}
	if w.queue == nil {
		w.queue = make(chan []byte, 2)
		w.ended = make(chan struct{})
		go w.fileWriter()
	}
	w.queue <- w.buf
	w.buf = nil
}

// fileWriter writes queued buffers to the file until the queue closes;
// after an error it only drains the queue.
func (w *Writer) fileWriter() {
	defer close(w.ended)
	for b := range w.queue {
		if w.werr.Load() == nil {
			if _, err := w.writeFile(b); err != nil {
				w.werr.Store(&err)
			}
		}
		b = b[:0]
		chunkPool.Put(&b)
	}
}

// writeFile writes p to the temp file, starting writeback of every
// writeBehindChunk bytes when blobs are fsynced.
func (w *Writer) writeFile(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.fileOff += int64(n)
	if cerr := w.count(int64(n)); err == nil && cerr != nil {
		return n, cerr
	}
	if err != nil {
		return n, w.s.spaceErr(fmt.Errorf("write upload of %s: %w", w.d, err))
	}
	if w.s.fsync && w.fileOff-w.synced >= writeBehindChunk {
		writeBehind(w.f, w.synced, w.fileOff-w.synced)
		w.synced = w.fileOff
	}
	return n, nil
}

// drain writes out what is buffered and waits for the file writer.
func (w *Writer) drain() error {
	if w.queue == nil {
		if len(w.buf) > 0 {
			_, err := w.writeFile(w.buf)
			w.buf = w.buf[:0]
			return err
		}
		return nil
	}
	w.flush()
	close(w.queue)
	<-w.ended
	w.queue = nil
	if errp := w.werr.Load(); errp != nil {
		return *errp
	}
	return nil
}

// Commit verifies the data and moves it into place. The Writer is finished
// whatever the outcome.
func (w *Writer) Commit() error {
	if w.done {
		return fmt.Errorf("blob %s: commit after the upload ended", w.d)
	}
	defer w.Abort()
	if w.written != w.d.Size {
		return fmt.Errorf("blob %s: got %d bytes, want %d: %w", w.d, w.written, w.d.Size, ErrDigestMismatch)
	}
	if got := hex.EncodeToString(w.h.Sum(nil)); got != w.d.Hash {
		return fmt.Errorf("blob %s: data hashes to %s: %w", w.d, got, ErrDigestMismatch)
	}
	if err := w.reopen(); err != nil {
		return err
	}
	if err := w.drain(); err != nil {
		return err
	}
	// link reserves the blob's size itself.
	w.uncount()
	return w.s.commitFile(w.f, w.d)
}

// Abort discards an unfinished upload; it is safe to call after Commit.
func (w *Writer) Abort() {
	if w.done {
		return
	}
	w.done = true
	if w.queue != nil {
		close(w.queue)
		<-w.ended
		w.queue = nil
	}
	if w.buf != nil {
		b := w.buf[:0]
		chunkPool.Put(&b)
		w.buf = nil
	}
	if w.f != nil {
		w.f.Close()
	}
	os.Remove(w.name)
	w.uncount()
}

// commitFile makes the verified temp file f the blob d and closes f.
func (s *DiskStore) commitFile(f *os.File, d Digest) error {
	if err := f.Chmod(0o444); err != nil {
		return s.spaceErr(fmt.Errorf("chmod upload of %s: %w", d, err))
	}
	if s.fsync {
		if err := f.Sync(); err != nil {
			return s.spaceErr(fmt.Errorf("sync upload of %s: %w", d, err))
		}
	}
	if err := f.Close(); err != nil {
		return s.spaceErr(fmt.Errorf("close upload of %s: %w", d, err))
	}
	return s.link(f.Name(), d, true)
}

// link moves the verified, read-only (and, with fsync, synced) file tmp
// into place as blob d and indexes it. If d is already stored, tmp is
// removed instead. Room is made before the rename, so a blob that cannot
// be kept (everything else pinned) is never renamed into place. The rename
// itself runs without holding mu, so lookups never wait for the disk.
//
// With syncDir (and fsync on) the shard directory is synced after the
// rename: a synced file under a name that was never synced can vanish in a
// power loss (or a VM kill) before the file system commits its journal.
func (s *DiskStore) link(tmp string, d Digest, syncDir bool) error {
	// Drop tmp only for a stored copy that is known good: one indexed by
	// hash alone may be truncated or rotten, and tmp is verified, so it
	// replaces that copy (a rename over it, no costlier than the remove).
	if s.intact(d) {
		os.Remove(tmp)
		return nil
	}
	s.mu.Lock()
	// The pending mark keeps an indexed copy this replaces from eviction.
	s.pending[d.Hash]++
	grow := d.Size
	if e, ok := s.index[d.Hash]; ok {
		grow = max(d.Size-e.size, 0)
	}
	if s.maxSize > 0 {
		fail := ""
		if d.Size > s.maxSize {
			fail = fmt.Sprintf("blob %s is larger than the store's size limit of %d bytes", d, s.maxSize)
		} else if !s.evictLocked(grow) {
			fail = fmt.Sprintf("store %d bytes for blob %s: the size limit of %d bytes is taken by blobs of actions in flight", d.Size, d, s.maxSize)
		}
		if fail != "" {
			if s.pending[d.Hash]--; s.pending[d.Hash] <= 0 {
				delete(s.pending, d.Hash)
			}
			s.mu.Unlock()
			return fmt.Errorf("%s: %w", fail, ErrNoSpace)
		}
	}
	s.reserved += grow
	s.mu.Unlock()

	err := os.Rename(tmp, s.blobPath(d.Hash))
	if err == nil && syncDir && s.fsync {
		err = fsyncDir(filepath.Dir(s.blobPath(d.Hash)))
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	s.reserved -= grow
	if s.pending[d.Hash]--; s.pending[d.Hash] <= 0 {
		delete(s.pending, d.Hash)
	}
	if err != nil {
		return s.spaceErr(fmt.Errorf("move blob %s into place: %w", d, err))
	}
	if e, ok := s.index[d.Hash]; ok { // replaced, or another upload of d got there first
		s.size += d.Size - e.size
		e.size, e.verified, e.diskTime = d.Size, true, time.Now()
		s.lru.MoveToFront(e.elem)
		return nil
	}
	e := &entry{hash: d.Hash, size: d.Size, diskTime: time.Now(), verified: true}
	e.elem = s.lru.PushFront(e)
	s.index[d.Hash] = e
	s.size += d.Size
	return nil
}

// evictLocked removes least recently used blobs that are neither pinned
// nor being written until need more bytes fit under the limit, and reports
// whether they do.
func (s *DiskStore) evictLocked(need int64) bool {
	if s.maxSize <= 0 {
		return true
	}
	for el := s.lru.Back(); el != nil && s.size+s.reserved+s.uploading+need > s.maxSize; {
		e := el.Value.(*entry)
		prev := el.Prev()
		if s.pins[e.hash] == 0 && s.pending[e.hash] == 0 {
			s.lru.Remove(el)
			delete(s.index, e.hash)
			s.size -= e.size
			s.evictions++
			os.Remove(s.blobPath(e.hash))
			os.Remove(filepath.Join(s.execDir, e.hash))
		}
		el = prev
	}
	return s.size+s.reserved+s.uploading+need <= s.maxSize
}

// Evict shrinks the store to at most max bytes now (max <= 0 uses the
// configured limit), returning how many blobs were removed.
func (s *DiskStore) Evict(max int64) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	before := s.evictions
	saved := s.maxSize
	if max > 0 {
		s.maxSize = max
	}
	s.evictLocked(0)
	s.maxSize = saved
	return s.evictions - before
}

// Pin implements Pinner. Pinning a digest that is not stored yet protects
// it from the moment it is.
func (s *DiskStore) Pin(ds []Digest) func() {
	s.mu.Lock()
	for _, d := range ds {
		s.pins[d.Hash]++
	}
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			for _, d := range ds {
				if s.pins[d.Hash]--; s.pins[d.Hash] <= 0 {
					delete(s.pins, d.Hash)
				}
			}
			s.evictLocked(0)
			s.mu.Unlock()
		})
	}
}

// PutFile implements Store. The file is made root-owned (when running as
// root) and read-only, hashed, and renamed into the CAS; if the blob is
// already present the file is removed instead. Symbolic links and other
// non-regular files are refused. A file with other hard links, or on
// another file system, is copied, so its other names never become (or
// change the mode of) a shared blob.
func (s *DiskStore) PutFile(ctx context.Context, path string) (Digest, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return Digest{}, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return Digest{}, fmt.Errorf("stat %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return Digest{}, fmt.Errorf("%s is not a regular file (%s)", path, fi.Mode().Type())
	}
	// Before reading a byte: a sparse file can claim any size for free
	// (truncate -s), and hashing it costs its full logical size.
	if s.maxSize > 0 && fi.Size() > s.maxSize {
		return Digest{}, fmt.Errorf("%s is %d bytes, larger than the store's size limit of %d bytes (--max-size): %w", path, fi.Size(), s.maxSize, ErrNoSpace)
	}
	if linkCount(fi) > 1 {
		return s.putCopy(ctx, f, path)
	}
	// The file may have been written by a sandboxed user: take ownership
	// before hashing, so that the hash is of content that user can no
	// longer change. (The sandbox guarantees none of its processes still
	// hold the file open.)
	if os.Geteuid() == 0 && fileUID(fi) != 0 {
		if err := f.Chown(0, 0); err != nil {
			return Digest{}, fmt.Errorf("chown %s: %w", path, err)
		}
	}
	if err := f.Chmod(0o444); err != nil {
		return Digest{}, fmt.Errorf("chmod %s: %w", path, err)
	}
	d, err := hashFile(ctx, f)
	if err != nil {
		return Digest{}, fmt.Errorf("hash %s: %w", path, err)
	}
	if d.IsEmpty() || s.intact(d) {
		os.Remove(path)
		return d, nil
	}
	if s.maxSize > 0 && d.Size > s.maxSize {
		return Digest{}, fmt.Errorf("blob %s (%s) is larger than the store's size limit of %d bytes: %w", d, path, s.maxSize, ErrNoSpace)
	}
	if s.fsync {
		if err := f.Sync(); err != nil {
			return Digest{}, s.spaceErr(fmt.Errorf("sync %s: %w", path, err))
		}
	}
	// The name must still be the file that was hashed.
	if li, err := os.Lstat(path); err != nil || !os.SameFile(li, fi) {
		return Digest{}, fmt.Errorf("%s was replaced while being stored", path)
	}
	err = s.link(path, d, true)
	if errors.Is(err, syscall.EXDEV) {
		return s.putCopy(ctx, f, path)
	}
	if err != nil {
		return Digest{}, err
	}
	return d, nil
}

// putCopy stores the content of f as a new blob and removes path.
func (s *DiskStore) putCopy(ctx context.Context, f *os.File, path string) (Digest, error) {
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return Digest{}, err
	}
	d, err := hashFile(ctx, f)
	if err != nil {
		return Digest{}, fmt.Errorf("hash %s: %w", path, err)
	}
	if !d.IsEmpty() && !s.intact(d) {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return Digest{}, err
		}
		// Put verifies the copy against d, so a file that changes now is
		// refused rather than stored wrongly.
		if err := s.Put(ctx, d, ctxReader{ctx, f}); err != nil {
			return Digest{}, fmt.Errorf("copy %s into the CAS: %w", path, err)
		}
	}
	os.Remove(path)
	return d, nil
}

// hashFile hashes f from its current offset with a large buffer; it stops
// when ctx ends (a large output must not outlive its action's caller).
func hashFile(ctx context.Context, f *os.File) (Digest, error) {
	h := sha256.New()
	// No 1 MiB buffer for a small file: allocating one costs ~0.3 ms (page
	// faults), twice per action for stdout and stderr alone.
	size := int64(copyBufSize)
	if fi, err := f.Stat(); err == nil {
		size = min(size, max(fi.Size()+1, 512))
	}
	buf := make([]byte, size)
	// Hide f's WriteTo, which would use a small buffer.
	n, err := io.CopyBuffer(h, ctxReader{ctx, f}, buf)
	if err != nil {
		return Digest{}, err
	}
	return Digest{Hash: hex.EncodeToString(h.Sum(nil)), Size: n}, nil
}

// ctxReader reads r until ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

// PutBatch implements BatchPutter: every blob is verified and written to
// a temp file, one durability barrier covers them all (syncfs(2) where
// available), then they are renamed into place. A kill at any point
// leaves only temp files, which the next start removes. File creation and
// renames, which cost more in the kernel than anything else here, run on
// a few goroutines.
func (s *DiskStore) PutBatch(ctx context.Context, blobs []Blob) []error {
	errs := make([]error, len(blobs))
	// Which blobs to write: valid, new, each digest once.
	var todo []int
	seen := make(map[string]int, len(blobs))
	for i, b := range blobs {
		d := b.Digest
		if err := d.Validate(); err != nil {
			errs[i] = err
			continue
		}
		if int64(len(b.Data)) != d.Size {
			errs[i] = fmt.Errorf("blob %s: got %d bytes: %w", d, len(b.Data), ErrDigestMismatch)
			continue
		}
		if j, dup := seen[d.Hash]; dup && blobs[j].Digest == d {
			continue
		}
		if d.IsEmpty() || s.intact(d) {
			// Still check the data: the caller must learn it was wrong.
			if got := DigestOf(b.Data); got != d {
				errs[i] = fmt.Errorf("blob %s: data hashes to %s: %w", d, got.Hash, ErrDigestMismatch)
			}
			continue
		}
		if s.maxSize > 0 && d.Size > s.maxSize {
			errs[i] = fmt.Errorf("blob %s is larger than the store's size limit of %d bytes: %w", d, s.maxSize, ErrNoSpace)
			continue
		}
		seen[d.Hash] = i
		todo = append(todo, i)
	}
	// One syncfs for many files; a few are cheaper to fsync one by one.
	barrier := s.fsync && len(todo) > 8 && syncFSSupported
	tmps := make([]string, len(blobs))
	parallel(len(todo), func(k int) {
		i := todo[k]
		b := blobs[i]
		if got := DigestOf(b.Data); got != b.Digest {
			errs[i] = fmt.Errorf("blob %s: data hashes to %s: %w", b.Digest, got.Hash, ErrDigestMismatch)
			return
		}
		tmps[i], errs[i] = s.writeTemp(b.Digest, b.Data, s.fsync && !barrier)
	})
	if barrier {
		if err := syncFS(s.tmpDir); err != nil {
			err = s.spaceErr(fmt.Errorf("sync batch: %w", err))
			for _, i := range todo {
				if tmps[i] != "" {
					os.Remove(tmps[i])
					errs[i] = err
				}
			}
			return errs
		}
	}
	parallel(len(todo), func(k int) {
		i := todo[k]
		if tmps[i] == "" {
			return
		}
		if err := s.link(tmps[i], blobs[i].Digest, !barrier); err != nil {
			os.Remove(tmps[i])
			errs[i] = err
		}
	})
	if barrier {
		// One more barrier makes the new names durable too.
		if err := syncFS(s.blobDir); err != nil {
			err = s.spaceErr(fmt.Errorf("sync batch names: %w", err))
			for _, i := range todo {
				if errs[i] == nil {
					errs[i] = err
				}
			}
		}
	}
	// Duplicates within the batch share the first copy's outcome.
	for i, b := range blobs {
		if j, ok := seen[b.Digest.Hash]; ok && j != i && errs[i] == nil && blobs[j].Digest == b.Digest {
			if got := DigestOf(b.Data); got != b.Digest {
				errs[i] = fmt.Errorf("blob %s: data hashes to %s: %w", b.Digest, got.Hash, ErrDigestMismatch)
			} else if errors.Is(errs[j], ErrDigestMismatch) {
				errs[i] = s.Put(ctx, b.Digest, bytes.NewReader(b.Data)) // the first copy was the wrong one
			} else {
				errs[i] = errs[j]
			}
		}
	}
	return errs
}

// batchWorkers is how many goroutines PutBatch uses for file operations.
const batchWorkers = 4

// parallel runs fn(0..n-1) on up to batchWorkers goroutines.
func parallel(n int, fn func(int)) {
	workers := min(batchWorkers, (n+15)/16)
	if workers <= 1 {
		for i := 0; i < n; i++ {
			fn(i)
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				fn(i)
			}
		}()
	}
	wg.Wait()
}

// writeTemp writes data to a new read-only temp file, optionally fsynced,
// and returns its name.
func (s *DiskStore) writeTemp(d Digest, data []byte, sync bool) (string, error) {
	f, err := s.createTemp(d.Hash[:16])
	if err != nil {
		return "", fmt.Errorf("blob %s: %w", d, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(0o444)
	}
	if err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", s.spaceErr(fmt.Errorf("write blob %s: %w", d, err))
	}
	return f.Name(), nil
}

// BlobPath implements LocalStore. The returned file may be evicted unless
// the caller has pinned d.
func (s *DiskStore) BlobPath(d Digest, executable bool) (string, error) {
	if err := d.Validate(); err != nil {
		return "", err
	}
	if d.IsEmpty() {
		return s.emptyBlob(executable)
	}
	if !s.has(d) {
		return "", fmt.Errorf("blob %s: %w", d, ErrNotFound)
	}
	p := s.blobPath(d.Hash)
	if !executable {
		return p, nil
	}
	ep := filepath.Join(s.execDir, d.Hash)
	if _, err := os.Stat(ep); err == nil {
		return ep, nil
	}
	src, err := os.Open(p)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("blob %s: %w", d, ErrNotFound)
		}
		return "", fmt.Errorf("open blob %s: %w", d, err)
	}
	defer src.Close()
	tmp, err := s.createTemp("exec")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.CopyBuffer(tmp, struct{ io.Reader }{src}, make([]byte, copyBufSize)); err != nil {
		tmp.Close()
		return "", s.spaceErr(fmt.Errorf("copy executable %s: %w", d, err))
	}
	if err := tmp.Chmod(0o555); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", s.spaceErr(err)
	}
	if err := os.Rename(tmp.Name(), ep); err != nil {
		return "", s.spaceErr(fmt.Errorf("move executable copy of %s: %w", d, err))
	}
	return ep, nil
}

func (s *DiskStore) emptyBlob(executable bool) (string, error) {
	name, mode := "empty", os.FileMode(0o444)
	if executable {
		name, mode = "empty-exec", 0o555
	}
	p := filepath.Join(s.execDir, name)
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	f, err := s.createTemp(name)
	if err != nil {
		return "", err
	}
	err = f.Chmod(mode)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		os.Remove(f.Name())
		return "", s.spaceErr(fmt.Errorf("create empty blob file: %w", err))
	}
	return p, nil
}

// spaceErr marks out-of-space errors with ErrNoSpace.
func (s *DiskStore) spaceErr(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: %w", ErrNoSpace, err)
	}
	return err
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
