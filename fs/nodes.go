//go:build linux

package fs

// Nodes: the inodes of a mount and open handles, their attributes as the
// kernel sees them, and when a node the kernel has forgotten is dropped.

import (
	"context"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/jacobsa/fuse/fuseops"
	"github.com/jacobsa/fuse/fuseutil"
)

type nodeKind uint8

const (
	kindDir nodeKind = iota
	kindFile
	kindSymlink
	kindSpecial // FIFO or socket
)

// node is an inode of one mount. A node is dropped once the kernel has
// forgotten it (its lookup count is back to zero) and nothing else needs it:
// a removed staged entry, or an input entry nobody changed, which is made
// again from the tree on the next lookup. Without that an action that
// creates and removes many files, or walks a large input tree, grows this
// server (outside the action's cgroup) until the mount goes away.
type node struct {
	id     fuseops.InodeID
	kind   nodeKind
	input  bool  // from the input tree: content and entries are immutable
	parent *node // where the node was created (for paths and "..")
	name   string

	digest    cas.Digest       // input file
	dirDigest cas.Digest       // input directory
	dir       *repb.Directory  // input directory, nil until resolved
	inputs    map[string]*node // input directory: input entries materialised so far
	staged    map[string]*node // directory: entries created by the action
	subdirs   int              // staged subdirectories, for the link count

	backing string   // staged file: where its bytes live
	f       *os.File // staged file: open while handles are
	opens   int
	size    int64  // files
	target  string // symlinks
	nlink   uint32 // non-directories

	mode                os.FileMode
	uid, gid            uint32
	atime, mtime, ctime time.Time

	lookups uint64 // the kernel's references (entries it was given minus forgotten)
	removed bool   // staged directory: removed from its parent
	changed bool   // input directory: attributes or entries changed; keep it
	// prefilled: input file whose bytes were stored in the page cache at
	// its first open (see prefill).
	prefilled bool
}

// handle is an open file or directory.
type handle struct {
	n       *node
	blob    *blobFile         // input file with content
	entries []fuseutil.Dirent // directory: snapshot taken at open
}

// setInputAttrs sets the owner and times of an input node.
func (afs *actionFS) setInputAttrs(n *node) {
	setTimes(n, inputTime)
	if afs.lower {
		n.uid, n.gid = afs.owner[0], afs.owner[1]
	}
}

func (afs *actionFS) inputDirPerm() os.FileMode {
	if afs.lower {
		return 0o777
	}
	return 0o755
}

func (afs *actionFS) register(n *node) {
	n.id = afs.nextID
	afs.nextID++
	afs.nodes[n.id] = n
}

func setTimes(n *node, t time.Time) { n.atime, n.mtime, n.ctime = t, t, t }

// attrs describes n to the kernel. Called with afs.mu held; may release it
// to resolve an input directory (for its link count).
func (afs *actionFS) attrs(ctx context.Context, n *node) (fuseops.InodeAttributes, error) {
	a := fuseops.InodeAttributes{
		Nlink: n.nlink, Mode: n.mode, Uid: n.uid, Gid: n.gid,
		Atime: n.atime, Mtime: n.mtime, Ctime: n.ctime,
	}
	switch n.kind {
	case kindDir:
		dir, err := afs.dirOf(ctx, n)
		if err != nil {
			return a, err
		}
		links := 2 + n.subdirs
		if dir != nil {
			links += len(dir.Directories)
		}
		a.Nlink, a.Size = uint32(links), 4096
	case kindFile:
		a.Size = uint64(n.size)
	case kindSymlink:
		a.Size = uint64(len(n.target))
	}
	return a, nil
}

func (afs *actionFS) entry(ctx context.Context, n *node) (fuseops.ChildInodeEntry, error) {
	a, err := afs.attrs(ctx, n)
	return fuseops.ChildInodeEntry{Child: n.id, Attributes: a, AttributesExpiration: afs.expire, EntryExpiration: afs.expire}, err
}

