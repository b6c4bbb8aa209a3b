//go:build linux

package fs

import (
	"context"
	"errors"
	"io"
	iofs "io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/jacobsa/fuse"
	"github.com/jacobsa/fuse/fuseops"
	"github.com/jacobsa/fuse/fuseutil"
	"golang.org/x/sys/unix"
)

// inputTime is the modification time of every input: fixed, so listings and
// archives of inputs are reproducible (and after 1980, which ZIP needs).
var inputTime = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// cacheFor is how long the kernel may cache entries and attributes. Input
// entries never change and every other change goes through the kernel,
// which updates its caches itself, so this is "for the life of the mount".
const cacheFor = 365 * 24 * time.Hour

// maxRefusals bounds the refusals remembered per mount (all are counted).
const maxRefusals = 50

// Permission bits asked of allowed.
const (
	wantR = 4
	wantW = 2
	wantX = 1
)

const specialBits = os.ModeSetuid | os.ModeSetgid | os.ModeSticky

type nodeKind uint8

const (
	kindDir nodeKind = iota
	kindFile
	kindSymlink
	kindSpecial // FIFO or socket
)

// node is an inode of one mount. Nodes are never freed before the mount
// goes away: a mount lives for one action.
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
}

// handle is an open file or directory.
type handle struct {
	n       *node
	blob    *blobFile         // input file with content
	entries []fuseutil.Dirent // directory: snapshot taken at open
}

// Refusal is a change to an input that strict mode refused with EROFS.
type Refusal struct {
	Op   string // what was attempted: "open for writing", "remove", ...
	Path string // relative to the root of the mount
}

// actionFS is the file system of one mount.
type actionFS struct {
	fuseutil.NotImplementedFileSystem

	log   *slog.Logger
	dirs  *dirCache
	blobs *blobFiles
	known map[cas.Digest]*repb.Directory // from the executor's InputTree; read-only
	stage string                         // directory for the bytes of staged files
	lower bool                           // read-only lower layer of an overlay
	// expire is when cached entries and attributes expire.
	expire time.Time

	mu         sync.Mutex
	nodes      map[fuseops.InodeID]*node
	nextID     fuseops.InodeID
	handles    map[fuseops.HandleID]*handle
	nextHandle fuseops.HandleID
	stageMade  bool
	nBacking   uint64
	refused    []Refusal
	nRefused   int
}

func newActionFS(r *InputRoot, root cas.Digest, known map[cas.Digest]*repb.Directory, stage string, lower bool) *actionFS {
	fs := &actionFS{
		log:     r.log,
		dirs:    r.dirs,
		blobs:   r.blobs,
		known:   known,
		stage:   stage,
		lower:   lower,
		expire:  time.Now().Add(cacheFor),
		nodes:   make(map[fuseops.InodeID]*node),
		nextID:  fuseops.RootInodeID,
		handles: make(map[fuseops.HandleID]*handle),
	}
	rootNode := &node{kind: kindDir, input: true, dirDigest: root, mode: os.ModeDir | fs.inputDirPerm()}
	setTimes(rootNode, inputTime)
	fs.register(rootNode)
	return fs
}

func (fs *actionFS) inputDirPerm() os.FileMode {
	if fs.lower {
		return 0o777
	}
	return 0o755
}

func (fs *actionFS) register(n *node) {
	n.id = fs.nextID
	fs.nextID++
	fs.nodes[n.id] = n
}

func setTimes(n *node, t time.Time) { n.atime, n.mtime, n.ctime = t, t, t }

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

