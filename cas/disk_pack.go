// Packs: small blobs appended to shared files instead of a file each.
//
// Creating, writing and linking a file costs the kernel tens of
// microseconds, and a file system full of tiny files costs each later sync
// an inode write-back per blob; Bazel uploads every input as a blob, most
// of them a few hundred bytes. A DiskStore therefore appends blobs of up
// to PackMaxBlob bytes as records to a pack, dir/packs/<16 hex>.pack: a
// batch of blobs is one write, and under write-back or group commit one
// sync covers a whole pack instead of thousands of inodes.
//
// A record is a header (packMagic, the raw SHA-256, the size as a
// big-endian uint32) followed by the blob's bytes. Packs are only ever
// appended to, by the run that created them; a new run starts a new pack.
// So a record's bytes, once written, never change, and a descriptor of a
// pack reads the same bytes for as long as it is open, even after
// compaction has removed the pack's name: that is what lets actiondfs
// serve inputs from packs through descriptors of its own (OpenSpan).
//
// Evicted, replaced and damaged records are dead bytes. Their header's
// magic is overwritten with packDeadMagic (a tombstone, so that a restart
// does not bring them back); a pack that is more than half dead is
// compacted in the background: its live records are appended to the
// current pack, made durable, repointed, and the old pack removed.
//
// Opening a store scans every pack and indexes its records. After an
// unclean stop on another boot, packs changed since the last flush are
// hashed record by record as they are scanned: a record that does not
// match, or a header that cannot be read (the unflushed tail of a pack
// after a power loss), is dead, never served.

package cas

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// PackMaxBlob is the largest blob a DiskStore packs; larger blobs get a
// file of their own.
const PackMaxBlob = 16 << 10

const (
	packMagic     = "adp1"
	packDeadMagic = "adp0" // the record is dead: skipped when a pack is loaded
	packHeader    = len(packMagic) + sha256.Size + 4
	packSuffix    = ".pack"
)

// packTarget is the size at which a pack is closed for appends and a new
// one started; a variable for tests.
var packTarget int64 = 64 << 20

// pack is one pack file.
type pack struct {
	id   uint64
	path string
	f    *os.File // read (and, for this run's packs, written) with ReadAt/WriteAt
	// end is the append offset; for the pack being appended to it is
	// guarded by packMu, and fixed once the pack is sealed.
	end   int64
	mtime time.Time // when loaded: orders its records for eviction
	// Guarded by the store's mu:
	nameSynced atomic.Bool // under FsyncEach: its directory entry is durable
	dead       int64       // bytes of records nothing in the index points at
	sealed     bool        // no more appends: a candidate for compaction
	compacting bool
	// unindexed counts appends to p whose records are not indexed (or
	// counted dead) yet: their writer is waiting for the disk. p is not
	// compacted meanwhile, or the compaction would miss them.
	unindexed int
}

// recordSize is the bytes a blob of size n takes in a pack.
func recordSize(n int64) int64 { return int64(packHeader) + n }

// WithSmallBlobPacks sets whether blobs of up to PackMaxBlob bytes are
// written to packs (the default) or to files of their own. Blobs already
// in packs are read either way.
func WithSmallBlobPacks(on bool) Option {
	return func(s *DiskStore) error {
		s.noPacks = !on
		return nil
	}
}

// packable reports whether a new blob of size n goes to a pack.
func (s *DiskStore) packable(n int64) bool { return !s.noPacks && n > 0 && n <= PackMaxBlob }

// packFound is a record found while scanning a pack.
type packFound struct {
	hash string
	size int64
	off  int64 // of the data
	p    *pack
	ok   bool // hashed and matched
}

// packMark is a position in the sequence of pack records: every record of
// a pack older than id, and those of pack id that end by end.
type packMark struct {
	id  uint64
	end int64
}

// covers reports whether the record of pack id ending at end is before m.
func (m packMark) covers(id uint64, end int64) bool {
	return id < m.id || (id == m.id && end <= m.end)
}

// packMark returns the position up to which every pack record has been
// written (completely: appends hold packMu).
func (s *DiskStore) packMark() packMark {
	s.packMu.Lock()
	defer s.packMu.Unlock()
	if s.active == nil {
		return packMark{id: s.packSeq}
	}
	return packMark{s.active.id, s.active.end}
}

