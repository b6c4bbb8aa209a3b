package cas

import (
	"bytes"
	"container/list"
	"context"
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
	"sync"
	"syscall"
	"time"
)

// DiskStore keeps blobs as read-only files under dir/sha256/<2 hex>/<hash>.
// Uploads go to dir/tmp (the same file system), are verified while they are
// written, synced and renamed into place, so a crash never leaves a wrong
// blob under a name. An in-memory index answers FindMissing without stat
// calls and orders blobs for LRU eviction under a size limit.
type DiskStore struct {
	dir     string
	blobDir string
	execDir string
	tmpDir  string
	maxSize int64
	fsync   bool
	log     *slog.Logger

	mu        sync.Mutex
	index     map[string]*entry
	lru       *list.List // of *entry, most recently used at the front
	size      int64      // bytes of all indexed blobs
	pins      map[string]int
	evictions int64
}

type entry struct {
	hash     string
	size     int64
	elem     *list.Element
	diskTime time.Time // mtime on disk, refreshed lazily for LRU order across restarts
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

// NewDiskStore opens (creating if needed) a store in dir. Leftover uploads
// from a previous run are removed and the index is rebuilt from the files.
func NewDiskStore(dir string, opts ...Option) (*DiskStore, error) {
	s := &DiskStore{
		dir:     dir,
		blobDir: filepath.Join(dir, "sha256"),
		execDir: filepath.Join(dir, "sha256-exec"),
		tmpDir:  filepath.Join(dir, "tmp"),
		fsync:   true,
		log:     slog.Default(),
		index:   make(map[string]*entry),
		lru:     list.New(),
		pins:    make(map[string]int),
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
	if err := s.load(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.evictLocked()
	s.mu.Unlock()
	return s, nil
}

// load indexes the blobs on disk, oldest first in LRU order.
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
			if _, err := NewDigest(name, 0); err != nil || name[:2] != shard.Name() {
				s.log.Warn("removing stray file from CAS", "path", filepath.Join(sdir, name))
				os.Remove(filepath.Join(sdir, name))
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
}

// Stats returns current counts.
func (s *DiskStore) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Stats{Blobs: len(s.index), Bytes: s.size, MaxBytes: s.maxSize, Evictions: s.evictions}
}

// Dir is the directory the store lives in.
func (s *DiskStore) Dir() string { return s.dir }

// TempDir is a directory on the store's file system for files that will be
// moved in with PutFile.
func (s *DiskStore) TempDir() string { return s.tmpDir }

// FindMissing implements Store. Present blobs count as used.
func (s *DiskStore) FindMissing(_ context.Context, ds []Digest) ([]Digest, error) {
	var missing []Digest
	var touch []*entry
	s.mu.Lock()
	now := time.Now()
	for _, d := range ds {
		if d.Size == 0 && d.Hash == EmptyDigest.Hash {
			continue
		}
		e, ok := s.index[d.Hash]
		if !ok || e.size != d.Size {
			missing = append(missing, d)
			continue
		}
		s.lru.MoveToFront(e.elem)
		if now.Sub(e.diskTime) > touchInterval {
			e.diskTime = now
			touch = append(touch, e)
		}
	}
	s.mu.Unlock()
	s.touchFiles(touch, now)
	return missing, nil
}

func (s *DiskStore) touchFiles(es []*entry, now time.Time) {
	for _, e := range es {
		// Best effort: a concurrently evicted blob is fine to miss.
		_ = os.Chtimes(s.blobPath(e.hash), now, now)
	}
}

// has reports whether the blob is indexed, marking it used.
func (s *DiskStore) has(d Digest) bool {
	s.mu.Lock()
	e, ok := s.index[d.Hash]
	var touch []*entry
	now := time.Now()
	if ok {
		s.lru.MoveToFront(e.elem)
		if now.Sub(e.diskTime) > touchInterval {
			e.diskTime = now
			touch = append(touch, e)
		}
	}
	s.mu.Unlock()
	s.touchFiles(touch, now)
	return ok && e.size == d.Size
}

// Get implements Store.
func (s *DiskStore) Get(_ context.Context, d Digest, offset int64) (io.ReadCloser, error) {
	if offset < 0 || offset > d.Size {
		return nil, fmt.Errorf("read %s at offset %d: offset out of range", d, offset)
	}
	if d.Size == 0 && d.Hash == EmptyDigest.Hash {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	if !s.has(d) {
		return nil, fmt.Errorf("blob %s: %w", d, ErrNotFound)
	}
	f, err := os.Open(s.blobPath(d.Hash))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			// Evicted or removed by hand since the index said present.
			s.forget(d.Hash)
			return nil, fmt.Errorf("blob %s: %w", d, ErrNotFound)
		}
		return nil, fmt.Errorf("open blob %s: %w", d, err)
	}
	if offset > 0 {
		if _, err := f.Seek(offset, io.SeekStart); err != nil {
			f.Close()
			return nil, fmt.Errorf("seek blob %s: %w", d, err)
		}
	}
	return f, nil
}

func (s *DiskStore) forget(hash string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.index[hash]; ok {
		s.lru.Remove(e.elem)
		delete(s.index, hash)
		s.size -= e.size
	}
}

// Put implements Store.
func (s *DiskStore) Put(ctx context.Context, d Digest, r io.Reader) error {
	if d.Size == 0 && d.Hash == EmptyDigest.Hash {
		// Still verify the caller sent nothing.
		n, err := io.Copy(io.Discard, r)
		if err != nil {
			return err
		}
		if n != 0 {
			return fmt.Errorf("blob %s: got %d bytes: %w", d, n, ErrDigestMismatch)
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

// Writer streams one blob into the store. Bytes are hashed as they are
// written; Commit verifies and makes the blob visible. Writers are how
// resumable ByteStream uploads keep their state between streams.
type Writer struct {
	s       *DiskStore
	d       Digest
	f       *os.File
	h       hash.Hash
	written int64
	done    bool
}

// NewWriter starts an upload of d.
func (s *DiskStore) NewWriter(d Digest) (*Writer, error) {
	s.mu.Lock()
	err := s.fitsLocked(d)
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(s.tmpDir, d.Hash[:16]+"-*")
	if err != nil {
		return nil, s.spaceErr(fmt.Errorf("create upload file for %s: %w", d, err))
	}
	return &Writer{s: s, d: d, f: f, h: sha256.New()}, nil
}

// Written is how many bytes have been accepted so far.
func (w *Writer) Written() int64 { return w.written }

// Write implements io.Writer; it refuses data past the declared size.
func (w *Writer) Write(p []byte) (int, error) {
	if w.written+int64(len(p)) > w.d.Size {
		return 0, fmt.Errorf("blob %s: more than %d bytes written: %w", w.d, w.d.Size, ErrDigestMismatch)
	}
	n, err := w.f.Write(p)
	w.h.Write(p[:n])
	w.written += int64(n)
	if err != nil {
		return n, w.s.spaceErr(fmt.Errorf("write upload of %s: %w", w.d, err))
	}
	return n, nil
}

// Commit verifies the data and moves it into place. The Writer is finished
// whatever the outcome.
func (w *Writer) Commit() error {
	defer w.Abort()
	if w.written != w.d.Size {
		return fmt.Errorf("blob %s: got %d bytes, want %d: %w", w.d, w.written, w.d.Size, ErrDigestMismatch)
	}
	if got := hex.EncodeToString(w.h.Sum(nil)); got != w.d.Hash {
		return fmt.Errorf("blob %s: data hashes to %s: %w", w.d, got, ErrDigestMismatch)
	}
	return w.s.commitFile(w.f, w.d)
}

// Abort discards an unfinished upload; it is safe to call after Commit.
func (w *Writer) Abort() {
	if w.done {
		return
	}
	w.done = true
	w.f.Close()
	os.Remove(w.f.Name())
}

// commitFile makes the verified temp file f the blob d and closes f.
func (s *DiskStore) commitFile(f *os.File, d Digest) error {
	if err := f.Chmod(0o444); err != nil {
		return fmt.Errorf("chmod upload of %s: %w", d, err)
	}
	if s.fsync {
		if err := f.Sync(); err != nil {
			return s.spaceErr(fmt.Errorf("sync upload of %s: %w", d, err))
		}
	}
	if err := f.Close(); err != nil {
		return s.spaceErr(fmt.Errorf("close upload of %s: %w", d, err))
	}
	return s.link(f.Name(), d)
}

// link renames a verified, read-only file into place and indexes it. The
// index is updated after the rename, so an indexed blob always has its file.
func (s *DiskStore) link(tmp string, d Digest) error {
	final := s.blobPath(d.Hash)
	err := os.Rename(tmp, final)
	if errors.Is(err, fs.ErrNotExist) {
		if mkErr := os.MkdirAll(filepath.Dir(final), 0o755); mkErr != nil {
			err = mkErr
		} else {
			err = os.Rename(tmp, final)
		}
	}
	if err != nil {
		return fmt.Errorf("move blob %s into place: %w", d, err)
	}
	if err := s.index1(d); err != nil {
		os.Remove(final)
		return err
	}
	return nil
}

// index1 adds d to the index, evicting others to make room.
func (s *DiskStore) index1(d Digest) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.index[d.Hash]; ok {
		s.lru.MoveToFront(e.elem)
		return nil
	}
	if err := s.fitsLocked(d); err != nil {
		return err
	}
	e := &entry{hash: d.Hash, size: d.Size, diskTime: time.Now()}
	e.elem = s.lru.PushFront(e)
	s.index[d.Hash] = e
	s.size += d.Size
	s.evictLocked()
	if s.maxSize > 0 && s.size > s.maxSize {
		s.lru.Remove(e.elem)
		delete(s.index, d.Hash)
		s.size -= d.Size
		return fmt.Errorf("store %d bytes for blob %s: the size limit of %d bytes is taken by blobs of actions in flight: %w", d.Size, d, s.maxSize, ErrNoSpace)
	}
	return nil
}

func (s *DiskStore) fitsLocked(d Digest) error {
	if s.maxSize > 0 && d.Size > s.maxSize {
		return fmt.Errorf("blob %s is larger than the store's size limit of %d bytes: %w", d, s.maxSize, ErrNoSpace)
	}
	return nil
}

// evictLocked removes least recently used, unpinned blobs until the store
// fits its limit.
func (s *DiskStore) evictLocked() {
	if s.maxSize <= 0 {
		return
	}
	for el := s.lru.Back(); el != nil && s.size > s.maxSize; {
		e := el.Value.(*entry)
		prev := el.Prev()
		if s.pins[e.hash] == 0 {
			s.lru.Remove(el)
			delete(s.index, e.hash)
			s.size -= e.size
			s.evictions++
			os.Remove(s.blobPath(e.hash))
			os.Remove(filepath.Join(s.execDir, e.hash))
		}
		el = prev
	}
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
	s.evictLocked()
	s.maxSize = saved
	return s.evictions - before
}

// Pin implements Pinner.
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
			s.evictLocked()
			s.mu.Unlock()
		})
	}
}

