package cas

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// ErrCorrupt is wrapped when a stored blob's file no longer matches its
// digest (bit rot, a hand edit, a file truncated by a power loss on a
// --no-fsync root). The blob has been quarantined by then, so such errors
// also wrap ErrNotFound: callers that treat a missing blob as MISSING need
// nothing more, and the CAS services answer DATA_LOSS.
var ErrCorrupt = errors.New("stored blob does not match its digest")

// Verifier is the verifying part of Store (see Store.VerifyBlobs), for
// callers that need no more.
type Verifier interface {
	VerifyBlobs(ctx context.Context, ds []Digest) (corrupt []Digest, err error)
}

// corruptErr quarantines the blob file f (open for d) and returns the error
// for the reader that found it bad.
func (s *DiskStore) corruptErr(d Digest, f *os.File, why string) error {
	s.quarantineFile(d, f, why)
	return &corruptError{fmt.Sprintf("blob %s: %s: %s; it was quarantined and is missing now: upload it again", d, ErrCorrupt, why)}
}

// corruptError is ErrCorrupt and ErrNotFound at once (see ErrCorrupt).
type corruptError struct{ msg string }

func (e *corruptError) Error() string { return e.msg }
func (e *corruptError) Is(target error) bool {
	return target == ErrCorrupt || target == ErrNotFound
}

// quarantineFile moves the blob file f of d aside (into QuarantineDir,
// where an operator can inspect it) and drops d from the index, so that
// FindMissing reports it missing and the next upload stores it afresh.
// Nothing happens if the name no longer refers to f: a re-upload has
// already replaced the bad file with a good one.
func (s *DiskStore) quarantineFile(d Digest, f *os.File, why string) {
	fi, ferr := f.Stat()
	s.mu.Lock()
	li, lerr := os.Lstat(s.blobPath(d.Hash))
	if ferr != nil || lerr != nil || !os.SameFile(fi, li) {
		s.mu.Unlock()
		s.log.Debug("corrupt blob already replaced", "digest", d.String(), "reason", why)
		return
	}
	// The rename runs under mu (it is rare) so that no lookup in between
	// finds the blob indexed without its file.
	qdir := filepath.Join(s.dir, QuarantineDir)
	q, err := "", os.MkdirAll(qdir, 0o755)
	if err == nil {
		q, err = quarantine(s.blobPath(d.Hash), qdir, d.Hash)
	}
	if err != nil {
		// It cannot be moved: remove it, a blob that is wrong is worth nothing.
		if rerr := os.Remove(s.blobPath(d.Hash)); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
	}
	os.Remove(filepath.Join(s.execDir, d.Hash))
	if e, ok := s.index[d.Hash]; ok {
		if e.pk != nil {
			// The record is another copy: it stays, to be hashed before use.
			e.file, e.verified = false, false
		} else {
			s.dropLocked(e)
		}
	}
	s.quarantined++
	hooks := s.onQuarantine
	s.mu.Unlock()
	s.log.Warn("corrupt blob quarantined; clients will upload it again", "digest", d.String(), "reason", why, "moved_to", q, "err", err)
	for _, h := range hooks {
		h(d)
	}
}

// OnQuarantine registers fn to be called (without locks held) after a blob
// was quarantined; caches of open blob files use it to drop theirs.
func (s *DiskStore) OnQuarantine(fn func(Digest)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onQuarantine = append(s.onQuarantine, fn)
}

// markVerified records that the blob's file was just hashed and matched.
func (s *DiskStore) markVerified(hash string) {
	s.mu.Lock()
	if e, ok := s.index[hash]; ok {
		e.verified = true
	}
	s.mu.Unlock()
}

// intact reports whether d is stored in a file that can be trusted without
// hashing it again: indexed with d's size, hashed by this process since it
// opened the store or wrote the blob, and still d.Size bytes on disk (a
// stat; a truncation after the write is the common way a file goes bad).
// It marks the blob used. Write paths skip an upload only when it is
// intact: otherwise they store their own, freshly verified, copy over it.
func (s *DiskStore) intact(d Digest) bool {
	s.mu.Lock()
	e, ok := s.index[d.Hash]
	ok = ok && e.size == d.Size && e.verified
	var touch []string
	now := time.Now()
	if ok {
		touch = s.useLocked(e, now, nil)
	}
	s.mu.Unlock()
	if !ok {
		return false
	}
	s.touchFiles(touch, now)
	for try := 0; try < 3; try++ {
		p, off, packed := s.packedLoc(d)
		if !packed {
			break
		}
		// A record's bytes are never rewritten; a pack cut short (a power loss
		// on a root that does not sync) is what a cheap check can see.
		fi, err := p.f.Stat()
		if errors.Is(err, os.ErrClosed) {
			continue // compacted meanwhile: look again
		}
		if err == nil && fi.Size() >= off+d.Size {
			return true
		}
		s.mu.Lock()
		if e, ok := s.index[d.Hash]; ok && e.pk == p && e.pkOff == off {
			e.verified = false // cut short: the next upload replaces it
		}
		s.mu.Unlock()
		return false
	}
	fi, err := os.Stat(s.blobPath(d.Hash))
	return err == nil && fi.Size() == d.Size
}

