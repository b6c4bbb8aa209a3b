//go:build linux

package fs

// Resolution: names and paths to nodes. Entries the action created are
// found first, then input entries, whose nodes are made from the Directory
// messages on first use.

import (
	"context"
	iofs "io/fs"
	"os"
	"strings"
	"syscall"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/jacobsa/fuse/fuseops"
)

// dirOf returns the Directory message of an input directory (nil for a
// staged one), resolving it on first use. Called with afs.mu held; it
// releases the lock while reading the CAS.
func (afs *actionFS) dirOf(ctx context.Context, n *node) (*repb.Directory, error) {
	if n.dir != nil || !n.input {
		return n.dir, nil
	}
	if d := afs.known[n.dirDigest]; d != nil {
		n.dir = d
		return d, nil
	}
	afs.mu.Unlock()
	d, err := afs.dirs.get(ctx, n.dirDigest)
	afs.mu.Lock()
	if err != nil {
		afs.log.Warn("actiondfs: resolve input directory", "path", pathOf(n), "digest", n.dirDigest.String(), "err", err)
		return nil, syscall.EIO
	}
	if n.dir == nil {
		n.dir = d
	}
	return n.dir, nil
}

// child returns the entry name of directory p (nil if there is none):
// staged entries first, then inputs, whose nodes are made on first use.
// Called with afs.mu held; may release it (see dirOf).
func (afs *actionFS) child(ctx context.Context, p *node, name string) (*node, error) {
	if c := p.staged[name]; c != nil {
		return c, nil
	}
	if !p.input {
		return nil, nil
	}
	if c := p.inputs[name]; c != nil {
		return c, nil
	}
	dir, err := afs.dirOf(ctx, p)
	if err != nil {
		return nil, err
	}
	if c := p.staged[name]; c != nil { // created while unlocked
		return c, nil
	}
	if c := p.inputs[name]; c != nil {
		return c, nil
	}
	var c *node
	if f := findFile(dir, name); f != nil {
		d, _ := cas.FromProto(f.Digest)
		perm := os.FileMode(0o444)
		if afs.lower {
			perm = 0o666
		}
		if f.IsExecutable {
			perm |= 0o111
		}
		c = &node{kind: kindFile, digest: d, size: d.Size, nlink: 1, mode: perm}
	} else if s := findDir(dir, name); s != nil {
		d, _ := cas.FromProto(s.Digest)
		c = &node{kind: kindDir, dirDigest: d, mode: os.ModeDir | afs.inputDirPerm()}
	} else if l := findSymlink(dir, name); l != nil {
		c = &node{kind: kindSymlink, target: l.Target, nlink: 1, mode: os.ModeSymlink | 0o777}
	} else {
		return nil, nil
	}
	c.input, c.parent, c.name = true, p, name
	afs.setInputAttrs(c)
	afs.register(c)
	if p.inputs == nil {
		p.inputs = make(map[string]*node)
	}
	p.inputs[name] = c
	return c, nil
}

func (afs *actionFS) getDir(id fuseops.InodeID) (*node, error) {
	n := afs.nodes[id]
	switch {
	case n == nil:
		return nil, syscall.ENOENT
	case n.kind != kindDir:
		return nil, syscall.ENOTDIR
	}
	return n, nil
}

// LookUpInode serves the op. Missing names are answered
// with a cacheable negative entry: include-path searches look up many.
func (afs *actionFS) LookUpInode(ctx context.Context, op *fuseops.LookUpInodeOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	if afs.probing && op.Parent == fuseops.RootInodeID && op.Name == pollProbeName {
		// Not cached: the name goes away when probing ends.
		a, _ := afs.attrs(ctx, afs.probe)
		op.Entry = fuseops.ChildInodeEntry{Child: afs.probe.id, Attributes: a}
		lookedUp(afs.probe)
		return nil
	}
	p, err := afs.getDir(op.Parent)
	if err != nil {
		return err
	}
	c, err := afs.child(ctx, p, op.Name)
	if err != nil {
		return err
	}
	if c == nil {
		op.Entry = fuseops.ChildInodeEntry{EntryExpiration: afs.expire}
		return nil
	}
	return afs.giveEntry(ctx, c, &op.Entry)
}

// GetInodeAttributes serves the op.
func (afs *actionFS) GetInodeAttributes(ctx context.Context, op *fuseops.GetInodeAttributesOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	n := afs.nodes[op.Inode]
	if n == nil {
		return syscall.ENOENT
	}
	a, err := afs.attrs(ctx, n)
	op.Attributes, op.AttributesExpiration = a, afs.expire
	return err
}

// resolve finds the node at rel (slash-separated, relative to the root)
// without following symlinks.
func (afs *actionFS) resolve(ctx context.Context, rel string) (*node, error) {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	n := afs.nodes[fuseops.RootInodeID]
	for _, c := range strings.Split(rel, "/") {
		if c == "" || c == "." {
			continue
		}
		if n.kind != kindDir {
			return nil, iofs.ErrNotExist
		}
		next, err := afs.child(ctx, n, c)
		if err != nil {
			return nil, err
		}
		if next == nil {
			return nil, iofs.ErrNotExist
		}
		n = next
	}
	return n, nil
}

// backingOf returns the file holding the bytes of the staged regular file
// at rel, or the digest of the input file there; neither for anything else
// (a missing path, a directory, a staged file with several names, ...).
func (afs *actionFS) backingOf(ctx context.Context, rel string) (string, *cas.Digest) {
	n, err := afs.resolve(ctx, rel)
	if err != nil {
		return "", nil
	}
	afs.mu.Lock()
	defer afs.mu.Unlock()
	switch {
	case n.kind != kindFile:
		return "", nil
	case n.input:
		d := n.digest
		return "", &d
	case n.nlink != 1:
		return "", nil
	}
	return n.backing, nil
}