// loadPacks opens every pack and returns its records. After an unclean
// stop on another boot (packCheck set), the records past the last flush
// are hashed; the bad ones are left out.
func (s *DiskStore) loadPacks() ([]packFound, error) {
	ents, err := os.ReadDir(s.packDir)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", s.packDir, err)
	}
	var found []packFound
	for _, e := range ents {
		name := e.Name()
		id, perr := strconv.ParseUint(strings.TrimSuffix(name, packSuffix), 16, 64)
		if perr != nil || !strings.HasSuffix(name, packSuffix) || len(name) != 16+len(packSuffix) || !e.Type().IsRegular() {
			s.log.Warn("removing stray file from CAS packs", "path", filepath.Join(s.packDir, name))
			os.RemoveAll(filepath.Join(s.packDir, name))
			continue
		}
		s.packSeq = max(s.packSeq, id+1)
		p, recs, err := s.scanPack(id)
		if err != nil {
			return nil, err
		}
		if p == nil {
			continue
		}
		s.packs[id] = p
		s.packDead += p.dead
		found = append(found, recs...)
	}
	return found, nil
}

// scanPack opens pack id and reads its records; a nil pack means it was
// empty and has been removed.
func (s *DiskStore) scanPack(id uint64) (*pack, []packFound, error) {
	path := filepath.Join(s.packDir, fmt.Sprintf("%016x%s", id, packSuffix))
	// Read-write: dead records get their tombstone.
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open pack: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("stat pack: %w", err)
	}
	if fi.Size() == 0 {
		f.Close()
		os.Remove(path)
		return nil, nil, nil
	}
	p := &pack{id: id, path: path, f: f, end: fi.Size(), mtime: fi.ModTime(), sealed: true}
	var recs []packFound
	damaged := 0
	end, err := readRecords(f, func(off int64, sum, data []byte, dead bool) {
		n := int64(len(data))
		if dead {
			p.dead += recordSize(n)
			return
		}
		rec := packFound{hash: hex.EncodeToString(sum), size: n, off: off + int64(packHeader), p: p}
		if s.packCheck != nil && !s.packCheck.covers(id, off+recordSize(n)) {
			if got := sha256.Sum256(data); !bytes.Equal(got[:], sum) {
				damaged++
				p.dead += recordSize(n)
				p.tombstone(rec.off)
				return
			}
			rec.ok = true
		}
		recs = append(recs, rec)
	})
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("read pack %s: %w", path, err)
	}
	if end < p.end {
		// A torn or unreadable tail: the end of an unflushed pack after a
		// power loss. Nothing in it is served.
		damaged++
		p.dead += p.end - end
	}
	if damaged > 0 {
		s.quarantined += int64(damaged)
		s.log.Warn("CAS: pack records damaged, most likely by a power loss before they were flushed; they are missing now", "pack", path, "damaged", damaged)
	}
	return p, recs, nil
}

// readRecords calls fn for each record of the pack r, in order, with the
// record's offset, its raw hash, its bytes (valid during the call only)
// and whether it is dead (a tombstone), and returns where the readable
// records end: the pack's size, or the offset of a torn or unreadable
// record. The error is for failed reads only.
func readRecords(r io.Reader, fn func(off int64, sum, data []byte, dead bool)) (int64, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	hdr := make([]byte, packHeader)
	data := make([]byte, PackMaxBlob)
	var off int64
	for {
		if _, err := io.ReadFull(br, hdr); err != nil {
			return off, ignoreShort(err)
		}
		n := int64(binary.BigEndian.Uint32(hdr[len(packMagic)+sha256.Size:]))
		magic := string(hdr[:len(packMagic)])
		if (magic != packMagic && magic != packDeadMagic) || n == 0 || n > PackMaxBlob {
			return off, nil
		}
		if _, err := io.ReadFull(br, data[:n]); err != nil {
			return off, ignoreShort(err)
		}
		fn(off, hdr[len(packMagic):len(packMagic)+sha256.Size], data[:n], magic == packDeadMagic)
		off += recordSize(n)
	}
}

// ignoreShort drops the errors of a pack that ends early.
func ignoreShort(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return nil
	}
	return err
}

// verifyPacks is Verify for the packs of the store in dir: each record is
// hashed, and a pack with bad records (or a torn tail) is rewritten
// without them, each bad one copied to qdir.
func verifyPacks(ctx context.Context, dir, qdir string, rep *VerifyReport) error {
	packDir := filepath.Join(dir, "packs")
	names, err := filepath.Glob(filepath.Join(packDir, "*"+packSuffix))
	if err != nil {
		return err
	}
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := verifyPack(name, qdir, rep); err != nil {
			return err
		}
	}
	return nil
}