// PutFile implements Store. The file is hashed, made root-owned and
// read-only, and renamed into the CAS; if the blob is already present the
// file is removed instead. Files on another file system are copied.
func (s *DiskStore) PutFile(ctx context.Context, path string) (Digest, error) {
	f, err := os.Open(path)
	if err != nil {
		return Digest{}, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	d, err := DigestReader(f)
	if err != nil {
		return Digest{}, fmt.Errorf("hash %s: %w", path, err)
	}
	if d.IsEmpty() || s.has(d) {
		os.Remove(path)
		return d, nil
	}
	// The file may have been written by a sandboxed user: take ownership
	// before it becomes a shared blob so that user cannot change it later.
	if os.Geteuid() == 0 {
		if err := f.Chown(0, 0); err != nil {
			return Digest{}, fmt.Errorf("chown %s: %w", path, err)
		}
	}
	if err := f.Chmod(0o444); err != nil {
		return Digest{}, fmt.Errorf("chmod %s: %w", path, err)
	}
	// Re-verify after taking ownership: the content must not have changed
	// between hashing and chown (nothing else should hold it open, but a
	// wrong blob under a name is the one thing the store must never allow).
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return Digest{}, err
	}
	d2, err := DigestReader(f)
	if err != nil || d2 != d {
		return Digest{}, fmt.Errorf("%s changed while being stored", path)
	}
	if s.fsync {
		if err := f.Sync(); err != nil {
			return Digest{}, s.spaceErr(fmt.Errorf("sync %s: %w", path, err))
		}
	}
	if err := s.link(path, d); err != nil {
		var lerr *os.LinkError
		if errors.As(err, &lerr) && errors.Is(lerr.Err, syscall.EXDEV) {
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				return Digest{}, err
			}
			if err := s.Put(ctx, d, f); err != nil {
				return Digest{}, err
			}
			os.Remove(path)
			return d, nil
		}
		return Digest{}, err
	}
	return d, nil
}

// BlobPath implements LocalStore.
func (s *DiskStore) BlobPath(d Digest, executable bool) (string, error) {
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
		return "", fmt.Errorf("open blob %s: %w", d, err)
	}
	defer src.Close()
	tmp, err := os.CreateTemp(s.tmpDir, "exec-*")
	if err != nil {
		return "", s.spaceErr(err)
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, src); err != nil {
		tmp.Close()
		return "", s.spaceErr(fmt.Errorf("copy executable %s: %w", d, err))
	}
	if err := tmp.Chmod(0o555); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), ep); err != nil {
		return "", fmt.Errorf("move executable copy of %s: %w", d, err)
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
	f, err := os.CreateTemp(s.tmpDir, "empty-*")
	if err != nil {
		return "", err
	}
	f.Chmod(mode)
	f.Close()
	return p, os.Rename(f.Name(), p)
}

// spaceErr marks out-of-space errors with ErrNoSpace.
func (s *DiskStore) spaceErr(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: %w", ErrNoSpace, err)
	}
	return err
}