// giveEntry describes n to the kernel in e and counts the reference the
// kernel then holds (see lookedUp). Called with afs.mu held; may release it
// (see attrs).
func (afs *actionFS) giveEntry(ctx context.Context, n *node, e *fuseops.ChildInodeEntry) error {
	var err error
	if *e, err = afs.entry(ctx, n); err != nil {
		return err
	}
	lookedUp(n)
	return nil
}

// pathOf is n's path relative to the root of the mount.
func pathOf(n *node) string {
	var parts []string
	for ; n != nil && n.parent != nil; n = n.parent {
		parts = append(parts, n.name)
	}
	slices.Reverse(parts)
	return strings.Join(parts, "/")
}

func joinPath(dir *node, name string) string {
	if p := pathOf(dir); p != "" {
		return p + "/" + name
	}
	return name
}

func (afs *actionFS) newHandle(h *handle) fuseops.HandleID {
	afs.nextHandle++
	afs.handles[afs.nextHandle] = h
	return afs.nextHandle
}

func direntType(n *node) fuseutil.DirentType {
	switch n.kind {
	case kindDir:
		return fuseutil.DT_Directory
	case kindSymlink:
		return fuseutil.DT_Link
	case kindSpecial:
		if n.mode&os.ModeSocket != 0 {
			return fuseutil.DT_Socket
		}
		return fuseutil.DT_FIFO
	}
	return fuseutil.DT_File
}

// ForgetInode serves the op.
func (afs *actionFS) ForgetInode(ctx context.Context, op *fuseops.ForgetInodeOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	afs.forgetLocked(op.Inode, op.N)
	return nil
}

// BatchForget serves the op.
func (afs *actionFS) BatchForget(ctx context.Context, op *fuseops.BatchForgetOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	for _, e := range op.Entries {
		afs.forgetLocked(e.Inode, e.N)
	}
	return nil
}

// lookedUp counts an entry handed to the kernel, which will forget it.
func lookedUp(n *node) { n.lookups++ }

func (afs *actionFS) forgetLocked(id fuseops.InodeID, count uint64) {
	n := afs.nodes[id]
	if n == nil {
		return
	}
	n.lookups -= min(count, n.lookups)
	afs.maybeDrop(n)
}

// maybeDrop drops n if the kernel holds no reference to it and the mount
// does not need it: a removed staged entry (its bytes are gone already), or
// an unchanged input entry with nothing below it, which child makes again
// from the tree when next looked up (under a new inode number; the kernel
// has forgotten the old one). Dropping an input entry may make its parent
// droppable too.
func (afs *actionFS) maybeDrop(n *node) {
	for n != nil && n.lookups == 0 && n != afs.root && n != afs.probe {
		p := n.parent
		switch {
		case !n.input:
			if (n.kind == kindDir && !n.removed) || (n.kind != kindDir && n.nlink > 0) {
				return // still linked: the action's own file or directory
			}
			if n.f != nil && n.opens == 0 {
				n.f.Close()
				n.f = nil
			}
			delete(afs.nodes, n.id)
			return
		case !droppableInput(n) || !afs.dropInputs(n):
			return
		case p == nil || p.inputs[n.name] != n:
			return
		}
		delete(p.inputs, n.name)
		delete(afs.nodes, n.id)
		n = p
	}
}

// droppableInput reports whether the input node n holds nothing of its own
// (its materialised children aside).
func droppableInput(n *node) bool {
	return n.input && !n.changed && len(n.staged) == 0 && (n.kind == kindDir || n.nlink == 1)
}

// dropInputs drops the materialised input entries below n that the kernel
// does not reference (those made for a directory listing, which the kernel
// does not count) and reports whether none are left.
func (afs *actionFS) dropInputs(n *node) bool {
	for name, c := range n.inputs {
		if c.lookups > 0 || c == afs.probe || !droppableInput(c) || !afs.dropInputs(c) {
			continue
		}
		delete(n.inputs, name)
		delete(afs.nodes, c.id)
	}
	return len(n.inputs) == 0
}

// Nodes is how many inodes the mount keeps.
func (afs *actionFS) Nodes() int {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	return len(afs.nodes)
}
