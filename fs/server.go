//go:build linux

package fs

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"syscall"

	"github.com/jacobsa/fuse"
	"github.com/jacobsa/fuse/fuseops"
)

// server serves one mount's connection. It is fuseutil's server except
// that a failed read from /dev/fuse (an aborted connection, say) ends this
// mount's service instead of panicking the whole process.
type server struct {
	fs  *actionFS
	log *slog.Logger
}

// ServeOps implements fuse.Server.
func (s *server) ServeOps(c *fuse.Connection) {
	var inFlight sync.WaitGroup
	defer func() {
		inFlight.Wait()
		s.fs.Destroy()
	}()
	for {
		ctx, op, err := c.ReadOp()
		if err == io.EOF {
			return
		}
		if err != nil {
			s.log.Warn("actiondfs: connection failed", "err", err)
			return
		}
		if fop, ok := op.(*fuseops.ForgetInodeOp); ok { // cheap, and they come in floods
			s.fs.ForgetInode(ctx, fop)
			c.Reply(ctx, nil)
			continue
		}
		if !mayBlock(op) {
			// Served on this goroutine: handing a quick op to a new
			// goroutine while this one blocks reading /dev/fuse costs a
			// scheduler round trip, which on a busy machine is most of
			// the op's latency.
			c.Reply(ctx, s.handle(ctx, op))
			continue
		}
		inFlight.Go(func() { c.Reply(ctx, s.handle(ctx, op)) })
	}
}

// mayBlock reports whether op may take long enough (reading much file
// data, allocating or syncing) that other requests of the mount should not
// wait for it. Everything else, writes included, touches the page cache
// or memory only.
func mayBlock(op any) bool {
	switch op := op.(type) {
	case *fuseops.ReadFileOp:
		return op.Size > 64<<10
	case *fuseops.FallocateOp, *fuseops.SyncFileOp, *fuseops.SyncFSOp:
		return true
	}
	return false
}

func (s *server) handle(ctx context.Context, op any) error {
	afs := s.fs
	switch op.(type) {
	case *fuseops.BatchForgetOp, *fuseops.ReleaseFileHandleOp, *fuseops.ReleaseDirHandleOp:
		// Bookkeeping, whoever sends it.
	default:
		// Only root and the action's user: other local users must neither
		// see the tree nor leave anything in the kernel's caches.
		if uid, _, _, err := (&fuse.MountedFileSystem{}).GetFuseContext(ctx); err != nil || !afs.serves(uid) {
			return syscall.EACCES
		}
	}
	switch op := op.(type) {
	case *fuseops.LookUpInodeOp:
		return afs.LookUpInode(ctx, op)
	case *fuseops.GetInodeAttributesOp:
		return afs.GetInodeAttributes(ctx, op)
	case *fuseops.SetInodeAttributesOp:
		return afs.SetInodeAttributes(ctx, op)
	case *fuseops.BatchForgetOp:
		return afs.BatchForget(ctx, op)
	case *fuseops.MkDirOp:
		return afs.MkDir(ctx, op)
	case *fuseops.MkNodeOp:
		return afs.MkNode(ctx, op)
	case *fuseops.CreateFileOp:
		return afs.CreateFile(ctx, op)
	case *fuseops.CreateLinkOp:
		return afs.CreateLink(ctx, op)
	case *fuseops.CreateSymlinkOp:
		return afs.CreateSymlink(ctx, op)
	case *fuseops.RenameOp:
		return afs.Rename(ctx, op)
	case *fuseops.RmDirOp:
		return afs.RmDir(ctx, op)
	case *fuseops.UnlinkOp:
		return afs.Unlink(ctx, op)
	case *fuseops.OpenDirOp:
		return afs.OpenDir(ctx, op)
	case *fuseops.ReadDirOp:
		return afs.ReadDir(ctx, op)
	case *fuseops.ReleaseDirHandleOp:
		return afs.ReleaseDirHandle(ctx, op)
	case *fuseops.OpenFileOp:
		return afs.OpenFile(ctx, op)
	case *fuseops.ReadFileOp:
		return afs.ReadFile(ctx, op)
	case *fuseops.WriteFileOp:
		return afs.WriteFile(ctx, op)
	case *fuseops.SyncFileOp:
		return afs.SyncFile(ctx, op)
	case *fuseops.FlushFileOp:
		return afs.FlushFile(ctx, op)
	case *fuseops.ReleaseFileHandleOp:
		return afs.ReleaseFileHandle(ctx, op)
	case *fuseops.ReadSymlinkOp:
		return afs.ReadSymlink(ctx, op)
	case *fuseops.FallocateOp:
		return afs.Fallocate(ctx, op)
	case *fuseops.SyncFSOp:
		return afs.SyncFS(ctx, op)
	case *fuseops.StatFSOp:
		return afs.StatFS(ctx, op)
	}
	// Unknown and unsupported ops, among them FUSE_POLL and extended
	// attributes: ENOSYS makes the kernel stop asking.
	return fuse.ENOSYS
}