func verifyPack(name, qdir string, rep *VerifyReport) error {
	f, err := os.Open(name)
	if err != nil {
		return fmt.Errorf("verify pack: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("verify pack: %w", err)
	}
	var good []byte
	var bad []Corrupt
	end, err := readRecords(f, func(off int64, sum, data []byte, dead bool) {
		if dead {
			return // left out of a rewrite
		}
		rep.Blobs++
		rep.Bytes += int64(len(data))
		got := sha256.Sum256(data)
		if bytes.Equal(got[:], sum) {
			good = appendRecord(good, sum, data)
			return
		}
		c := Corrupt{Hash: hex.EncodeToString(sum), Got: hex.EncodeToString(got[:]), Size: int64(len(data))}
		tmp := filepath.Join(qdir, c.Hash+".tmp")
		c.Err = os.MkdirAll(qdir, 0o755)
		if c.Err == nil {
			c.Err = os.WriteFile(tmp, data, 0o444)
		}
		if c.Err == nil {
			c.Quarantined, c.Err = quarantine(tmp, qdir, c.Hash)
		}
		bad = append(bad, c)
	})
	if err != nil {
		return fmt.Errorf("verify pack %s: %w", name, err)
	}
	if len(bad) == 0 && end == fi.Size() {
		return nil
	}
	if end < fi.Size() {
		bad = append(bad, Corrupt{Size: fi.Size() - end, Err: fmt.Errorf("pack %s: %d bytes from offset %d are no records (a torn tail)", name, fi.Size()-end, end)})
	}
	rep.Corrupt = append(rep.Corrupt, bad...)
	// Rewrite the pack with its good records only, under the same name,
	// synced first so that a crash leaves the old pack or the new one.
	tmp := name + ".verified"
	err = writeSynced(tmp, good)
	if err == nil {
		err = os.Rename(tmp, name)
	}
	if err == nil {
		err = fsyncDir(filepath.Dir(name))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rewrite pack %s: %w", name, err)
	}
	return nil
}

// indexRecord adds a record loadPacks found to the index (called by load,
// newest first; the store is not shared yet).
func (s *DiskStore) indexRecord(r packFound) {
	if e, ok := s.index[r.hash]; ok {
		if e.pk == nil {
			// The file is a copy made from this record for a path (or a
			// stray, or torn if its size differs): one copy per blob is
			// verified and served, the record; the file is made again
			// when a path is needed.
			os.Remove(s.blobPath(r.hash))
			s.size += r.size - e.size
			e.pk, e.pkOff, e.file, e.verified, e.size = r.p, r.off, false, r.ok, r.size
		} else if e.size == r.size && (r.p.id > e.pk.id || (r.p.id == e.pk.id && r.off > e.pkOff)) {
			// A later record of the blob (a re-upload that replaced a
			// copy not known good) wins, whatever the packs' mtimes say.
			s.deadEntryLocked(e)
			e.pk, e.pkOff, e.verified = r.p, r.off, r.ok
		} else {
			s.deadLocked(r.p, r.off, r.size) // an older copy
		}
		return
	}
	e := &entry{hash: r.hash, size: r.size, diskTime: r.p.mtime, pk: r.p, pkOff: r.off, verified: r.ok}
	e.elem = s.lru.PushBack(e)
	s.index[r.hash] = e
	s.size += r.size
}

// deadLocked marks the record of a size-byte blob at data offset off in p
// dead (its tombstone) and starts compacting p when it is sealed and more
// than half dead. Called with mu held.
func (s *DiskStore) deadLocked(p *pack, off, size int64) {
	n := recordSize(size)
	p.dead += n
	s.packDead += n
	p.tombstone(off)
	s.maybeCompactLocked(p)
}

// tombstone overwrites the magic of the record whose data starts at off,
// so that loading the pack skips it. Best effort: a dead record that comes
// back after a restart is a blob nobody has vouched for since, and is
// hashed before it is used.
func (p *pack) tombstone(off int64) {
	p.f.WriteAt([]byte(packDeadMagic), off-int64(packHeader))
}

// maybeCompactLocked queues p for compaction when it is sealed and more
// than half dead. Called with mu held.
func (s *DiskStore) maybeCompactLocked(p *pack) {
	if !p.sealed || p.compacting || p.unindexed > 0 || p.dead*2 < p.end || s.packs[p.id] != p || s.opening || s.closing {
		return
	}
	s.queueCompactionLocked(p)
}

// queueCompactionLocked queues p for compaction. Called with mu held.
func (s *DiskStore) queueCompactionLocked(p *pack) {
	p.compacting = true
	s.compactQueue = append(s.compactQueue, p)
	if !s.compactorRunning {
		s.compactorRunning = true
		go s.compactor()
	}
}

// dropLocked removes e from the index: its pack record is dead, its file
// (if any) is the caller's to remove. Called with mu held.
func (s *DiskStore) dropLocked(e *entry) {
	s.lru.Remove(e.elem)
	delete(s.index, e.hash)
	s.size -= e.size
	if e.pk != nil {
		s.deadEntryLocked(e)
		e.pk = nil
	}
}

// deadEntryLocked marks e's record dead (see deadLocked).
func (s *DiskStore) deadEntryLocked(e *entry) { s.deadLocked(e.pk, e.pkOff, e.size) }

// appendRecord appends the record of data, whose raw SHA-256 is sum, to
// buf: the one encoder of the format readRecords decodes.
func appendRecord(buf, sum, data []byte) []byte {
	buf = append(buf, packMagic...)
	buf = append(buf, sum...)
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(data)))
	return append(buf, data...)
}

