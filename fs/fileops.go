//go:build linux

package fs

// File ops: attributes, opening, reading and writing files, and symlinks.
// Input files are served from CAS blob files; staged files from their
// backing files in the mount's stage directory.

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/jacobsa/fuse"
	"github.com/jacobsa/fuse/fuseops"
	"golang.org/x/sys/unix"
)

// newBacking creates the file holding a staged file's bytes.
func (afs *actionFS) newBacking() (string, *os.File, error) {
	if !afs.stageMade {
		if err := os.MkdirAll(afs.stage, 0o700); err != nil {
			afs.log.Warn("actiondfs: create stage directory", "dir", afs.stage, "err", err)
			return "", nil, syscall.EIO
		}
		afs.stageMade = true
	}
	afs.nBacking++
	p := filepath.Join(afs.stage, strconv.FormatUint(afs.nBacking, 10))
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		afs.log.Warn("actiondfs: create staged file", "path", p, "err", err)
		return "", nil, errnoOf(err)
	}
	return p, f, nil
}

// SetInodeAttributes serves the op. Input files and
// symlinks never change; input directories may change mode, owner and
// times (their entries stay immutable).
func (afs *actionFS) SetInodeAttributes(ctx context.Context, op *fuseops.SetInodeAttributesOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	n := afs.nodes[op.Inode]
	if n == nil {
		return syscall.ENOENT
	}
	if afs.lower {
		return syscall.EROFS
	}
	if n.input && n.kind != kindDir {
		what := "set times of"
		switch {
		case op.Size != nil:
			what = "truncate"
		case op.Mode != nil:
			what = "chmod"
		case op.Uid != nil || op.Gid != nil:
			what = "chown"
		}
		return afs.refuse(what, pathOf(n))
	}
	uid, gid := creds(ctx, op.OpContext)
	owner := uid == 0 || uid == n.uid
	if op.Size != nil {
		switch {
		case n.kind == kindDir:
			return syscall.EISDIR
		case n.kind != kindFile:
			return syscall.EINVAL
		case op.Handle == nil && !allowed(n, uid, gid, wantW):
			return syscall.EACCES
		}
	}
	if op.Mode != nil && !owner {
		return syscall.EPERM
	}
	if op.Uid != nil && *op.Uid != n.uid && uid != 0 {
		return syscall.EPERM
	}
	if op.Gid != nil && *op.Gid != n.gid && !(uid == 0 || (uid == n.uid && *op.Gid == gid)) {
		return syscall.EPERM
	}
	if (op.Atime != nil || op.Mtime != nil) && !owner && !allowed(n, uid, gid, wantW) {
		return syscall.EPERM
	}
	now := time.Now()
	n.changed = n.changed || n.input
	if op.Size != nil {
		var err error
		if n.f != nil {
			err = n.f.Truncate(int64(*op.Size))
		} else {
			err = os.Truncate(n.backing, int64(*op.Size))
		}
		if err != nil {
			return errnoOf(err)
		}
		n.size, n.mtime, n.ctime = int64(*op.Size), now, now
	}
	if op.Mode != nil {
		n.mode = n.mode&os.ModeType | *op.Mode&(os.ModePerm|specialBits)
		n.ctime = now
	}
	if op.Uid != nil {
		n.uid, n.ctime = *op.Uid, now
	}
	if op.Gid != nil {
		n.gid, n.ctime = *op.Gid, now
	}
	if op.Atime != nil {
		n.atime, n.ctime = *op.Atime, now
	}
	if op.Mtime != nil {
		n.mtime, n.ctime = *op.Mtime, now
	}
	a, err := afs.attrs(ctx, n)
	op.Attributes, op.AttributesExpiration = a, afs.expire
	return err
}