// Intact is intact for the CAS services (ByteStream's early "already
// stored" answer): d is stored and its file passed the cheap checks.
func (s *DiskStore) Intact(d Digest) bool { return d.IsEmpty() || s.intact(d) }

// verifyingReader streams a blob and hashes what it streams, so a read is
// verified without a second pass over the file. The read that would
// complete the blob returns an error wrapping ErrCorrupt instead of its
// bytes when the hash does not match: no reader ever gets all of a wrong
// blob without an error. Bytes before offset are hashed when the reader is
// made; VerifyRest hashes what a read with a limit left unread.
//
// For large reads the hashing runs on a goroutine of its own, fed the
// reader's own 1 MiB buffers (see pipe), so that on a machine with a spare
// core it overlaps with sending instead of adding to it.
type verifyingReader struct {
	s   *DiskStore
	d   Digest
	f   *os.File
	h   hash.Hash
	pos int64 // bytes of the file read (and hashed, or handed to the hasher)
	err error
	p   *hashPipe // nil: hash inline
}

// hashPipe is the pipelined hasher of a verifyingReader.
type hashPipe struct {
	cur    []byte      // the chunk being handed out
	off    int         // how much of cur has been handed out
	work   chan []byte // chunks to hash, in order
	free   chan []byte // chunks hashed, for reuse
	nbufs  int
	closed bool
	hashed chan struct{} // closed when the hasher has hashed everything in work
}

// verifyPipeMin is the read size from which hashing is pipelined; below
// it a goroutine and its buffers cost more than they save.
const verifyPipeMin = 4 << 20

// verifyPipeBufs is how many chunks may be in flight between the file, the
// hasher and the caller.
const verifyPipeBufs = 3

func (s *DiskStore) newVerifyingReader(d Digest, f *os.File, offset int64) (*verifyingReader, error) {
	r := &verifyingReader{s: s, d: d, f: f, h: sha256.New()}
	if offset > 0 {
		// Hashing the prefix reads it, as a read from 0 would have.
		n, err := io.CopyBuffer(r.h, io.LimitReader(f, offset), make([]byte, min(offset, copyBufSize)))
		r.pos = n
		if err != nil {
			return nil, fmt.Errorf("read blob %s: %w", d, err)
		}
		if n < offset {
			return nil, s.corruptErr(d, f, fmt.Sprintf("the file ended after %d of %d bytes", n, d.Size))
		}
	}
	if d.Size-offset >= verifyPipeMin && !s.inlineHash.Load() {
		p := &hashPipe{work: make(chan []byte, verifyPipeBufs), free: make(chan []byte, verifyPipeBufs), hashed: make(chan struct{})}
		h := r.h
		go func() {
			defer close(p.hashed)
			for b := range p.work {
				h.Write(b)
				p.free <- b
			}
		}()
		r.p = p
	}
	return r, nil
}

func (r *verifyingReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if r.p != nil {
		return r.readPiped(p)
	}
	rem := r.d.Size - r.pos
	if rem == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > rem {
		p = p[:rem]
	}
	n, err := r.f.Read(p)
	r.h.Write(p[:n])
	r.pos += int64(n)
	if r.pos == r.d.Size {
		if err := r.check(); err != nil {
			return 0, err // withhold the last bytes of a wrong blob
		}
		return n, nil
	}
	if err == io.EOF {
		r.err = r.s.corruptErr(r.d, r.f, fmt.Sprintf("the file ended after %d of %d bytes", r.pos, r.d.Size))
		return 0, r.err
	}
	if err != nil {
		r.err = fmt.Errorf("read blob %s: %w", r.d, err)
		return n, r.err
	}
	return n, nil
}

// readPiped is Read with the hasher on its own goroutine: each chunk is
// read from the file into a buffer of the pipe, handed to the hasher at
// once and copied out to the caller meanwhile. The last chunk is handed
// out only after the hasher has caught up and the sum matched.
func (r *verifyingReader) readPiped(p []byte) (int, error) {
	q := r.p
	if q.off == len(q.cur) {
		if r.pos == r.d.Size {
			return 0, io.EOF
		}
		var buf []byte
		if q.nbufs < verifyPipeBufs {
			buf = make([]byte, copyBufSize)
			q.nbufs++
		} else {
			buf = <-q.free
		}
		n, err := io.ReadFull(r.f, buf[:min(int64(len(buf)), r.d.Size-r.pos)])
		r.pos += int64(n)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			r.err = r.s.corruptErr(r.d, r.f, fmt.Sprintf("the file ended after %d of %d bytes", r.pos, r.d.Size))
			return 0, r.err
		}
		if err != nil {
			r.err = fmt.Errorf("read blob %s: %w", r.d, err)
			return 0, r.err
		}
		q.cur, q.off = buf[:n], 0
		q.work <- q.cur // the hasher only reads it, as the copy below does
		if r.pos == r.d.Size {
			q.closeWork()
			<-q.hashed
			if err := r.check(); err != nil {
				return 0, err // withhold the last chunk of a wrong blob
			}
		}
	}
	n := copy(p, q.cur[q.off:])
	q.off += n
	return n, nil
}