// appendRecords writes the (verified) blobs as records to the current
// pack with one write and returns the pack and the data offset of each.
// The records are not durable yet (see packDurable).
func (s *DiskStore) appendRecords(blobs []Blob) (*pack, []int64, error) {
	var total int64
	for _, b := range blobs {
		total += recordSize(b.Digest.Size)
	}
	buf := make([]byte, 0, total)
	offs := make([]int64, len(blobs))
	for i, b := range blobs {
		sum, err := hex.DecodeString(b.Digest.Hash)
		if err != nil || len(sum) != sha256.Size {
			return nil, nil, fmt.Errorf("blob %s: not a SHA-256 digest", b.Digest)
		}
		buf = appendRecord(buf, sum, b.Data)
		offs[i] = int64(len(buf)) - b.Digest.Size
	}
	s.packMu.Lock()
	defer s.packMu.Unlock()
	p, err := s.activePackLocked()
	if err != nil {
		return nil, nil, err
	}
	if _, err := p.f.WriteAt(buf, p.end); err != nil {
		// A partial record past end is overwritten by the next append.
		return nil, nil, s.spaceErr(fmt.Errorf("append to pack %s: %w", p.path, err))
	}
	for i := range offs {
		offs[i] += p.end
	}
	p.end += total
	s.mu.Lock()
	p.unindexed++            // the caller calls indexedLocked once it has
	if p.end >= packTarget { // sealed: the next append starts a new pack
		s.active = nil
		p.sealed = true
	}
	s.mu.Unlock()
	return p, offs, nil
}

// indexedLocked ends an append to p that appendRecords counted: its
// records are indexed or counted dead. Called with mu held.
func (s *DiskStore) indexedLocked(p *pack) {
	p.unindexed--
	s.maybeCompactLocked(p)
}

// activePackLocked returns the pack appends go to, creating it if needed.
// Called with packMu held.
func (s *DiskStore) activePackLocked() (*pack, error) {
	if s.active != nil {
		return s.active, nil
	}
	id := s.packSeq
	path := filepath.Join(s.packDir, fmt.Sprintf("%016x%s", id, packSuffix))
	// Not read-only, unlike blob files: tombstones are written into old
	// packs, and a pack is never linked into an action's inputs.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, s.spaceErr(fmt.Errorf("create pack: %w", err))
	}
	s.packSeq++
	p := &pack{id: id, path: path, f: f}
	s.mu.Lock()
	s.packs[id] = p
	s.mu.Unlock()
	s.active = p
	return p, nil
}

// packDurable makes records just appended to p as durable as the store's
// Durability asks.
func (s *DiskStore) packDurable(p *pack) error {
	switch {
	case s.durability == NoSync:
		return nil
	case s.durability == WriteBack:
		s.placed()
		return nil
	case s.group != nil:
		return s.group.wait()
	default:
		if err := p.f.Sync(); err != nil {
			return err
		}
		// A new pack's name must be durable too (once per pack).
		if p.nameSynced.Load() {
			return nil
		}
		if err := fsyncDir(s.packDir); err != nil {
			return err
		}
		p.nameSynced.Store(true)
		return nil
	}
}