// dirOf returns the Directory message of an input directory (nil for a
// staged one), resolving it on first use. Called with fs.mu held; it
// releases the lock while reading the CAS.
func (fs *actionFS) dirOf(ctx context.Context, n *node) (*repb.Directory, error) {
	if n.dir != nil || !n.input {
		return n.dir, nil
	}
	if d := fs.known[n.dirDigest]; d != nil {
		n.dir = d
		return d, nil
	}
	fs.mu.Unlock()
	d, err := fs.dirs.get(ctx, n.dirDigest)
	fs.mu.Lock()
	if err != nil {
		fs.log.Warn("actiondfs: resolve input directory", "path", pathOf(n), "digest", n.dirDigest.String(), "err", err)
		return nil, syscall.EIO
	}
	if n.dir == nil {
		n.dir = d
	}
	return n.dir, nil
}

// child returns the entry name of directory p (nil if there is none):
// staged entries first, then inputs, whose nodes are made on first use.
// Called with fs.mu held; may release it (see dirOf).
func (fs *actionFS) child(ctx context.Context, p *node, name string) (*node, error) {
	if c := p.staged[name]; c != nil {
		return c, nil
	}
	if !p.input {
		return nil, nil
	}
	if c := p.inputs[name]; c != nil {
		return c, nil
	}
	dir, err := fs.dirOf(ctx, p)
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
		if fs.lower {
			perm = 0o666
		}
		if f.IsExecutable {
			perm |= 0o111
		}
		c = &node{kind: kindFile, digest: d, size: d.Size, nlink: 1, mode: perm}
	} else if s := findDir(dir, name); s != nil {
		d, _ := cas.FromProto(s.Digest)
		c = &node{kind: kindDir, dirDigest: d, mode: os.ModeDir | fs.inputDirPerm()}
	} else if l := findSymlink(dir, name); l != nil {
		c = &node{kind: kindSymlink, target: l.Target, nlink: 1, mode: os.ModeSymlink | 0o777}
	} else {
		return nil, nil
	}
	c.input, c.parent, c.name = true, p, name
	setTimes(c, inputTime)
	fs.register(c)
	if p.inputs == nil {
		p.inputs = make(map[string]*node)
	}
	p.inputs[name] = c
	return c, nil
}