func (q *hashPipe) closeWork() {
	if !q.closed {
		q.closed = true
		close(q.work)
	}
}

// check compares the hash of the whole file with the digest.
func (r *verifyingReader) check() error {
	if got := hex.EncodeToString(r.h.Sum(nil)); got != r.d.Hash {
		r.err = r.s.corruptErr(r.d, r.f, "its content hashes to "+got)
		return r.err
	}
	r.s.markVerified(r.d.Hash)
	return nil
}

// VerifyRest hashes the part of the blob not read yet and reports whether
// the whole blob matches its digest. Readers that stop early (a ByteStream
// read_limit) call it before they send their last bytes.
func (r *verifyingReader) VerifyRest() error {
	if r.err != nil || (r.pos == r.d.Size && (r.p == nil || r.p.closed)) {
		return r.err
	}
	buf := make([]byte, min(r.d.Size-r.pos+1, copyBufSize))
	for r.err == nil {
		if _, err := r.Read(buf); err == io.EOF {
			break
		} else if err != nil {
			return err
		}
	}
	return r.err
}

// Close stops the hasher, if any, and closes the file.
func (r *verifyingReader) Close() error {
	if r.p != nil {
		r.p.closeWork()
		<-r.p.hashed
	}
	return r.f.Close()
}

// RestVerifier is implemented by readers from Store.Get that verify what
// they stream; see verifyingReader.VerifyRest.
type RestVerifier interface{ VerifyRest() error }

// VerifyBlobs implements Store. Blobs are hashed a few at a time; a blob
// this process wrote, or hashed before, costs a map lookup.
func (s *DiskStore) VerifyBlobs(ctx context.Context, ds []Digest) ([]Digest, error) {
	return s.VerifyBlobsWithin(ctx, ds, -1)
}

// VerifyBlobsWithin is VerifyBlobs hashing at most maxBytes (< 0: no
// limit); blobs past the budget stay unverified and are not reported. For
// checks that must answer quickly (an ActionCache lookup) and have a later
// line of defence (the download is verified too).
func (s *DiskStore) VerifyBlobsWithin(ctx context.Context, ds []Digest, maxBytes int64) ([]Digest, error) {
	var todo []Digest
	s.mu.Lock()
	for _, d := range ds {
		if e, ok := s.index[d.Hash]; ok && e.size == d.Size && !e.verified {
			if maxBytes >= 0 {
				if d.Size > maxBytes {
					continue
				}
				maxBytes -= d.Size
			}
			todo = append(todo, d)
		}
	}
	s.mu.Unlock()
	if len(todo) == 0 {
		return nil, nil
	}
	start := time.Now()
	bad := make([]bool, len(todo))
	errs := make([]error, len(todo))
	parallel(len(todo), func(i int) {
		if ctx.Err() != nil {
			errs[i] = ctx.Err()
			return
		}
		bad[i], errs[i] = s.verifyStored(todo[i])
	})
	var corrupt []Digest
	for i, d := range todo {
		if errs[i] != nil {
			return nil, errs[i]
		}
		if bad[i] {
			corrupt = append(corrupt, d)
		}
	}
	s.log.Debug("verified input blobs", "blobs", len(todo), "corrupt", len(corrupt), "took", time.Since(start))
	return corrupt, nil
}

// verifyStored hashes the stored file of d, quarantining it if it does not
// match. A blob that vanished meanwhile (evicted) is not corrupt.
func (s *DiskStore) verifyStored(d Digest) (corrupt bool, err error) {
	if _, packed, err := s.readPacked(d); packed {
		if errors.Is(err, ErrCorrupt) {
			return true, nil
		}
		return false, err
	}
	f, err := os.Open(s.blobPath(d.Hash))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			s.forget(d.Hash)
			return false, nil
		}
		return false, fmt.Errorf("open blob %s: %w", d, err)
	}
	defer f.Close()
	r := &verifyingReader{s: s, d: d, f: f, h: sha256.New()}
	if fi, err := f.Stat(); err == nil && fi.Size() != d.Size {
		s.corruptErr(d, f, fmt.Sprintf("the file has %d bytes", fi.Size()))
		return true, nil
	}
	if err := r.VerifyRest(); err != nil {
		if errors.Is(err, ErrCorrupt) {
			return true, nil
		}
		return false, err
	}
	return false, nil
}
