//go:build linux

package fs

// Permission checks. The mount has no default_permissions (requests to
// change inputs must reach the server so they can be reported), so the
// server checks the caller's permissions itself, as the kernel would.

import (
	"context"
	"os"
	"syscall"

	"github.com/jacobsa/fuse"
	"github.com/jacobsa/fuse/fuseops"
)

// Permission bits asked of allowed.
const (
	wantR = 4
	wantW = 2
	wantX = 1
)

const specialBits = os.ModeSetuid | os.ModeSetgid | os.ModeSticky

// creds returns the caller's uid and gid.
func creds(ctx context.Context, oc fuseops.OpContext) (uid, gid uint32) {
	// GetFuseContext only reads the request header from ctx.
	if u, g, _, err := (&fuse.MountedFileSystem{}).GetFuseContext(ctx); err == nil {
		return u, g
	}
	return oc.Uid, oc.Uid
}

// allowed checks the caller's permission on n like generic_permission,
// which the kernel does not do for us (no default_permissions: requests to
// change inputs must reach this server so they can be reported).
func allowed(n *node, uid, gid uint32, want uint32) bool {
	if uid == 0 {
		return true
	}
	perm := uint32(n.mode.Perm())
	switch {
	case uid == n.uid:
		perm >>= 6
	case gid == n.gid:
		perm >>= 3
	}
	return perm&want == want
}

// stickyDenied is the sticky-directory rule for removing or renaming child.
func stickyDenied(dir, child *node, uid uint32) bool {
	return uid != 0 && dir.mode&os.ModeSticky != 0 && uid != dir.uid && uid != child.uid
}

// newEntryCheck checks that name may be created in p by the caller.
func (afs *actionFS) newEntryCheck(ctx context.Context, p *node, name string, uid, gid uint32) error {
	if afs.lower {
		return syscall.EROFS
	}
	c, err := afs.child(ctx, p, name)
	if err != nil {
		return err
	}
	if c != nil {
		return syscall.EEXIST
	}
	if !allowed(p, uid, gid, wantW|wantX) {
		return syscall.EACCES
	}
	return nil
}

// mayRemove checks that the caller may remove child from dir: write and
// search permission on dir (EACCES), and the sticky-directory rule (EPERM).
func mayRemove(dir, child *node, uid, gid uint32) error {
	if !allowed(dir, uid, gid, wantW|wantX) {
		return syscall.EACCES
	}
	if stickyDenied(dir, child, uid) {
		return syscall.EPERM
	}
	return nil
}