// OpenFile serves the op. Inputs open read-only; asking
// for more is refused.
func (afs *actionFS) OpenFile(ctx context.Context, op *fuseops.OpenFileOp) error {
	flags := uint32(op.OpenFlags)
	acc := flags & unix.O_ACCMODE
	afs.mu.Lock()
	n := afs.nodes[op.Inode]
	switch {
	case n == nil:
		afs.mu.Unlock()
		return syscall.ENOENT
	case n.kind == kindDir:
		afs.mu.Unlock()
		return syscall.EISDIR
	case n.input:
		var err error
		if acc != unix.O_RDONLY {
			err = afs.refuse("open for writing", pathOf(n))
		} else if flags&unix.O_TRUNC != 0 {
			err = afs.refuse("truncate", pathOf(n))
		}
		afs.mu.Unlock()
		if err != nil {
			return err
		}
		h := &handle{n: n}
		if n.digest.Size > 0 {
			bf, err := afs.blobs.acquire(n.digest)
			if err != nil {
				afs.log.Warn("actiondfs: open input", "path", pathOf(n), "digest", n.digest.String(), "err", err)
				return syscall.EIO
			}
			h.blob = bf
		}
		afs.mu.Lock()
		op.Handle = afs.newHandle(h)
		prefill := h.blob != nil && !n.prefilled && n.digest.Size <= maxPrefill && afs.dev >= 0 && storeZeroesTail()
		n.prefilled = n.prefilled || prefill
		afs.mu.Unlock()
		if prefill {
			afs.prefill(n.id, h.blob)
		}
		op.KeepPageCache = true
		return nil
	case n.kind != kindFile:
		afs.mu.Unlock()
		return syscall.EINVAL
	}
	defer afs.mu.Unlock()
	uid, gid := creds(ctx, op.OpContext)
	want := uint32(0)
	if acc == unix.O_RDONLY || acc == unix.O_RDWR {
		want |= wantR
	}
	if acc == unix.O_WRONLY || acc == unix.O_RDWR || flags&unix.O_TRUNC != 0 {
		want |= wantW
	}
	if !allowed(n, uid, gid, want) {
		return syscall.EACCES
	}
	if n.f == nil {
		f, err := os.OpenFile(n.backing, os.O_RDWR, 0)
		if err != nil {
			afs.log.Warn("actiondfs: open staged file", "path", pathOf(n), "err", err)
			return errnoOf(err)
		}
		n.f = f
	}
	n.opens++
	if flags&unix.O_TRUNC != 0 && n.size != 0 {
		if err := n.f.Truncate(0); err != nil {
			return errnoOf(err)
		}
		now := time.Now()
		n.size, n.mtime, n.ctime = 0, now, now
	}
	op.Handle = afs.newHandle(&handle{n: n})
	op.KeepPageCache = true
	return nil
}

// ReadFile serves the op.
func (afs *actionFS) ReadFile(ctx context.Context, op *fuseops.ReadFileOp) error {
	afs.mu.Lock()
	h := afs.handles[op.Handle]
	var readAt func([]byte, int64) (int, error)
	if h != nil {
		if h.blob != nil {
			readAt = h.blob.readAt
		} else if h.n.f != nil {
			readAt = h.n.f.ReadAt
		}
	}
	afs.mu.Unlock()
	if h == nil {
		return syscall.EBADF
	}
	if readAt == nil { // the empty blob
		return nil
	}
	dst := op.Dst
	var pooled *[]byte
	if int64(len(dst)) < op.Size {
		// Larger than the request buffer: a pooled buffer, given back once
		// the reply is sent.
		pooled = readBufs.Get().(*[]byte)
		dst = (*pooled)[:min(op.Size, int64(len(*pooled)))]
	}
	n, err := readAt(dst, op.Offset)
	if err != nil && err != io.EOF {
		if pooled != nil {
			readBufs.Put(pooled)
		}
		afs.log.Warn("actiondfs: read", "path", pathOf(h.n), "err", err)
		return errnoOf(err)
	}
	op.BytesRead = n
	if pooled != nil {
		op.Data = [][]byte{dst[:n]}
		op.Callback = func() { readBufs.Put(pooled) }
	}
	return nil
}

