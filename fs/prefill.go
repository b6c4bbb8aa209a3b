//go:build linux

package fs

// Mounting on a /dev/fuse descriptor of our own, and filling the kernel's
// page cache with small inputs as they are first opened.
//
// Serving a small input costs the reader three round trips through
// /dev/fuse when the server only answers requests: LOOKUP, OPEN and the
// READ the kernel's readahead sends, each putting the reader to sleep until
// this process has answered. The READ is the one round trip the protocol
// lets the server avoid: FUSE_NOTIFY_STORE puts bytes into an inode's page
// cache unasked. So at the first OPEN of a small input the server stores
// the whole file before it answers, and with FOPEN_KEEP_CACHE the reader's
// read(2) finds it cached. jacobsa/fuse sends only invalidations, so the
// mount is made here, on a descriptor this package keeps, and handed to
// jacobsa/fuse as /dev/fd/N (which it then serves without mounting).
//
// Before Linux 6.11 (upstream commit 3c0da3d163eb, "fuse: Initialize
// beyond-EOF page contents before setting uptodate"; backported to some
// stable kernels, not all), a store that ends a file within a page left the
// rest of that page as the allocator gave it, and mmap(2) shows it: stale
// memory past the end of the file. So stores are made only on kernels that
// zero it (storeZeroesTail); older ones serve the READ as before.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"

	"github.com/actiond/actiond/internal/kernel"
	"github.com/jacobsa/fuse"
	"github.com/jacobsa/fuse/fuseops"
	"golang.org/x/sys/unix"
)

// maxPrefill is the largest input stored whole in the page cache at its
// first open. Larger files are read through READ requests, which the
// kernel's readahead makes large; below this, the store replaces what
// would be a single READ, so bytes a reader never asks for cost little.
const maxPrefill = 64 << 10

// Sizes of the FUSE wire structures a store notification is made of
// (include/uapi/linux/fuse.h).
const (
	outHeaderSize   = 16 // fuse_out_header: len u32, error i32, unique u64
	notifyStoreSize = 24 // fuse_notify_store_out: nodeid u64, offset u64, size u32, padding u32
	notifyCodeStore = 4  // FUSE_NOTIFY_STORE
	storeHeaderSize = outHeaderSize + notifyStoreSize
)

// storeBufs holds the buffers of store notifications (header and data).
var storeBufs = sync.Pool{New: func() any {
	b := make([]byte, storeHeaderSize+maxPrefill)
	return &b
}}

// storeZeroesTail reports whether this kernel zeroes the rest of a page a
// store notification fills up to the end of the file: from Linux 6.11 on.
// Older kernels that got the fix as a backport are not told apart from
// those that did not, and go without stores.
var storeZeroesTail = sync.OnceValue(func() bool { return kernel.AtLeast(6, 11) })

// mountFUSE mounts afs at dir (read-only if readOnly) with mount(2) on a
// new /dev/fuse descriptor, which afs keeps for notifications, and serves
// it.
func (r *InputRoot) mountFUSE(dir string, afs *actionFS, readOnly bool) (*fuse.MountedFileSystem, error) {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: "/dev/fuse", Err: err}
	}
	flags := uintptr(unix.MS_NODEV | unix.MS_NOSUID)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	// allow_other: the sandbox user must see the tree. No
	// default_permissions: the server checks permissions itself, so that
	// attempts to change inputs reach it and can be reported.
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=%d,group_id=%d,allow_other", fd, os.Getuid(), os.Getgid())
	if err := unix.Mount(r.fuseTag, dir, "fuse.actiondfs", flags, data); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mount(2): %w", err)
	}
	// Set before serving starts: the first OPEN may come at once.
	afs.dev = fd
	// jacobsa/fuse takes over the descriptor (and closes it when the
	// connection ends, or when its file is collected after a failure), so
	// it is not closed here after this point.
	mfs, err := fuse.Mount("/dev/fd/"+strconv.Itoa(fd), &server{fs: afs, log: r.log}, r.mountConfig())
	if err != nil {
		unmountDir(dir)
		return nil, err
	}
	return mfs, nil
}

// prefill stores the whole of the input file with inode id, open as bf, in
// the kernel's page cache. It must be called while answering the file's
// first OPEN, before the reply: then no READ of the file can be in flight,
// whose page lock the store would wait for while this goroutine is the one
// that would answer it.
// Failures only cost the READ the store would have saved.
func (afs *actionFS) prefill(id fuseops.InodeID, bf *blobFile) {
	size := int(bf.d.Size)
	bp := storeBufs.Get().(*[]byte)
	defer storeBufs.Put(bp)
	msg := (*bp)[:storeHeaderSize+size]
	if n, err := bf.readAt(msg[storeHeaderSize:], 0); n != size {
		afs.log.Debug("actiondfs: prefill: read input", "digest", bf.d.String(), "read", n, "err", err)
		return
	}
	ne := binary.NativeEndian
	ne.PutUint32(msg[0:], uint32(len(msg)))
	ne.PutUint32(msg[4:], notifyCodeStore)
	ne.PutUint64(msg[8:], 0) // unique: 0 marks a notification
	ne.PutUint64(msg[16:], uint64(id))
	ne.PutUint64(msg[24:], 0) // offset
	ne.PutUint32(msg[32:], uint32(size))
	ne.PutUint32(msg[36:], 0)
	for {
		_, err := unix.Write(afs.dev, msg)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			afs.log.Debug("actiondfs: prefill: store notification", "inode", id, "err", err)
		}
		return
	}
}
