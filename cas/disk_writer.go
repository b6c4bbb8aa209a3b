// Streaming uploads into a DiskStore: Writer hashes bytes as they arrive,
// writes them to a temp file (pipelined for large blobs) and commits the
// verified file as a blob.

package cas

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
)

// writeBehindChunk is how much an upload writes before the kernel is asked
// to start writing it back, so that the fsync at the end waits only for the
// tail instead of the whole blob.
const writeBehindChunk = 8 << 20

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

var _ Uploader = (*DiskStore)(nil)

// NewWriter implements Uploader: it starts an upload of d, a *Writer.
func (s *DiskStore) NewWriter(d Digest) (BlobWriter, error) {
	if err := d.Validate(); err != nil {
		return nil, err
	}
	if s.maxSize > 0 && d.Size > s.maxSize {
		return nil, fmt.Errorf("blob %s is larger than the store's size limit of %d bytes: %w", d, s.maxSize, ErrNoSpace)
	}
	if s.packable(d.Size) {
		return &packWriter{s: s, d: d, buf: make([]byte, 0, d.Size)}, nil
	}
	if s.anonTemp {
		f, err := openAnon(s.tmpDir)
		if err != nil {
			return nil, fmt.Errorf("upload of %s: %w", d, s.spaceErr(err))
		}
		return &Writer{s: s, d: d, f: f, h: sha256.New()}, nil
	}
	f, err := s.createTemp(d.Hash[:16])
	if err != nil {
		return nil, fmt.Errorf("upload of %s: %w", d, err)
	}
	return &Writer{s: s, d: d, f: f, name: f.Name(), h: sha256.New()}, nil
}

// nameAnon gives the unnamed temp file of an upload a name in tmp/, so
// that it outlives its descriptor (an idle resumable upload, or a blob
// that must replace a bad stored copy by rename).
func (s *DiskStore) nameAnon(f *os.File, d Digest) (string, error) {
	name := filepath.Join(s.tmpDir, d.Hash[:16]+"-"+s.tmpPrefix+"-"+strconv.FormatUint(s.tmpSeq.Add(1), 10))
	if err := linkAnon(f, name); err != nil {
		return "", s.spaceErr(fmt.Errorf("name upload of %s: %w", d, err))
	}
	return name, nil
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
	if w.f != nil && w.name == "" {
		name, nerr := w.s.nameAnon(w.f, w.d)
		if nerr != nil {
			return nerr // keeps the descriptor: the upload stays usable
		}
		w.name = name
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
	if w.s.durability != NoSync && w.fileOff-w.synced >= writeBehindChunk {
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
	return w.s.commitFile(w.f, w.name, w.d)
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
	if w.name != "" {
		os.Remove(w.name)
	}
	w.uncount()
}

// commitFile makes the verified temp file f (named name, or unnamed if
// name is empty) the blob d and closes f.
func (s *DiskStore) commitFile(f *os.File, name string, d Digest) error {
	defer f.Close()
	if name != "" {
		if err := f.Chmod(0o444); err != nil {
			return s.spaceErr(fmt.Errorf("chmod upload of %s: %w", d, err))
		}
	}
	if err := s.syncData(f); err != nil {
		return s.spaceErr(fmt.Errorf("sync upload of %s: %w", d, err))
	}
	if name != "" {
		return s.linkPath(name, d, true)
	}
	return s.linkAnonFile(f, d, true)
}

// linkAnonFile is link for the unnamed, verified file f.
func (s *DiskStore) linkAnonFile(f *os.File, d Digest, syncDir bool) error {
	return s.link(d, syncDir, func(dst string) error {
		err := linkAnon(f, dst)
		if !errors.Is(err, syscall.EEXIST) {
			return err
		}
		// A stored copy that is not intact is being replaced: only a
		// rename can take its name atomically.
		tmp, err := s.nameAnon(f, d)
		if err != nil {
			return err
		}
		if err := syscall.Rename(tmp, dst); err != nil {
			os.Remove(tmp)
			return err
		}
		return nil
	}, func() {})
}