// readBufs holds buffers for reads larger than the request buffer.
var readBufs = sync.Pool{New: func() any {
	b := make([]byte, maxReadBuf)
	return &b
}}

// maxReadBuf bounds a read reply (the kernel asks for at most max_pages).
const maxReadBuf = 1 << 20

// WriteFile serves the op (staged files only: inputs are
// never open for writing).
func (afs *actionFS) WriteFile(ctx context.Context, op *fuseops.WriteFileOp) error {
	afs.mu.Lock()
	h, err := afs.stagedHandle(op.Handle)
	if err != nil {
		afs.mu.Unlock()
		return err
	}
	n := h.n
	f := n.f
	afs.mu.Unlock()
	if _, err := f.WriteAt(op.Data, op.Offset); err != nil {
		return errnoOf(err)
	}
	afs.mu.Lock()
	if end := op.Offset + int64(len(op.Data)); end > n.size {
		n.size = end
	}
	now := time.Now()
	n.mtime, n.ctime = now, now
	afs.mu.Unlock()
	return nil
}

// stagedHandle returns the handle id of a staged file open for writing
// (EBADF for anything else: inputs are never open for writing). Called
// with afs.mu held.
func (afs *actionFS) stagedHandle(id fuseops.HandleID) (*handle, error) {
	h := afs.handles[id]
	if h == nil || h.n.input || h.n.f == nil {
		return nil, syscall.EBADF
	}
	return h, nil
}

// Fallocate serves the op.
func (afs *actionFS) Fallocate(ctx context.Context, op *fuseops.FallocateOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	h, err := afs.stagedHandle(op.Handle)
	if err != nil {
		return err
	}
	if err := unix.Fallocate(int(h.n.f.Fd()), op.Mode, int64(op.Offset), int64(op.Length)); err != nil {
		return errnoOf(err)
	}
	if fi, err := h.n.f.Stat(); err == nil {
		h.n.size = fi.Size()
	}
	return nil
}

// SyncFile serves the op. Staged files are moved into the CAS (which
// syncs what it keeps) or thrown away: nothing to do. ENOSYS tells the
// kernel so once (fsync then succeeds without asking).
func (afs *actionFS) SyncFile(ctx context.Context, op *fuseops.SyncFileOp) error { return fuse.ENOSYS }

// FlushFile serves the op: writes reach the server synchronously, so there
// is nothing to flush. ENOSYS makes the kernel stop sending a FLUSH with
// every close(2), a round trip per closed file.
func (afs *actionFS) FlushFile(ctx context.Context, op *fuseops.FlushFileOp) error {
	return fuse.ENOSYS
}

// SyncFS serves the op.
func (afs *actionFS) SyncFS(ctx context.Context, op *fuseops.SyncFSOp) error { return nil }

// ReleaseFileHandle serves the op.
func (afs *actionFS) ReleaseFileHandle(ctx context.Context, op *fuseops.ReleaseFileHandleOp) error {
	afs.mu.Lock()
	h := afs.handles[op.Handle]
	delete(afs.handles, op.Handle)
	if h != nil && h.blob == nil && !h.n.input {
		n := h.n
		if n.opens--; n.opens == 0 && n.f != nil {
			n.f.Close()
			n.f = nil
		}
	}
	afs.mu.Unlock()
	if h != nil && h.blob != nil {
		afs.blobs.release(h.blob)
	}
	return nil
}

// ReadSymlink serves the op.
func (afs *actionFS) ReadSymlink(ctx context.Context, op *fuseops.ReadSymlinkOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	n := afs.nodes[op.Inode]
	if n == nil || n.kind != kindSymlink {
		return syscall.EINVAL
	}
	op.Target = n.target
	return nil
}
