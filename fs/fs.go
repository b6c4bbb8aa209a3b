//go:build linux

package fs

// The file system of one mount (actionFS): its state, its life cycle
// (spare mounts, the poll probe, Destroy) and the refusals it records. The
// FUSE ops are in fileops.go and dirops.go, nodes in nodes.go, name
// resolution in resolve.go and permission checks in permissions.go.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/jacobsa/fuse/fuseops"
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
	// dev is the mount's /dev/fuse descriptor, for notifications (-1
	// until mounted); owned by the connection, which outlives every op.
	dev int

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
		dev:     -1,
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