// putPacked stores blobs (verified: each hashes to its digest, at most
// PackMaxBlob bytes, distinct) as pack records with one write and one
// durability wait, and indexes them. Blobs stored intact already are
// skipped. It returns one error per blob.
func (s *DiskStore) putPacked(blobs []Blob) []error {
	errs := make([]error, len(blobs))
	todo := make([]Blob, 0, len(blobs))
	var grow int64
	var touch []string
	now := time.Now()
	s.mu.Lock()
	for i, b := range blobs {
		d := b.Digest
		e, ok := s.index[d.Hash]
		if ok && e.size == d.Size && e.verified {
			touch = s.useLocked(e, now, touch)
			continue
		}
		if s.maxSize > 0 {
			// Room is made blob by blob, so that what fits is stored.
			need := d.Size
			if ok {
				need = max(d.Size-e.size, 0)
			}
			if d.Size > s.maxSize {
				errs[i] = fmt.Errorf("blob %s is larger than the store's size limit of %d bytes: %w", d, s.maxSize, ErrNoSpace)
				continue
			}
			if !s.evictLocked(grow + need) {
				errs[i] = fmt.Errorf("store %d bytes for blob %s: the size limit of %d bytes is taken by blobs of actions in flight: %w", d.Size, d, s.maxSize, ErrNoSpace)
				continue
			}
			grow += need
		} else {
			grow += d.Size
		}
		todo = append(todo, b)
		s.pending[d.Hash]++ // keeps a copy this replaces from eviction
	}
	s.reserved += grow
	s.mu.Unlock()
	s.touchFiles(touch, now)
	if len(todo) == 0 {
		return errs
	}

	p, offs, err := s.appendRecords(todo)
	if err != nil {
		p = nil // nothing was written
	} else {
		err = s.packDurable(p)
		if err != nil {
			err = s.spaceErr(fmt.Errorf("sync pack %s: %w", p.path, err))
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	s.reserved -= grow
	for i, b := range todo {
		h := b.Digest.Hash
		if s.pending[h]--; s.pending[h] <= 0 {
			delete(s.pending, h)
		}
		if err != nil {
			if p != nil { // written, but not durable: never acknowledged
				s.deadLocked(p, offs[i], b.Digest.Size)
			}
			continue
		}
		e, ok := s.index[h]
		switch {
		case !ok:
			e = &entry{hash: h, size: b.Digest.Size, diskTime: now, verified: true, pk: p, pkOff: offs[i]}
			e.elem = s.lru.PushFront(e)
			s.index[h] = e
			s.size += b.Digest.Size
		case e.size == b.Digest.Size && e.verified:
			s.deadLocked(p, offs[i], b.Digest.Size) // stored meanwhile by another upload
			s.lru.MoveToFront(e.elem)
		case e.file && s.pending[h] > 0:
			// Another upload is placing a verified file for the same
			// blob right now; its copy wins.
			s.deadLocked(p, offs[i], b.Digest.Size)
		default:
			// Replaces a copy not known good (loaded unhashed, or of the
			// wrong size): its record is dead, its file removed, so
			// nothing but the new record can be found under d.
			if e.pk != nil {
				s.deadEntryLocked(e)
			}
			if e.file {
				os.Remove(s.blobPath(h))
				os.Remove(filepath.Join(s.execDir, h))
			}
			s.size += b.Digest.Size - e.size
			e.size, e.verified, e.diskTime, e.pk, e.pkOff, e.file = b.Digest.Size, true, now, p, offs[i], false
			s.lru.MoveToFront(e.elem)
		}
	}
	if p != nil {
		s.indexedLocked(p)
	}
	if err != nil {
		for i, b := range blobs {
			if e := s.index[b.Digest.Hash]; errs[i] == nil && (e == nil || !e.verified) {
				errs[i] = err
			}
		}
	}
	return errs
}

// packedLoc returns where d's record is, if it has one.
func (s *DiskStore) packedLoc(d Digest) (*pack, int64, bool) {
	p, off, _, ok := s.packedEntry(d)
	return p, off, ok
}

// packedEntry is packedLoc that also says whether the blob is verified.
func (s *DiskStore) packedEntry(d Digest) (p *pack, off int64, verified, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, found := s.index[d.Hash]
	if !found || e.size != d.Size || e.pk == nil {
		return nil, 0, false, false
	}
	return e.pk, e.pkOff, e.verified, true
}

// readPacked reads and hashes d's record. ok is false when d has no
// record (any more); a record that does not match is quarantined and the
// error wraps ErrCorrupt.
func (s *DiskStore) readPacked(d Digest) (data []byte, ok bool, err error) {
	// A compaction may close the pack between the look-up and the read:
	// then the record has moved, and the look-up is repeated.
	for try := 0; try < 3; try++ {
		p, off, verified, found := s.packedEntry(d)
		if !found {
			return nil, false, nil
		}
		data = make([]byte, d.Size)
		if n, err := p.f.ReadAt(data, off); err != nil {
			if errors.Is(err, os.ErrClosed) {
				continue
			}
			if errors.Is(err, io.EOF) {
				return nil, true, s.corruptPacked(d, p, off, data[:n], fmt.Sprintf("its pack record is cut short at %d bytes", n))
			}
			return nil, true, fmt.Errorf("read blob %s from pack %s: %w", d, p.path, err)
		}
		if got := sha256.Sum256(data); hex.EncodeToString(got[:]) != d.Hash {
			return nil, true, s.corruptPacked(d, p, off, data, "its pack record hashes to "+hex.EncodeToString(got[:]))
		}
		if !verified {
			s.markVerified(d.Hash)
		}
		return data, true, nil
	}
	return nil, false, nil
}

// corruptPacked quarantines d's pack record at (p, off), whose bytes were
// bad, and returns the error for the reader that found it bad: the record
// is dead, and a copy of bad goes to QuarantineDir for an operator to
// inspect, as a bad file would.
func (s *DiskStore) corruptPacked(d Digest, p *pack, off int64, bad []byte, why string) error {
	s.mu.Lock()
	e, ok := s.index[d.Hash]
	if !ok || e.pk != p || e.pkOff != off {
		s.mu.Unlock()
		return &corruptError{fmt.Sprintf("blob %s: %s: %s; it has been replaced since", d, ErrCorrupt, why)}
	}
	if e.file {
		// The file is another copy; it is hashed before it is trusted.
		s.deadEntryLocked(e)
		e.pk, e.verified = nil, false
	} else {
		s.dropLocked(e)
	}
	s.quarantined++
	hooks := s.onQuarantine
	s.mu.Unlock()
	qdir := filepath.Join(s.dir, QuarantineDir)
	q := ""
	err := os.MkdirAll(qdir, 0o755)
	var f *os.File
	if err == nil {
		f, err = s.createTemp("quarantine")
	}
	if err == nil {
		_, err = f.Write(bad)
		f.Close()
		if err == nil {
			q, err = quarantine(f.Name(), qdir, d.Hash)
		}
		if err != nil {
			os.Remove(f.Name())
		}
	}
	s.log.Warn("corrupt blob in a pack dropped; clients will upload it again", "digest", d.String(), "reason", why, "pack", p.path, "copied_to", q, "err", err)
	for _, h := range hooks {
		h(d)
	}
	return &corruptError{fmt.Sprintf("blob %s: %s: %s; it was quarantined and is missing now: upload it again", d, ErrCorrupt, why)}
}

// materialize gives the packed blob d a file of its own at its blob path,
// for callers that need a path (hardlinked input roots). The record stays
// where it is; ok is false when d is not packed-only.
func (s *DiskStore) materialize(d Digest) (ok bool, err error) {
	s.mu.Lock()
	e, found := s.index[d.Hash]
	if !found || e.size != d.Size || e.pk == nil || e.file {
		s.mu.Unlock()
		return false, nil
	}
	s.pending[d.Hash]++ // no eviction while the file is made
	s.mu.Unlock()
	release := func() {
		if s.pending[d.Hash]--; s.pending[d.Hash] <= 0 {
			delete(s.pending, d.Hash)
		}
	}
	data, packed, err := s.readPacked(d)
	if !packed && err == nil {
		// Its record went meanwhile (replaced by a file upload): nothing
		// to make.
		s.mu.Lock()
		release()
		s.mu.Unlock()
		return false, nil
	}
	var t tempFile
	if err == nil {
		t, err = s.writeTemp(d, data, false)
	}
	if err == nil {
		if t.f != nil {
			err = linkAnon(t.f, s.blobPath(d.Hash))
		} else {
			err = syscall.Rename(t.name, s.blobPath(d.Hash))
			if err == nil {
				t.name = ""
			}
		}
		if errors.Is(err, syscall.EEXIST) {
			err = nil // materialized concurrently
		}
		t.close()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	release()
	if err != nil {
		return true, s.spaceErr(fmt.Errorf("give packed blob %s a file: %w", d, err))
	}
	if e, ok := s.index[d.Hash]; ok && e.size == d.Size {
		e.file = true
		return true, nil
	}
	// Quarantined meanwhile: the file must not outlive its entry.
	os.Remove(s.blobPath(d.Hash))
	return true, fmt.Errorf("blob %s: %w", d, ErrNotFound)
}

// OpenSpan returns a new close-on-exec descriptor of a local file and the
// offset at which d's bytes start in it: the blob's own file (opened
// read-only), or its pack (a duplicate of the store's own descriptor, so
// open for writing too: callers only read, at most d.Size bytes from off).
// The caller closes it. The descriptor reads d's bytes for as long as it
// is open, whatever happens to the store meanwhile.
func (s *DiskStore) OpenSpan(d Digest) (fd int, off int64, err error) {
	if err := d.Validate(); err != nil {
		return -1, 0, err
	}
	for try := 0; try < 3; try++ {
		p, off, packed := s.packedLoc(d)
		if !packed {
			break
		}
		fd := -1
		cerr := controlFile(p.f, func(raw int) {
			fd, err = unix.FcntlInt(uintptr(raw), unix.F_DUPFD_CLOEXEC, 0)
		})
		if cerr != nil {
			continue // compacted away meanwhile
		}
		if err != nil {
			return -1, 0, fmt.Errorf("open pack of blob %s: %w", d, err)
		}
		return fd, off, nil
	}
	p, err := s.LocalPath(context.Background(), d, false)
	if err != nil {
		return -1, 0, err
	}
	for {
		fd, err = unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				s.forget(d.Hash)
				return -1, 0, fmt.Errorf("blob %s: %w", d, ErrNotFound)
			}
			return -1, 0, &os.PathError{Op: "open", Path: p, Err: err}
		}
		return fd, 0, nil
	}
}

// controlFile runs fn with f's descriptor, which stays open meanwhile; it
// fails if f is closed.
func controlFile(f *os.File, fn func(fd int)) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(func(fd uintptr) { fn(int(fd)) })
}