// attrs describes n to the kernel. Called with fs.mu held; may release it
// to resolve an input directory (for its link count).
func (fs *actionFS) attrs(ctx context.Context, n *node) (fuseops.InodeAttributes, error) {
	a := fuseops.InodeAttributes{
		Nlink: n.nlink, Mode: n.mode, Uid: n.uid, Gid: n.gid,
		Atime: n.atime, Mtime: n.mtime, Ctime: n.ctime,
	}
	switch n.kind {
	case kindDir:
		dir, err := fs.dirOf(ctx, n)
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

func (fs *actionFS) entry(ctx context.Context, n *node) (fuseops.ChildInodeEntry, error) {
	a, err := fs.attrs(ctx, n)
	return fuseops.ChildInodeEntry{Child: n.id, Attributes: a, AttributesExpiration: fs.expire, EntryExpiration: fs.expire}, err
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

// refuse records a refused change to an input and returns EROFS.
func (fs *actionFS) refuse(op, path string) error {
	fs.nRefused++
	r := Refusal{Op: op, Path: path}
	if len(fs.refused) < maxRefusals && !slices.Contains(fs.refused, r) {
		fs.refused = append(fs.refused, r)
	}
	fs.log.Debug("actiondfs: refused a change to an input", "op", op, "path", path)
	return syscall.EROFS
}

// Refused returns the refusals so far and how many there were in all.
func (fs *actionFS) Refused() ([]Refusal, int) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return slices.Clone(fs.refused), fs.nRefused
}

func (fs *actionFS) getDir(id fuseops.InodeID) (*node, error) {
	n := fs.nodes[id]
	switch {
	case n == nil:
		return nil, syscall.ENOENT
	case n.kind != kindDir:
		return nil, syscall.ENOTDIR
	}
	return n, nil
}

// newEntryCheck checks that name may be created in p by the caller.
func (fs *actionFS) newEntryCheck(ctx context.Context, p *node, name string, uid, gid uint32) error {
	if fs.lower {
		return syscall.EROFS
	}
	c, err := fs.child(ctx, p, name)
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

// addStaged links a new node into p.
func (fs *actionFS) addStaged(p *node, name string, n *node, uid, gid uint32) {
	now := time.Now()
	setTimes(n, now)
	n.parent, n.name, n.uid, n.gid = p, name, uid, gid
	if p.mode&os.ModeSetgid != 0 {
		n.gid = p.gid
		if n.kind == kindDir {
			n.mode |= os.ModeSetgid
		}
	}
	fs.register(n)
	if p.staged == nil {
		p.staged = make(map[string]*node)
	}
	p.staged[name] = n
	if n.kind == kindDir {
		p.subdirs++
	}
	p.mtime, p.ctime = now, now
}

// newBacking creates the file holding a staged file's bytes.
func (fs *actionFS) newBacking() (string, *os.File, error) {
	if !fs.stageMade {
		if err := os.MkdirAll(fs.stage, 0o700); err != nil {
			fs.log.Warn("actiondfs: create stage directory", "dir", fs.stage, "err", err)
			return "", nil, syscall.EIO
		}
		fs.stageMade = true
	}
	fs.nBacking++
	p := filepath.Join(fs.stage, strconv.FormatUint(fs.nBacking, 10))
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		fs.log.Warn("actiondfs: create staged file", "path", p, "err", err)
		return "", nil, errnoOf(err)
	}
	return p, f, nil
}

// dropLink removes one name of n.
func (fs *actionFS) dropLink(n *node) {
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

// errnoOf extracts the errno of a failed system call (EIO otherwise).
func errnoOf(err error) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return syscall.EIO
}

// StatFS reports the space of the stage's file system.
func (fs *actionFS) StatFS(ctx context.Context, op *fuseops.StatFSOp) error {
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(fs.stage), &st); err != nil {
		return nil
	}
	op.BlockSize = uint32(st.Bsize)
	op.Blocks, op.BlocksFree, op.BlocksAvailable = st.Blocks, st.Bfree, st.Bavail
	op.IoSize = 1 << 20
	op.Inodes, op.InodesFree = st.Files, st.Ffree
	return nil
}

// LookUpInode implements fuseutil.FileSystem. Missing names are answered
// with a cacheable negative entry: include-path searches look up many.
func (fs *actionFS) LookUpInode(ctx context.Context, op *fuseops.LookUpInodeOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	p, err := fs.getDir(op.Parent)
	if err != nil {
		return err
	}
	c, err := fs.child(ctx, p, op.Name)
	if err != nil {
		return err
	}
	if c == nil {
		op.Entry = fuseops.ChildInodeEntry{EntryExpiration: fs.expire}
		return nil
	}
	op.Entry, err = fs.entry(ctx, c)
	return err
}

// GetInodeAttributes implements fuseutil.FileSystem.
func (fs *actionFS) GetInodeAttributes(ctx context.Context, op *fuseops.GetInodeAttributesOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	n := fs.nodes[op.Inode]
	if n == nil {
		return syscall.ENOENT
	}
	a, err := fs.attrs(ctx, n)
	op.Attributes, op.AttributesExpiration = a, fs.expire
	return err
}

// SetInodeAttributes implements fuseutil.FileSystem. Input files and
// symlinks never change; input directories may change mode, owner and
// times (their entries stay immutable).
func (fs *actionFS) SetInodeAttributes(ctx context.Context, op *fuseops.SetInodeAttributesOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	n := fs.nodes[op.Inode]
	if n == nil {
		return syscall.ENOENT
	}
	if fs.lower {
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
		return fs.refuse(what, pathOf(n))
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
	a, err := fs.attrs(ctx, n)
	op.Attributes, op.AttributesExpiration = a, fs.expire
	return err
}

// ForgetInode implements fuseutil.FileSystem: nodes live as long as the mount.
func (fs *actionFS) ForgetInode(ctx context.Context, op *fuseops.ForgetInodeOp) error { return nil }

// BatchForget implements fuseutil.FileSystem.
func (fs *actionFS) BatchForget(ctx context.Context, op *fuseops.BatchForgetOp) error { return nil }

// MkDir implements fuseutil.FileSystem.
func (fs *actionFS) MkDir(ctx context.Context, op *fuseops.MkDirOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	p, err := fs.getDir(op.Parent)
	if err != nil {
		return err
	}
	uid, gid := creds(ctx, op.OpContext)
	if err := fs.newEntryCheck(ctx, p, op.Name, uid, gid); err != nil {
		return err
	}
	n := &node{kind: kindDir, mode: os.ModeDir | op.Mode&(os.ModePerm|specialBits)}
	fs.addStaged(p, op.Name, n, uid, gid)
	op.Entry, err = fs.entry(ctx, n)
	return err
}

// MkNode implements fuseutil.FileSystem: regular files, FIFOs and sockets.
func (fs *actionFS) MkNode(ctx context.Context, op *fuseops.MkNodeOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	p, err := fs.getDir(op.Parent)
	if err != nil {
		return err
	}
	uid, gid := creds(ctx, op.OpContext)
	if err := fs.newEntryCheck(ctx, p, op.Name, uid, gid); err != nil {
		return err
	}
	perm := op.Mode & (os.ModePerm | specialBits)
	var n *node
	switch op.Mode.Type() {
	case 0:
		path, f, err := fs.newBacking()
		if err != nil {
			return err
		}
		f.Close()
		n = &node{kind: kindFile, backing: path, nlink: 1, mode: perm}
	case os.ModeNamedPipe, os.ModeSocket:
		n = &node{kind: kindSpecial, nlink: 1, mode: op.Mode.Type() | perm}
	default:
		return syscall.EPERM
	}
	fs.addStaged(p, op.Name, n, uid, gid)
	op.Entry, err = fs.entry(ctx, n)
	return err
}

// CreateFile implements fuseutil.FileSystem.
func (fs *actionFS) CreateFile(ctx context.Context, op *fuseops.CreateFileOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	p, err := fs.getDir(op.Parent)
	if err != nil {
		return err
	}
	uid, gid := creds(ctx, op.OpContext)
	if err := fs.newEntryCheck(ctx, p, op.Name, uid, gid); err != nil {
		if err == syscall.EEXIST && uint32(op.OpenFlags)&unix.O_EXCL == 0 {
			if c := p.staged[op.Name]; c == nil {
				return fs.refuse("create over", joinPath(p, op.Name))
			}
		}
		return err
	}
	path, f, err := fs.newBacking()
	if err != nil {
		return err
	}
	n := &node{kind: kindFile, backing: path, f: f, opens: 1, nlink: 1, mode: op.Mode & (os.ModePerm | specialBits)}
	fs.addStaged(p, op.Name, n, uid, gid)
	if op.Entry, err = fs.entry(ctx, n); err != nil {
		return err
	}
	op.Handle = fs.newHandle(&handle{n: n})
	return nil
}

// CreateSymlink implements fuseutil.FileSystem.
func (fs *actionFS) CreateSymlink(ctx context.Context, op *fuseops.CreateSymlinkOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	p, err := fs.getDir(op.Parent)
	if err != nil {
		return err
	}
	uid, gid := creds(ctx, op.OpContext)
	if err := fs.newEntryCheck(ctx, p, op.Name, uid, gid); err != nil {
		return err
	}
	n := &node{kind: kindSymlink, target: op.Target, nlink: 1, mode: os.ModeSymlink | 0o777}
	fs.addStaged(p, op.Name, n, uid, gid)
	op.Entry, err = fs.entry(ctx, n)
	return err
}

// CreateLink implements fuseutil.FileSystem. A new name for an input is
// allowed (it changes nothing); the inode stays immutable.
func (fs *actionFS) CreateLink(ctx context.Context, op *fuseops.CreateLinkOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	p, err := fs.getDir(op.Parent)
	if err != nil {
		return err
	}
	t := fs.nodes[op.Target]
	switch {
	case t == nil:
		return syscall.ENOENT
	case t.kind == kindDir:
		return syscall.EPERM
	}
	uid, gid := creds(ctx, op.OpContext)
	if err := fs.newEntryCheck(ctx, p, op.Name, uid, gid); err != nil {
		return err
	}
	if p.staged == nil {
		p.staged = make(map[string]*node)
	}
	p.staged[op.Name] = t
	t.nlink++
	now := time.Now()
	t.ctime, p.mtime, p.ctime = now, now, now
	op.Entry, err = fs.entry(ctx, t)
	return err
}

// Rename implements fuseutil.FileSystem: staged entries move freely;
// inputs can be neither moved nor replaced.
func (fs *actionFS) Rename(ctx context.Context, op *fuseops.RenameOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if fs.lower {
		return syscall.EROFS
	}
	op1, err := fs.getDir(op.OldParent)
	if err != nil {
		return err
	}
	np, err := fs.getDir(op.NewParent)
	if err != nil {
		return err
	}
	src, err := fs.child(ctx, op1, op.OldName)
	if err != nil {
		return err
	}
	if src == nil {
		return syscall.ENOENT
	}
	if op1.staged[op.OldName] != src {
		return fs.refuse("rename", joinPath(op1, op.OldName))
	}
	dst, err := fs.child(ctx, np, op.NewName)
	if err != nil {
		return err
	}
	if dst != nil && np.staged[op.NewName] != dst {
		return fs.refuse("replace", joinPath(np, op.NewName))
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
		}
		fs.dropLink(dst)
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
	return nil
}

// RmDir implements fuseutil.FileSystem.
func (fs *actionFS) RmDir(ctx context.Context, op *fuseops.RmDirOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if fs.lower {
		return syscall.EROFS
	}
	p, err := fs.getDir(op.Parent)
	if err != nil {
		return err
	}
	c, err := fs.child(ctx, p, op.Name)
	switch {
	case err != nil:
		return err
	case c == nil:
		return syscall.ENOENT
	case c.kind != kindDir:
		return syscall.ENOTDIR
	case p.staged[op.Name] != c:
		return fs.refuse("remove directory", joinPath(p, op.Name))
	case len(c.staged) > 0:
		return syscall.ENOTEMPTY
	}
	uid, gid := creds(ctx, op.OpContext)
	if !allowed(p, uid, gid, wantW|wantX) {
		return syscall.EACCES
	}
	if stickyDenied(p, c, uid) {
		return syscall.EPERM
	}
	delete(p.staged, op.Name)
	p.subdirs--
	now := time.Now()
	p.mtime, p.ctime = now, now
	return nil
}

// Unlink implements fuseutil.FileSystem.
func (fs *actionFS) Unlink(ctx context.Context, op *fuseops.UnlinkOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if fs.lower {
		return syscall.EROFS
	}
	p, err := fs.getDir(op.Parent)
	if err != nil {
		return err
	}
	c, err := fs.child(ctx, p, op.Name)
	switch {
	case err != nil:
		return err
	case c == nil:
		return syscall.ENOENT
	case c.kind == kindDir:
		return syscall.EISDIR
	case p.staged[op.Name] != c:
		return fs.refuse("remove", joinPath(p, op.Name))
	}
	uid, gid := creds(ctx, op.OpContext)
	if !allowed(p, uid, gid, wantW|wantX) {
		return syscall.EACCES
	}
	if stickyDenied(p, c, uid) {
		return syscall.EPERM
	}
	delete(p.staged, op.Name)
	fs.dropLink(c)
	now := time.Now()
	p.mtime, p.ctime = now, now
	return nil
}

func (fs *actionFS) newHandle(h *handle) fuseops.HandleID {
	fs.nextHandle++
	fs.handles[fs.nextHandle] = h
	return fs.nextHandle
}

// OpenDir implements fuseutil.FileSystem; the listing is taken now, so
// that offsets stay valid whatever the action creates meanwhile.
func (fs *actionFS) OpenDir(ctx context.Context, op *fuseops.OpenDirOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	n, err := fs.getDir(op.Inode)
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
	dir, err := fs.dirOf(ctx, n)
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
		c, err := fs.child(ctx, n, name)
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
	op.Handle = fs.newHandle(&handle{n: n, entries: ents})
	op.KeepCache, op.CacheDir = true, true
	return nil
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

// ReadDir implements fuseutil.FileSystem.
func (fs *actionFS) ReadDir(ctx context.Context, op *fuseops.ReadDirOp) error {
	fs.mu.Lock()
	h := fs.handles[op.Handle]
	fs.mu.Unlock()
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

// ReleaseDirHandle implements fuseutil.FileSystem.
func (fs *actionFS) ReleaseDirHandle(ctx context.Context, op *fuseops.ReleaseDirHandleOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	delete(fs.handles, op.Handle)
	return nil
}

// OpenFile implements fuseutil.FileSystem. Inputs open read-only; asking
// for more is refused.
func (fs *actionFS) OpenFile(ctx context.Context, op *fuseops.OpenFileOp) error {
	flags := uint32(op.OpenFlags)
	acc := flags & unix.O_ACCMODE
	fs.mu.Lock()
	n := fs.nodes[op.Inode]
	switch {
	case n == nil:
		fs.mu.Unlock()
		return syscall.ENOENT
	case n.kind == kindDir:
		fs.mu.Unlock()
		return syscall.EISDIR
	case n.input:
		var err error
		if acc != unix.O_RDONLY {
			err = fs.refuse("open for writing", pathOf(n))
		} else if flags&unix.O_TRUNC != 0 {
			err = fs.refuse("truncate", pathOf(n))
		}
		fs.mu.Unlock()
		if err != nil {
			return err
		}
		h := &handle{n: n}
		if n.digest.Size > 0 {
			bf, err := fs.blobs.acquire(n.digest)
			if err != nil {
				fs.log.Warn("actiondfs: open input", "path", pathOf(n), "digest", n.digest.String(), "err", err)
				return syscall.EIO
			}
			h.blob = bf
		}
		fs.mu.Lock()
		op.Handle = fs.newHandle(h)
		fs.mu.Unlock()
		op.KeepPageCache = true
		return nil
	case n.kind != kindFile:
		fs.mu.Unlock()
		return syscall.EINVAL
	}
	defer fs.mu.Unlock()
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
			fs.log.Warn("actiondfs: open staged file", "path", pathOf(n), "err", err)
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
	op.Handle = fs.newHandle(&handle{n: n})
	op.KeepPageCache = true
	return nil
}

// ReadFile implements fuseutil.FileSystem.
func (fs *actionFS) ReadFile(ctx context.Context, op *fuseops.ReadFileOp) error {
	fs.mu.Lock()
	h := fs.handles[op.Handle]
	var f *os.File
	if h != nil {
		if h.blob != nil {
			f = h.blob.f
		} else {
			f = h.n.f
		}
	}
	fs.mu.Unlock()
	if h == nil {
		return syscall.EBADF
	}
	if f == nil { // the empty blob
		return nil
	}
	dst := op.Dst
	if dst == nil {
		dst = make([]byte, op.Size)
	}
	n, err := f.ReadAt(dst, op.Offset)
	if err != nil && err != io.EOF {
		fs.log.Warn("actiondfs: read", "path", pathOf(h.n), "err", err)
		return errnoOf(err)
	}
	op.BytesRead = n
	if op.Dst == nil {
		op.Data = [][]byte{dst[:n]}
	}
	return nil
}

// WriteFile implements fuseutil.FileSystem (staged files only: inputs are
// never open for writing).
func (fs *actionFS) WriteFile(ctx context.Context, op *fuseops.WriteFileOp) error {
	fs.mu.Lock()
	h := fs.handles[op.Handle]
	if h == nil || h.n.input || h.n.f == nil {
		fs.mu.Unlock()
		return syscall.EBADF
	}
	n := h.n
	f := n.f
	fs.mu.Unlock()
	if _, err := f.WriteAt(op.Data, op.Offset); err != nil {
		return errnoOf(err)
	}
	fs.mu.Lock()
	if end := op.Offset + int64(len(op.Data)); end > n.size {
		n.size = end
	}
	now := time.Now()
	n.mtime, n.ctime = now, now
	fs.mu.Unlock()
	return nil
}

// Fallocate implements fuseutil.FileSystem.
func (fs *actionFS) Fallocate(ctx context.Context, op *fuseops.FallocateOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	h := fs.handles[op.Handle]
	if h == nil || h.n.input || h.n.f == nil {
		return syscall.EBADF
	}
	if err := unix.Fallocate(int(h.n.f.Fd()), op.Mode, int64(op.Offset), int64(op.Length)); err != nil {
		return errnoOf(err)
	}
	if fi, err := h.n.f.Stat(); err == nil {
		h.n.size = fi.Size()
	}
	return nil
}

// SyncFile implements fuseutil.FileSystem. Staged files are moved into the
// CAS (which syncs what it keeps) or thrown away: nothing to do.
func (fs *actionFS) SyncFile(ctx context.Context, op *fuseops.SyncFileOp) error { return nil }

// FlushFile implements fuseutil.FileSystem.
func (fs *actionFS) FlushFile(ctx context.Context, op *fuseops.FlushFileOp) error { return nil }

// SyncFS implements fuseutil.FileSystem.
func (fs *actionFS) SyncFS(ctx context.Context, op *fuseops.SyncFSOp) error { return nil }

// ReleaseFileHandle implements fuseutil.FileSystem.
func (fs *actionFS) ReleaseFileHandle(ctx context.Context, op *fuseops.ReleaseFileHandleOp) error {
	fs.mu.Lock()
	h := fs.handles[op.Handle]
	delete(fs.handles, op.Handle)
	if h != nil && h.blob == nil && !h.n.input {
		n := h.n
		if n.opens--; n.opens == 0 && n.f != nil {
			n.f.Close()
			n.f = nil
		}
	}
	fs.mu.Unlock()
	if h != nil && h.blob != nil {
		fs.blobs.release(h.blob)
	}
	return nil
}

// ReadSymlink implements fuseutil.FileSystem.
func (fs *actionFS) ReadSymlink(ctx context.Context, op *fuseops.ReadSymlinkOp) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	n := fs.nodes[op.Inode]
	if n == nil || n.kind != kindSymlink {
		return syscall.EINVAL
	}
	op.Target = n.target
	return nil
}

// Destroy implements fuseutil.FileSystem: the mount is gone.
func (fs *actionFS) Destroy() {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	for id, h := range fs.handles {
		if h.blob != nil {
			fs.blobs.release(h.blob)
		}
		delete(fs.handles, id)
	}
	for _, n := range fs.nodes {
		if n.f != nil {
			n.f.Close()
			n.f = nil
		}
	}
}

// resolve finds the node at rel (slash-separated, relative to the root)
// without following symlinks.
func (fs *actionFS) resolve(ctx context.Context, rel string) (*node, error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	n := fs.nodes[fuseops.RootInodeID]
	for _, c := range strings.Split(rel, "/") {
		if c == "" || c == "." {
			continue
		}
		if n.kind != kindDir {
			return nil, iofs.ErrNotExist
		}
		next, err := fs.child(ctx, n, c)
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
// at rel, or "" when there is none (an input, a hard-linked file, ...).
func (fs *actionFS) backingOf(ctx context.Context, rel string) string {
	n, err := fs.resolve(ctx, rel)
	if err != nil {
		return ""
	}
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if n.kind != kindFile || n.input || n.nlink != 1 {
		return ""
	}
	return n.backing
}
