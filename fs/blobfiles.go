package fs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/internal/lru"
)

// blobFiles keeps CAS blob files open for reads, shared by all mounts: a
// blob is opened once however many handles (and actions) read it, and up
// to max unused files stay open for the next action. A cached file stays
// readable even if the store evicts the blob meanwhile (content is
// addressed by hash, so it cannot be stale), except when the store finds
// the file no longer matches its digest: then the store quarantines it and
// tells us (dropQuarantined), so a re-uploaded blob is opened afresh
// instead of reading the bad file through a cached descriptor.
type blobFiles struct {
	store cas.LocalStore
	max   int

	mu    sync.Mutex
	files map[cas.Digest]*blobFile
	idle  lru.Cache[cas.Digest, *blobFile] // the files with refs == 0; cost 1 each
}

// blobFile is an open blob. Its descriptor is a raw one, not an *os.File:
// os.Open tries (and fails) to register a regular file with the runtime's
// poller, three system calls more per opened input, which is a tenth of
// what serving a small input costs. The descriptor is closed only once no
// handle refers to it (refs), and the kernel releases a handle only after
// its reads were answered, so no read can use a closed (or reused) one.
type blobFile struct {
	d    cas.Digest
	fd   int
	base int64 // where the blob starts in the file: a pack holds many
	refs int
	gone bool // quarantined: close when the last user releases it
}

// readAt reads len(p) bytes at off, fewer only at the end of the blob
// (then with io.EOF, as os.File.ReadAt). It never reads past the blob's
// size: in a pack, the next blob follows.
func (bf *blobFile) readAt(p []byte, off int64) (int, error) {
	if off >= bf.d.Size {
		return 0, io.EOF
	}
	var short error
	if rest := bf.d.Size - off; int64(len(p)) > rest {
		p, short = p[:rest], io.EOF
	}
	done := 0
	for done < len(p) {
		n, err := unix.Pread(bf.fd, p[done:], bf.base+off+int64(done))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return done, &os.PathError{Op: "read", Path: "blob " + bf.d.String(), Err: err}
		}
		if n == 0 {
			return done, io.EOF
		}
		done += n
	}
	return done, short
}

func (bf *blobFile) close() { unix.Close(bf.fd) }

func newBlobFiles(store cas.LocalStore, max int) *blobFiles {
	b := &blobFiles{store: store, max: max, files: make(map[cas.Digest]*blobFile)}
	if q, ok := store.(interface{ OnQuarantine(func(cas.Digest)) }); ok {
		q.OnQuarantine(b.dropQuarantined)
	}
	return b
}

// dropQuarantined forgets the open file of d, which the store found bad.
func (b *blobFiles) dropQuarantined(d cas.Digest) {
	b.mu.Lock()
	defer b.mu.Unlock()
	bf, ok := b.files[d]
	if !ok {
		return
	}
	delete(b.files, d)
	if bf.refs == 0 {
		b.idle.Remove(d)
		bf.close()
		return
	}
	bf.gone = true
}

// acquire returns the open blob file for d; release it when done.
func (b *blobFiles) acquire(d cas.Digest) (*blobFile, error) {
	b.mu.Lock()
	if bf, ok := b.files[d]; ok {
		b.use(bf)
		b.mu.Unlock()
		return bf, nil
	}
	b.mu.Unlock()
	fd, base, err := b.open(d)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if bf, ok := b.files[d]; ok { // opened concurrently
		unix.Close(fd)
		b.use(bf)
		return bf, nil
	}
	bf := &blobFile{d: d, fd: fd, base: base, refs: 1}
	b.files[d] = bf
	return bf, nil
}

// release gives back a file from acquire.
func (b *blobFiles) release(bf *blobFile) {
	b.mu.Lock()
	defer b.mu.Unlock()
	bf.refs--
	if bf.refs > 0 {
		return
	}
	if bf.gone {
		bf.close()
		return
	}
	b.idle.Add(bf.d, bf, 1)
	b.idle.TrimTo(int64(b.max), b.closeIdleFile)
}

// use counts a new user of bf, which is no longer idle. Called with b.mu
// held.
func (b *blobFiles) use(bf *blobFile) {
	if bf.refs == 0 {
		b.idle.Remove(bf.d)
	}
	bf.refs++
}

// closeIdleFile closes an idle file evicted from b.idle. Called with b.mu
// held.
func (b *blobFiles) closeIdleFile(d cas.Digest, bf *blobFile) {
	delete(b.files, d)
	bf.close()
}

// spanOpener is implemented by stores that keep some blobs inside larger
// files (cas.DiskStore's packs): it opens the file holding d and says
// where in it d starts.
type spanOpener interface {
	OpenSpan(d cas.Digest) (fd int, off int64, err error)
}

// open opens d for reading: where it is, when the store can say, or its
// local file (which a packed blob gets on demand).
func (b *blobFiles) open(d cas.Digest) (fd int, base int64, err error) {
	if so, ok := b.store.(spanOpener); ok {
		return so.OpenSpan(d)
	}
	p, err := b.store.BlobPath(d, false)
	if err != nil {
		return -1, 0, err
	}
	fd, err = openBlob(p)
	if err != nil {
		return -1, 0, fmt.Errorf("open blob %s: %w", d, err)
	}
	return fd, 0, nil
}

// openBlob opens a blob file for reading.
func openBlob(path string) (int, error) {
	for {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return -1, &os.PathError{Op: "open", Path: path, Err: err}
		}
		return fd, nil
	}
}

// closeIdle closes every file nobody uses.
func (b *blobFiles) closeIdle() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.idle.TrimTo(0, b.closeIdleFile)
}
