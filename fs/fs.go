//go:build linux

package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

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
	log   *slog.Logger
	dirs  *dirCache
	blobs *blobFiles
	known map[cas.Digest]*repb.Directory // from the executor's InputTree; read-only
	stage string                         // directory for the bytes of staged files
	lower bool                           // read-only lower layer of an overlay
	// owner owns every input of a lower layer (the sandbox user), so the
	// command may change anything in the overlay, as with a private copy.
	owner [2]uint32
	// user is the one uid besides root whose requests are served (the
	// action's), or -1 for none: the mount is allow_other so that the
	// action can use it, and must not serve other local users.
	user atomic.Int64
	// expire is when cached entries and attributes expire: zero (nothing
	// cached) while the mount is a spare without its input root, so that
	// nothing looked up then (a name missing from the empty tree) outlives
	// setRoot.
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
	root       *node
	// probe is the hidden file disablePoll uses, visible while probing.
	probe   *node
	probing bool
}

// pollProbeName is the name under which the root shows the probe file
// while disablePoll runs.
const pollProbeName = ".actiondfs-poll-probe"

// newActionFS returns the file system of a mount of root, served to root
// and owner's uid (the owner of a lower layer's inputs); a spare serves
// only root until setRoot.
func newActionFS(r *InputRoot, root cas.Digest, known map[cas.Digest]*repb.Directory, stage string, lower bool, owner [2]uint32, spare bool) *actionFS {
	afs := &actionFS{
		owner:   owner,
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
	afs.user.Store(int64(owner[0]))
	if spare {
		afs.user.Store(-1)
		afs.expire = time.Time{}
	}
	rootNode := &node{kind: kindDir, input: true, dirDigest: root, mode: os.ModeDir | afs.inputDirPerm()}
	afs.setInputAttrs(rootNode)
	afs.register(rootNode)
	afs.root = rootNode
	afs.probe = &node{kind: kindFile, input: true, digest: cas.EmptyDigest, nlink: 1, mode: 0o444, parent: rootNode, name: pollProbeName}
	setTimes(afs.probe, inputTime)
	afs.register(afs.probe)
	return afs
}

// setRoot gives a spare mount (mounted over the empty tree, served to
// root only, nothing cached by the kernel) its input root and the uid of
// the action that will use it.
func (afs *actionFS) setRoot(root cas.Digest, known map[cas.Digest]*repb.Directory, uid uint32) {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	afs.known = known
	afs.root.dirDigest, afs.root.dir, afs.root.inputs = root, nil, nil
	afs.expire = time.Now().Add(cacheFor)
	afs.user.Store(int64(uid))
}

// serves reports whether requests of uid are served.
func (afs *actionFS) serves(uid uint32) bool {
	return uid == 0 || int64(uid) == afs.user.Load()
}

// disablePoll makes the kernel stop sending FUSE_POLL for files of the
// mount at dir. Go's runtime registers every file it opens with epoll from
// inside the runtime, holding its P; on a FUSE file that sends FUSE_POLL
// and waits for this very process to answer, and once GOMAXPROCS threads
// wait so, nothing can answer. The first FUSE_POLL answered with ENOSYS
// (which fuseutil does for ops it does not know) turns polling off for the
// connection, so it is sent here from a plain system call, on a hidden
// empty file that only exists while this runs.
func (afs *actionFS) disablePoll(dir string) error {
	afs.mu.Lock()
	afs.probing = true
	afs.mu.Unlock()
	defer func() {
		afs.mu.Lock()
		afs.probing = false
		afs.mu.Unlock()
	}()
	fd, err := unix.Open(filepath.Join(dir, pollProbeName), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("open probe file: %w", err)
	}
	defer unix.Close(fd)
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return fmt.Errorf("epoll_create: %w", err)
	}
	defer unix.Close(ep)
	// Not unix.EpollCtl: that is a raw system call, which would keep this
	// thread's P while the server (this process) has to answer.
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}
	_, _, errno := syscall.Syscall6(unix.SYS_EPOLL_CTL, uintptr(ep), unix.EPOLL_CTL_ADD, uintptr(fd), uintptr(unsafe.Pointer(&ev)), 0, 0)
	if errno != 0 && errno != unix.EPERM {
		return fmt.Errorf("epoll_ctl: %w", errno)
	}
	return nil
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
func (afs *actionFS) refuse(op, path string) error {
	afs.nRefused++
	r := Refusal{Op: op, Path: path}
	if len(afs.refused) < maxRefusals && !slices.Contains(afs.refused, r) {
		afs.refused = append(afs.refused, r)
	}
	afs.log.Debug("actiondfs: refused a change to an input", "op", op, "path", path)
	return syscall.EROFS
}

// Refused returns the refusals so far and how many there were in all.
func (afs *actionFS) Refused() ([]Refusal, int) {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	return slices.Clone(afs.refused), afs.nRefused
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

// errnoOf extracts the errno of a failed system call (EIO otherwise).
func errnoOf(err error) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return syscall.EIO
}

// StatFS reports the space of the stage's file system.
func (afs *actionFS) StatFS(ctx context.Context, op *fuseops.StatFSOp) error {
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(afs.stage), &st); err != nil {
		return nil
	}
	op.BlockSize = uint32(st.Bsize)
	op.Blocks, op.BlocksFree, op.BlocksAvailable = st.Blocks, st.Bfree, st.Bavail
	op.IoSize = 1 << 20
	op.Inodes, op.InodesFree = st.Files, st.Ffree
	return nil
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
	if op.Entry, err = afs.entry(ctx, c); err != nil {
		return err
	}
	lookedUp(c)
	return nil
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

