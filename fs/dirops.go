//go:build linux

package fs

// Directory ops: creating, linking, renaming and removing entries, and
// listing directories.

import (
	"context"
	"os"
	"slices"
	"syscall"
	"time"

	"github.com/jacobsa/fuse/fuseops"
	"github.com/jacobsa/fuse/fuseutil"
	"golang.org/x/sys/unix"
)

// addStaged links a new node into p.
func (afs *actionFS) addStaged(p *node, name string, n *node, uid, gid uint32) {
	now := time.Now()
	setTimes(n, now)
	n.parent, n.name, n.uid, n.gid = p, name, uid, gid
	if p.mode&os.ModeSetgid != 0 {
		n.gid = p.gid
		if n.kind == kindDir {
			n.mode |= os.ModeSetgid
		}
	}
	afs.register(n)
	if p.staged == nil {
		p.staged = make(map[string]*node)
	}
	p.staged[name] = n
	if n.kind == kindDir {
		p.subdirs++
	}
	p.mtime, p.ctime = now, now
	p.changed = p.changed || p.input
}

// newEntryParent returns the directory parent after checking that the
// caller may create name there, and the caller's uid and gid: how every op
// that creates an entry begins. The error is EEXIST when name exists.
// Called with afs.mu held; may release it (see dirOf).
func (afs *actionFS) newEntryParent(ctx context.Context, parent fuseops.InodeID, name string, oc fuseops.OpContext) (p *node, uid, gid uint32, err error) {
	if p, err = afs.getDir(parent); err != nil {
		return nil, 0, 0, err
	}
	uid, gid = creds(ctx, oc)
	return p, uid, gid, afs.newEntryCheck(ctx, p, name, uid, gid)
}

// addStagedEntry links a new node into p and hands it to the kernel as
// the entry e of the op that created it.
func (afs *actionFS) addStagedEntry(ctx context.Context, p *node, name string, n *node, uid, gid uint32, e *fuseops.ChildInodeEntry) error {
	afs.addStaged(p, name, n, uid, gid)
	return afs.giveEntry(ctx, n, e)
}

// entryToRemove finds the entry name of directory parent that RmDir or
// Unlink is asked to remove (ENOENT if there is none). Called with afs.mu
// held; may release it (see dirOf).
func (afs *actionFS) entryToRemove(ctx context.Context, parent fuseops.InodeID, name string) (p, c *node, err error) {
	if afs.lower {
		return nil, nil, syscall.EROFS
	}
	if p, err = afs.getDir(parent); err != nil {
		return nil, nil, err
	}
	if c, err = afs.child(ctx, p, name); err == nil && c == nil {
		err = syscall.ENOENT
	}
	return p, c, err
}

// removeStaged removes c, the staged entry name of p, for RmDir or Unlink
// once the caller is found allowed to. Called with afs.mu held.
func (afs *actionFS) removeStaged(ctx context.Context, oc fuseops.OpContext, p *node, name string, c *node) error {
	uid, gid := creds(ctx, oc)
	if err := mayRemove(p, c, uid, gid); err != nil {
		return err
	}
	delete(p.staged, name)
	if c.kind == kindDir {
		p.subdirs--
		c.removed = true
	} else {
		afs.dropLink(c)
	}
	afs.maybeDrop(c)
	now := time.Now()
	p.mtime, p.ctime = now, now
	return nil
}

// dropLink removes one name of n.
func (afs *actionFS) dropLink(n *node) {
	n.ctime = time.Now()
	if n.kind == kindDir {
		return
	}
	n.nlink--
	if n.nlink == 0 && n.kind == kindFile && !n.input {
		os.Remove(n.backing)
		if n.opens == 0 && n.f != nil {
			n.f.Close()
			n.f = nil
		}
	}
}

// newEntry serves an op that makes a new entry name in directory parent
// (MkDir, MkNode, CreateSymlink): once the caller is found allowed to, it
// makes the node with mk and links it in as the op's entry e.
func (afs *actionFS) newEntry(ctx context.Context, parent fuseops.InodeID, name string, oc fuseops.OpContext, e *fuseops.ChildInodeEntry, mk func() (*node, error)) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	p, uid, gid, err := afs.newEntryParent(ctx, parent, name, oc)
	if err != nil {
		return err
	}
	n, err := mk()
	if err != nil {
		return err
	}
	return afs.addStagedEntry(ctx, p, name, n, uid, gid, e)
}

// MkDir serves the op.
func (afs *actionFS) MkDir(ctx context.Context, op *fuseops.MkDirOp) error {
	return afs.newEntry(ctx, op.Parent, op.Name, op.OpContext, &op.Entry, func() (*node, error) {
		return &node{kind: kindDir, mode: os.ModeDir | op.Mode&(os.ModePerm|specialBits)}, nil
	})
}