// WaitCompactions returns once no pack is being compacted or waiting for
// it (after an Evict, for tools that exit right after).
func (s *DiskStore) WaitCompactions() {
	for {
		s.mu.Lock()
		busy := s.compactorRunning
		s.mu.Unlock()
		if !busy {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// compactor compacts queued packs until none is left.
func (s *DiskStore) compactor() {
	for {
		s.mu.Lock()
		if len(s.compactQueue) == 0 {
			s.compactorRunning = false
			s.mu.Unlock()
			return
		}
		p := s.compactQueue[0]
		s.compactQueue = s.compactQueue[1:]
		s.mu.Unlock()
		s.mu.Lock()
		closing := s.closing
		s.mu.Unlock()
		if closing {
			continue // the store is closing: left for the next start
		}
		if err := s.compact(p); err != nil {
			s.log.Warn("CAS: cannot compact pack; its dead records stay until the next try", "pack", p.path, "err", err)
			s.mu.Lock()
			p.compacting = false
			s.mu.Unlock()
		}
	}
}

// compact moves the live records of the sealed pack p to the current pack
// and removes p.
func (s *DiskStore) compact(p *pack) error {
	start := time.Now()
	type move struct {
		d   Digest
		off int64
	}
	var moves []move
	s.mu.Lock()
	for _, e := range s.index {
		if e.pk != p {
			continue
		}
		// Moved even when the blob has a file too: that file is a copy
		// made for a path, never synced.
		moves = append(moves, move{Digest{Hash: e.hash, Size: e.size}, e.pkOff})
	}
	s.mu.Unlock()
	sort.Slice(moves, func(i, j int) bool { return moves[i].off < moves[j].off })

	// Records move as they are, unhashed: each keeps its verified mark
	// (a record not hashed since the start is hashed before use wherever
	// it lies, and every read hashes), so compaction, which also merges
	// an earlier run's pack right after a start, adds no hashing and
	// quarantines nothing in the background.
	var blobs []Blob
	var from []int64
	for _, m := range moves {
		data := make([]byte, m.d.Size)
		if _, err := p.f.ReadAt(data, m.off); err != nil {
			return fmt.Errorf("read %s: %w", m.d, err)
		}
		blobs = append(blobs, Blob{m.d, data})
		from = append(from, m.off)
	}
	type placed struct {
		p    *pack
		offs []int64
	}
	var written []placed
	// On failure the copies written so far are dead; p stays as it is.
	fail := func(err error) error {
		s.mu.Lock()
		k := 0
		for _, w := range written {
			for _, off := range w.offs {
				s.deadLocked(w.p, off, blobs[k].Digest.Size)
				k++
			}
			s.indexedLocked(w.p)
		}
		s.mu.Unlock()
		return err
	}
	for i := 0; i < len(blobs); i += batchChunk {
		np, offs, err := s.appendRecords(blobs[i:min(len(blobs), i+batchChunk)])
		if err != nil {
			return fail(err)
		}
		written = append(written, placed{np, offs})
	}
	// The moved records must be durable before the only other copy goes.
	if s.durability != NoSync {
		synced := map[*pack]bool{}
		for _, w := range written {
			if !synced[w.p] {
				if err := w.p.f.Sync(); err != nil {
					return fail(fmt.Errorf("sync pack %s: %w", w.p.path, err))
				}
				synced[w.p] = true
			}
		}
		if err := fsyncDir(s.packDir); err != nil {
			return fail(err)
		}
	}
	s.mu.Lock()
	k := 0
	for _, w := range written {
		for _, off := range w.offs {
			b := blobs[k]
			e, ok := s.index[b.Digest.Hash]
			if ok && e.pk == p && e.pkOff == from[k] {
				e.pk, e.pkOff = w.p, off
			} else {
				s.deadLocked(w.p, off, b.Digest.Size) // evicted or replaced meanwhile
			}
			k++
		}
		s.indexedLocked(w.p)
	}
	// Entries still pointing at p (none should) lose their record.
	for _, e := range s.index {
		if e.pk == p {
			if e.file {
				e.pk = nil
			} else {
				s.dropLocked(e)
			}
		}
	}
	delete(s.packs, p.id)
	s.packDead -= p.dead
	s.mu.Unlock()
	if err := os.Remove(p.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("CAS: cannot remove compacted pack", "pack", p.path, "err", err)
	}
	p.f.Close()
	s.log.Info("CAS: compacted pack", "pack", p.path, "moved_blobs", len(blobs), "reclaimed_bytes", p.end-recordsBytes(blobs), "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// writeSynced writes b to a new file at name and syncs it.
func writeSynced(name string, b []byte) error {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(name)
	}
	return err
}

func recordsBytes(blobs []Blob) int64 {
	var n int64
	for _, b := range blobs {
		n += recordSize(b.Digest.Size)
	}
	return n
}

// packWriter is a ByteStream upload of a blob that goes to a pack: the
// bytes are kept in memory (at most PackMaxBlob) until Commit.
type packWriter struct {
	s    *DiskStore
	d    Digest
	buf  []byte
	done bool
}

func (w *packWriter) Written() int64 { return int64(len(w.buf)) }

func (w *packWriter) Write(p []byte) (int, error) {
	if w.done {
		return 0, fmt.Errorf("blob %s: write after the upload ended", w.d)
	}
	if int64(len(w.buf)+len(p)) > w.d.Size {
		return 0, fmt.Errorf("blob %s: more than %d bytes written: %w", w.d, w.d.Size, ErrDigestMismatch)
	}
	w.buf = append(w.buf, p...)
	return len(p), nil
}

func (w *packWriter) Commit() error {
	if w.done {
		return fmt.Errorf("blob %s: commit after the upload ended", w.d)
	}
	w.done = true
	if int64(len(w.buf)) != w.d.Size {
		return fmt.Errorf("blob %s: got %d bytes, want %d: %w", w.d, len(w.buf), w.d.Size, ErrDigestMismatch)
	}
	if got := DigestOf(w.buf); got != w.d {
		return fmt.Errorf("blob %s: data hashes to %s: %w", w.d, got.Hash, ErrDigestMismatch)
	}
	return w.s.putPacked([]Blob{{w.d, w.buf}})[0]
}

func (w *packWriter) Abort() { w.done = true; w.buf = nil }

// stopCompactions lets a compaction in progress finish and starts no
// other (Close).
func (s *DiskStore) stopCompactions() {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	s.WaitCompactions()
}

// closePacks closes the pack descriptors (Close, at the very end).
func (s *DiskStore) closePacks() {
	s.packMu.Lock()
	s.active = nil
	s.packMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.packs {
		p.f.Close()
	}
}