// MkDir serves the op.
func (afs *actionFS) MkDir(ctx context.Context, op *fuseops.MkDirOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	p, err := afs.getDir(op.Parent)
	if err != nil {
		return err
	}
	uid, gid := creds(ctx, op.OpContext)
	if err := afs.newEntryCheck(ctx, p, op.Name, uid, gid); err != nil {
		return err
	}
	n := &node{kind: kindDir, mode: os.ModeDir | op.Mode&(os.ModePerm|specialBits)}
	afs.addStaged(p, op.Name, n, uid, gid)
	if op.Entry, err = afs.entry(ctx, n); err != nil {
		return err
	}
	lookedUp(n)
	return nil
}

// MkNode serves the op: regular files, FIFOs and sockets.
func (afs *actionFS) MkNode(ctx context.Context, op *fuseops.MkNodeOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	p, err := afs.getDir(op.Parent)
	if err != nil {
		return err
	}
	uid, gid := creds(ctx, op.OpContext)
	if err := afs.newEntryCheck(ctx, p, op.Name, uid, gid); err != nil {
		return err
	}
	perm := op.Mode & (os.ModePerm | specialBits)
	var n *node
	switch op.Mode.Type() {
	case 0:
		path, f, err := afs.newBacking()
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
	afs.addStaged(p, op.Name, n, uid, gid)
	if op.Entry, err = afs.entry(ctx, n); err != nil {
		return err
	}
	lookedUp(n)
	return nil
}

// CreateFile serves the op.
func (afs *actionFS) CreateFile(ctx context.Context, op *fuseops.CreateFileOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	p, err := afs.getDir(op.Parent)
	if err != nil {
		return err
	}
	uid, gid := creds(ctx, op.OpContext)
	if err := afs.newEntryCheck(ctx, p, op.Name, uid, gid); err != nil {
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
	afs.addStaged(p, op.Name, n, uid, gid)
	if op.Entry, err = afs.entry(ctx, n); err != nil {
		return err
	}
	lookedUp(n)
	op.Handle = afs.newHandle(&handle{n: n})
	return nil
}

// CreateSymlink serves the op.
func (afs *actionFS) CreateSymlink(ctx context.Context, op *fuseops.CreateSymlinkOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	p, err := afs.getDir(op.Parent)
	if err != nil {
		return err
	}
	uid, gid := creds(ctx, op.OpContext)
	if err := afs.newEntryCheck(ctx, p, op.Name, uid, gid); err != nil {
		return err
	}
	n := &node{kind: kindSymlink, target: op.Target, nlink: 1, mode: os.ModeSymlink | 0o777}
	afs.addStaged(p, op.Name, n, uid, gid)
	if op.Entry, err = afs.entry(ctx, n); err != nil {
		return err
	}
	lookedUp(n)
	return nil
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
	if op.Entry, err = afs.entry(ctx, t); err != nil {
		return err
	}
	lookedUp(t)
	return nil
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
	if afs.lower {
		return syscall.EROFS
	}
	p, err := afs.getDir(op.Parent)
	if err != nil {
		return err
	}
	c, err := afs.child(ctx, p, op.Name)
	switch {
	case err != nil:
		return err
	case c == nil:
		return syscall.ENOENT
	case c.kind != kindDir:
		return syscall.ENOTDIR
	case p.staged[op.Name] != c:
		return afs.refuse("remove directory", joinPath(p, op.Name))
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
	c.removed = true
	afs.maybeDrop(c)
	now := time.Now()
	p.mtime, p.ctime = now, now
	return nil
}

// Unlink serves the op.
func (afs *actionFS) Unlink(ctx context.Context, op *fuseops.UnlinkOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	if afs.lower {
		return syscall.EROFS
	}
	p, err := afs.getDir(op.Parent)
	if err != nil {
		return err
	}
	c, err := afs.child(ctx, p, op.Name)
	switch {
	case err != nil:
		return err
	case c == nil:
		return syscall.ENOENT
	case c.kind == kindDir:
		return syscall.EISDIR
	case p.staged[op.Name] != c:
		return afs.refuse("remove", joinPath(p, op.Name))
	}
	uid, gid := creds(ctx, op.OpContext)
	if !allowed(p, uid, gid, wantW|wantX) {
		return syscall.EACCES
	}
	if stickyDenied(p, c, uid) {
		return syscall.EPERM
	}
	delete(p.staged, op.Name)
	afs.dropLink(c)
	afs.maybeDrop(c)
	now := time.Now()
	p.mtime, p.ctime = now, now
	return nil
}

func (afs *actionFS) newHandle(h *handle) fuseops.HandleID {
	afs.nextHandle++
	afs.handles[afs.nextHandle] = h
	return afs.nextHandle
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
		afs.mu.Unlock()
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
	var f *os.File
	if h != nil {
		if h.blob != nil {
			f = h.blob.f
		} else {
			f = h.n.f
		}
	}
	afs.mu.Unlock()
	if h == nil {
		return syscall.EBADF
	}
	if f == nil { // the empty blob
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
	n, err := f.ReadAt(dst, op.Offset)
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
	h := afs.handles[op.Handle]
	if h == nil || h.n.input || h.n.f == nil {
		afs.mu.Unlock()
		return syscall.EBADF
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

// Fallocate serves the op.
func (afs *actionFS) Fallocate(ctx context.Context, op *fuseops.FallocateOp) error {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	h := afs.handles[op.Handle]
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

// Destroy is called when the mount is gone.
func (afs *actionFS) Destroy() {
	afs.mu.Lock()
	defer afs.mu.Unlock()
	for id, h := range afs.handles {
		if h.blob != nil {
			afs.blobs.release(h.blob)
		}
		delete(afs.handles, id)
	}
	for _, n := range afs.nodes {
		if n.f != nil {
			n.f.Close()
			n.f = nil
		}
	}
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