// MkNode serves the op: regular files, FIFOs and sockets.
func (afs *actionFS) MkNode(ctx context.Context, op *fuseops.MkNodeOp) error {
	return afs.newEntry(ctx, op.Parent, op.Name, op.OpContext, &op.Entry, func() (*node, error) {
		perm := op.Mode & (os.ModePerm | specialBits)
		switch op.Mode.Type() {
		case 0:
			path, f, err := afs.newBacking()
			if err != nil {
				return nil, err
			}
			f.Close()
			return &node{kind: kindFile, backing: path, nlink: 1, mode: perm}, nil
		case os.ModeNamedPipe, os.ModeSocket:
			return &node{kind: kindSpecial, nlink: 1, mode: op.Mode.Type() | perm}, nil
		default:
			return nil, syscall.EPERM
		}
	})
}

// CreateFile serves the op.
func (afs *actionFS) CreateFile(ctx context.Context, op *fuseops.CreateFileOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	p, uid, gid, err := afs.newEntryParent(ctx, op.Parent, op.Name, op.OpContext)
	if err != nil {
		if err == syscall.EEXIST && uint32(op.OpenFlags)&unix.O_EXCL == 0 {
			if c := p.staged[op.Name]; c == nil {
				return afs.refuse("create over", joinPath(p, op.Name))
			}
		}
		return err
	}
	path, f, err := afs.newBacking()
	if err != nil {
		return err
	}
	n := &node{kind: kindFile, backing: path, f: f, opens: 1, nlink: 1, mode: op.Mode & (os.ModePerm | specialBits)}
	if err := afs.addStagedEntry(ctx, p, op.Name, n, uid, gid, &op.Entry); err != nil {
		return err
	}
	op.Handle = afs.newHandle(&handle{n: n})
	return nil
}

// CreateSymlink serves the op.
func (afs *actionFS) CreateSymlink(ctx context.Context, op *fuseops.CreateSymlinkOp) error {
	return afs.newEntry(ctx, op.Parent, op.Name, op.OpContext, &op.Entry, func() (*node, error) {
		return &node{kind: kindSymlink, target: op.Target, nlink: 1, mode: os.ModeSymlink | 0o777}, nil
	})
}

// CreateLink serves the op. A new name for an input is
// allowed (it changes nothing); the inode stays immutable.
func (afs *actionFS) CreateLink(ctx context.Context, op *fuseops.CreateLinkOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	p, err := afs.getDir(op.Parent)
	if err != nil {
		return err
	}
	t := afs.nodes[op.Target]
	switch {
	case t == nil:
		return syscall.ENOENT
	case t.kind == kindDir:
		return syscall.EPERM
	}
	uid, gid := creds(ctx, op.OpContext)
	if err := afs.newEntryCheck(ctx, p, op.Name, uid, gid); err != nil {
		return err
	}
	if p.staged == nil {
		p.staged = make(map[string]*node)
	}
	p.staged[op.Name] = t
	t.nlink++
	now := time.Now()
	t.ctime, p.mtime, p.ctime = now, now, now
	p.changed = p.changed || p.input
	return afs.giveEntry(ctx, t, &op.Entry)
}

// Rename serves the op: staged entries move freely;
// inputs can be neither moved nor replaced.
func (afs *actionFS) Rename(ctx context.Context, op *fuseops.RenameOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	if afs.lower {
		return syscall.EROFS
	}
	op1, err := afs.getDir(op.OldParent)
	if err != nil {
		return err
	}
	np, err := afs.getDir(op.NewParent)
	if err != nil {
		return err
	}
	src, err := afs.child(ctx, op1, op.OldName)
	if err != nil {
		return err
	}
	if src == nil {
		return syscall.ENOENT
	}
	if op1.staged[op.OldName] != src {
		return afs.refuse("rename", joinPath(op1, op.OldName))
	}
	dst, err := afs.child(ctx, np, op.NewName)
	if err != nil {
		return err
	}
	if dst != nil && np.staged[op.NewName] != dst {
		return afs.refuse("replace", joinPath(np, op.NewName))
	}
	if src == dst {
		return nil
	}
	uid, gid := creds(ctx, op.OpContext)
	if !allowed(op1, uid, gid, wantW|wantX) || !allowed(np, uid, gid, wantW|wantX) {
		return syscall.EACCES
	}
	if stickyDenied(op1, src, uid) || (dst != nil && stickyDenied(np, dst, uid)) {
		return syscall.EPERM
	}
	if dst != nil {
		switch {
		case src.kind == kindDir && dst.kind != kindDir:
			return syscall.ENOTDIR
		case src.kind != kindDir && dst.kind == kindDir:
			return syscall.EISDIR
		case dst.kind == kindDir && len(dst.staged) > 0:
			return syscall.ENOTEMPTY
		}
		delete(np.staged, op.NewName)
		if dst.kind == kindDir {
			np.subdirs--
			dst.removed = true
		}
		afs.dropLink(dst)
		afs.maybeDrop(dst)
	}
	delete(op1.staged, op.OldName)
	if np.staged == nil {
		np.staged = make(map[string]*node)
	}
	np.staged[op.NewName] = src
	if src.kind == kindDir {
		op1.subdirs--
		np.subdirs++
	}
	if !src.input {
		src.parent, src.name = np, op.NewName
	}
	now := time.Now()
	src.ctime, op1.mtime, op1.ctime, np.mtime, np.ctime = now, now, now, now, now
	op1.changed = op1.changed || op1.input
	np.changed = np.changed || np.input
	return nil
}

// RmDir serves the op.
func (afs *actionFS) RmDir(ctx context.Context, op *fuseops.RmDirOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	p, c, err := afs.entryToRemove(ctx, op.Parent, op.Name)
	switch {
	case err != nil:
		return err
	case c.kind != kindDir:
		return syscall.ENOTDIR
	case p.staged[op.Name] != c:
		return afs.refuse("remove directory", joinPath(p, op.Name))
	case len(c.staged) > 0:
		return syscall.ENOTEMPTY
	}
	return afs.removeStaged(ctx, op.OpContext, p, op.Name, c)
}

// Unlink serves the op.
func (afs *actionFS) Unlink(ctx context.Context, op *fuseops.UnlinkOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	p, c, err := afs.entryToRemove(ctx, op.Parent, op.Name)
	switch {
	case err != nil:
		return err
	case c.kind == kindDir:
		return syscall.EISDIR
	case p.staged[op.Name] != c:
		return afs.refuse("remove", joinPath(p, op.Name))
	}
	return afs.removeStaged(ctx, op.OpContext, p, op.Name, c)
}

// OpenDir serves the op; the listing is taken now, so
// that offsets stay valid whatever the action creates meanwhile.
func (afs *actionFS) OpenDir(ctx context.Context, op *fuseops.OpenDirOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	n, err := afs.getDir(op.Inode)
	if err != nil {
		return err
	}
	uid, gid := creds(ctx, op.OpContext)
	if !allowed(n, uid, gid, wantR) {
		return syscall.EACCES
	}
	parent := n.parent
	if parent == nil {
		parent = n
	}
	ents := []fuseutil.Dirent{
		{Inode: n.id, Name: ".", Type: fuseutil.DT_Directory},
		{Inode: parent.id, Name: "..", Type: fuseutil.DT_Directory},
	}
	dir, err := afs.dirOf(ctx, n)
	if err != nil {
		return err
	}
	var names []string
	if dir != nil {
		for _, f := range dir.Files {
			names = append(names, f.Name)
		}
		for _, d := range dir.Directories {
			names = append(names, d.Name)
		}
		for _, s := range dir.Symlinks {
			names = append(names, s.Name)
		}
	}
	for name := range n.staged {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		c, err := afs.child(ctx, n, name)
		if err != nil {
			return err
		}
		if c == nil {
			continue
		}
		ents = append(ents, fuseutil.Dirent{Inode: c.id, Name: name, Type: direntType(c)})
	}
	for i := range ents {
		ents[i].Offset = fuseops.DirOffset(i + 1)
	}
	op.Handle = afs.newHandle(&handle{n: n, entries: ents})
	op.KeepCache, op.CacheDir = true, true
	return nil
}

// ReadDir serves the op.
func (afs *actionFS) ReadDir(ctx context.Context, op *fuseops.ReadDirOp) error {
	afs.mu.Lock()
	h := afs.handles[op.Handle]
	afs.mu.Unlock()
	if h == nil || h.entries == nil {
		return syscall.EBADF
	}
	for i := int(op.Offset); i < len(h.entries); i++ {
		n := fuseutil.WriteDirent(op.Dst[op.BytesRead:], h.entries[i])
		if n == 0 {
			break
		}
		op.BytesRead += n
	}
	return nil
}

// ReleaseDirHandle serves the op.
func (afs *actionFS) ReleaseDirHandle(ctx context.Context, op *fuseops.ReleaseDirHandleOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	delete(afs.handles, op.Handle)
	return nil
}
