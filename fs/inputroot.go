//go:build linux

package fs

// InputRoot: actiondfs as the executor's input-root strategy, its options,
// spare mounts made ahead of time, crash leftovers, and the probe that
// tells whether FUSE works here. One mount is in mount.go.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	"github.com/actiond/actiond/internal/mountinfo"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
)

// Defaults for the shared caches.
const (
	DefaultDirCacheBytes = 64 << 20
	DefaultOpenBlobs     = 1024
)

// InputRoot stages input trees as actiondfs mounts, one FUSE mount per
// action (a mount costs well under a millisecond; separate mounts keep
// actions' inode tables, staged files and refusals apart and make cleanup
// a single unmount). Directory messages and open blob files are shared by
// all mounts. It implements executor.InputRoot and executor.OptionsInputRoot.
//
// State lives under stateDir, which must be on the CAS's file system so
// that staged outputs move into the CAS by rename: stage/<id>/ holds the
// bytes of files actions create (and the overlay upper and work
// directories), mnt/<id> the lower FUSE mounts of mutates_inputs overlays.
type InputRoot struct {
	store    cas.LocalStore
	stateDir string
	log      *slog.Logger
	dirs     *dirCache
	blobs    *blobFiles
	// fuseTag and overlayTag are the mount sources of this root's mounts,
	// by which stale mounts are recognised after a crash.
	fuseTag, overlayTag string
	seq                 atomic.Uint64
	owner               [2]uint32 // of inputs in mutates_inputs overlays

	mu         sync.Mutex
	mounts     map[*Mount]struct{}
	overlayErr error // why mutates_inputs falls back to copies, once known
	// spares are strict mounts of the empty tree made ahead of time (see
	// WithSpareMounts); refilling tells whether a goroutine makes more.
	spares    []*Mount
	maxSpares int
	refilling bool
	refiller  sync.WaitGroup
	closed    bool
}

// Option configures an InputRoot.
type Option func(*config)

type config struct {
	log           *slog.Logger
	dirCacheBytes int64
	openBlobs     int
	owner         [2]uint32
	spares        int
}

// DefaultSpareMounts is how many strict mounts are kept ready by default.
const DefaultSpareMounts = 2

// WithSpareMounts keeps n strict mounts made ahead of time, so that an
// action's input root is ready without waiting for mount(2) and the FUSE
// handshake (default DefaultSpareMounts; 0 mounts on demand). Spare mounts
// live under the state directory: Stage then reports that directory as the
// execroot (executor.StagedRoot.Dir) instead of mounting at the one asked.
func WithSpareMounts(n int) Option { return func(c *config) { c.spares = max(n, 0) } }

// WithSandboxUser names the user actions run as when the executor does
// not say (MountOptions.User, StageOptions.User; default 65534:65534).
// Mounts serve only root and that user. In mutates_inputs overlays it
// owns the inputs, so that the command may rewrite, replace and remove
// them (the sandbox makes writable directories sticky).
func WithSandboxUser(uid, gid uint32) Option {
	return func(c *config) { c.owner = [2]uint32{uid, gid} }
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.log = l } }

// WithDirCacheSize bounds the shared Directory cache, in encoded bytes
// (default DefaultDirCacheBytes).
func WithDirCacheSize(n int64) Option { return func(c *config) { c.dirCacheBytes = n } }

// WithOpenBlobs bounds how many unused blob files stay open for later
// actions (default DefaultOpenBlobs).
func WithOpenBlobs(n int) Option { return func(c *config) { c.openBlobs = n } }

// NewInputRoot returns an InputRoot serving blobs of store, with its state
// under stateDir. It fails when FUSE does not work here (see Available).
// Mounts left by a crashed process with the same stateDir are removed.
func NewInputRoot(store cas.LocalStore, stateDir string, opts ...Option) (*InputRoot, error) {
	c := config{log: slog.Default(), dirCacheBytes: DefaultDirCacheBytes, openBlobs: DefaultOpenBlobs, owner: [2]uint32{65534, 65534}, spares: DefaultSpareMounts}
	for _, o := range opts {
		o(&c)
	}
	if err := Available(); err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(stateDir)
	if err != nil {
		return nil, fmt.Errorf("actiondfs state dir: %w", err)
	}
	r := &InputRoot{
		store:      store,
		stateDir:   abs,
		log:        c.log,
		dirs:       newDirCache(store, c.dirCacheBytes),
		blobs:      newBlobFiles(store, c.openBlobs),
		owner:      c.owner,
		fuseTag:    "actiondfs@" + abs,
		overlayTag: "actiondfs-overlay@" + abs,
		mounts:     make(map[*Mount]struct{}),
		maxSpares:  c.spares,
	}
	// Private: spare mounts, staged outputs and overlay layers are no
	// business of other local users, and the sandbox shows an action its
	// mount through its own mount namespace, not through these paths.
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("create actiondfs state dir: %w", err)
	}
	if err := os.Chmod(abs, 0o700); err != nil {
		return nil, fmt.Errorf("actiondfs state dir: %w", err)
	}
	if err := r.removeStale(); err != nil {
		return nil, err
	}
	for _, d := range []string{"stage", "mnt"} {
		p := filepath.Join(abs, d)
		if err := os.RemoveAll(p); err != nil {
			return nil, fmt.Errorf("remove leftovers in %s: %w", p, err)
		}
		if err := os.Mkdir(p, 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", p, err)
		}
	}
	if strings.ContainsAny(abs, ",:\\") {
		r.overlayErr = fmt.Errorf("state dir %q contains a character overlayfs options cannot hold", abs)
	}
	// The empty blob's file shows where the store keeps its files.
	if p, err := store.BlobPath(cas.EmptyDigest, false); err == nil && !sameFS(filepath.Dir(p), abs) {
		r.log.Warn("actiondfs state dir is not on the CAS's file system; outputs will be copied into the CAS instead of renamed",
			"state_dir", abs, "cas_dir", filepath.Dir(p))
	}
	r.mu.Lock()
	r.refillLocked()
	r.mu.Unlock()
	return r, nil
}

// refillLocked starts a goroutine making spare mounts unless one runs or
// there are enough. Called with r.mu held.
func (r *InputRoot) refillLocked() {
	if r.refilling || r.closed || len(r.spares) >= r.maxSpares {
		return
	}
	r.refilling = true
	r.refiller.Add(1)
	go func() {
		defer r.refiller.Done()
		for {
			r.mu.Lock()
			if r.closed || len(r.spares) >= r.maxSpares {
				r.refilling = false
				r.mu.Unlock()
				return
			}
			r.mu.Unlock()
			id := r.nextID()
			m, err := r.mount(context.Background(), cas.EmptyDigest, filepath.Join(r.stateDir, "mnt", id), id, MountOptions{spare: true})
			if m != nil {
				m.spare = true // its mount point is its own: Unmount removes it
			}
			r.mu.Lock()
			if err != nil {
				r.log.Warn("actiondfs: cannot make spare mounts; mounting on demand", "err", err)
				r.maxSpares = 0
			} else if r.closed {
				r.mu.Unlock()
				m.Unmount()
				r.mu.Lock()
			} else {
				r.spares = append(r.spares, m)
			}
			r.mu.Unlock()
		}
	}()
}

// takeSpare returns a spare mount showing root to uid, or nil.
func (r *InputRoot) takeSpare(root cas.Digest, known map[cas.Digest]*repb.Directory, uid uint32) *Mount {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.spares) == 0 {
		r.refillLocked()
		return nil
	}
	m := r.spares[len(r.spares)-1]
	r.spares = r.spares[:len(r.spares)-1]
	r.refillLocked()
	m.fs.setRoot(root, known, uid)
	return m
}

func (r *InputRoot) nextID() string { return "a" + strconv.FormatUint(r.seq.Add(1), 10) }

func sameFS(a, b string) bool {
	var sa, sb unix.Stat_t
	return unix.Stat(a, &sa) == nil && unix.Stat(b, &sb) == nil && sa.Dev == sb.Dev
}

// Name implements executor.InputRoot.
func (r *InputRoot) Name() string { return "fuse" }

// Stage implements executor.InputRoot: a strict mount of tree at dir (a
// new mount: spares are mounted elsewhere, and Stage has no way to say so).
func (r *InputRoot) Stage(ctx context.Context, tree *executor.InputTree, dir string) (func() error, error) {
	m, err := r.Mount(ctx, tree.Root, dir, MountOptions{Dirs: tree.Dirs})
	if err != nil {
		return nil, err
	}
	return m.Unmount, nil
}

// SpareMounts is how many spare mounts are ready now.
func (r *InputRoot) SpareMounts() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.spares)
}

// StageWithOptions implements executor.OptionsInputRoot: a strict mount,
// or for mutates_inputs an overlay over a read-only mount (or, where
// overlayfs does not work, a copy the executor makes writable).
func (r *InputRoot) StageWithOptions(ctx context.Context, tree *executor.InputTree, dir string, opts executor.StageOptions) (*executor.StagedRoot, error) {
	if !opts.MutatesInputs && tree.FileCount == 0 && tree.Entries <= plainTreeMaxEntries {
		return r.stagePlain(ctx, tree, dir)
	}
	if opts.MutatesInputs {
		r.mu.Lock()
		overlayErr := r.overlayErr
		r.mu.Unlock()
		if overlayErr != nil {
			return r.stageCopy(ctx, tree, dir)
		}
	} else if m := r.takeSpare(tree.Root, tree.Dirs, r.userOf(opts.User)[0]); m != nil {
		return m.staged(), nil
	}
	m, err := r.Mount(ctx, tree.Root, dir, MountOptions{Dirs: tree.Dirs, Writable: opts.MutatesInputs, User: opts.User})
	var oe *overlayError
	if errors.As(err, &oe) {
		r.mu.Lock()
		if r.overlayErr == nil {
			r.log.Warn("actiondfs: overlayfs does not work here; mutates_inputs actions get a copy of their inputs", "err", err)
			r.overlayErr = err
		}
		r.mu.Unlock()
		return r.stageCopy(ctx, tree, dir)
	}
	if err != nil {
		return nil, err
	}
	return m.staged(), nil
}

// plainTreeMaxEntries bounds the input trees without files that are
// staged as plain directories: a hostile tree of a million empty
// directories stays lazy, behind a mount.
const plainTreeMaxEntries = 256

// stagePlain stages a small tree without files (directories and symlinks:
// a genrule with no inputs, say) as plain root-owned directories, as the
// mount would present them: there is no blob to serve or to protect, and
// a mount, its spare and its unmount cost more CPU than the action's
// command. The root reports itself self-protected like a mount, so the
// action may write what it could write on one: its output directories,
// and anything if it runs as root.
func (r *InputRoot) stagePlain(ctx context.Context, tree *executor.InputTree, dir string) (*executor.StagedRoot, error) {
	cleanup, err := executor.LinkInputRoot{Store: r.store}.Stage(ctx, tree, dir)
	if err != nil {
		return nil, err
	}
	return &executor.StagedRoot{Cleanup: cleanup, SelfProtected: true}, nil
}

func (r *InputRoot) stageCopy(ctx context.Context, tree *executor.InputTree, dir string) (*executor.StagedRoot, error) {
	cleanup, err := executor.CopyInputRoot{Store: r.store}.Stage(ctx, tree, dir)
	if err != nil {
		return nil, err
	}
	return &executor.StagedRoot{Cleanup: cleanup}, nil
}

// userOf returns the uid and gid of u, or of the default sandbox user.
func (r *InputRoot) userOf(u *executor.User) [2]uint32 {
	if u == nil {
		return r.owner
	}
	return [2]uint32{uint32(u.UID), uint32(u.GID)}
}

// Close unmounts whatever is still mounted and closes cached blob files.
func (r *InputRoot) Close() error {
	r.mu.Lock()
	r.closed = true
	r.spares = nil
	r.mu.Unlock()
	r.refiller.Wait() // a spare being made is unmounted by its maker
	r.mu.Lock()
	var ms []*Mount
	for m := range r.mounts {
		ms = append(ms, m)
	}
	r.mu.Unlock()
	var errs []error
	for _, m := range ms {
		errs = append(errs, m.Unmount())
	}
	r.blobs.closeIdle()
	return errors.Join(errs...)
}

// removeStale unmounts what a crashed process with the same state dir
// left: mounts with this root's sources, and actiondfs or overlay mounts
// below the state dir. Deepest first, lazily (a dead FUSE server cannot
// answer anything).
func (r *InputRoot) removeStale() error {
	ents, err := mountinfo.Read()
	if err != nil {
		return fmt.Errorf("actiondfs: %w", err)
	}
	var stale []string
	for _, e := range ents {
		below := strings.HasPrefix(e.Point, r.stateDir+"/") && (e.FSType == "fuse.actiondfs" || e.FSType == "overlay")
		if below || e.Source == r.fuseTag || e.Source == r.overlayTag {
			stale = append(stale, e.Point)
		}
	}
	// Longer paths first: children before the mounts they sit on.
	for i := range stale {
		for j := i + 1; j < len(stale); j++ {
			if len(stale[j]) > len(stale[i]) {
				stale[i], stale[j] = stale[j], stale[i]
			}
		}
	}
	for _, p := range stale {
		err := unix.Unmount(p, unix.MNT_DETACH)
		if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("actiondfs: remove stale mount %s: %w", p, err)
		}
		r.log.Info("actiondfs: removed a stale mount from an earlier run", "dir", p)
	}
	return nil
}

var (
	availableOnce sync.Once
	availableErr  error
)

// Available reports whether actiondfs works here: root, /dev/fuse, and a
// real test mount (the result of the first call is kept).
func Available() error {
	availableOnce.Do(func() { availableErr = probe() })
	return availableErr
}

func probe() error {
	if os.Geteuid() != 0 {
		return errors.New("actiondfs needs root (it mounts with mount(2))")
	}
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("actiondfs: %w", err)
	}
	f.Close()
	dir, err := os.MkdirTemp("", "actiondfs-probe-")
	if err != nil {
		return fmt.Errorf("actiondfs probe: %w", err)
	}
	defer os.Remove(dir)
	r := &InputRoot{log: slog.Default(), dirs: newDirCache(nil, 0), fuseTag: "actiondfs-probe"}
	afs := newActionFS(r, cas.EmptyDigest, nil, filepath.Join(dir, "stage"), false, r.owner, false)
	mfs, err := r.mountFUSE(dir, afs, false)
	if err != nil {
		return fmt.Errorf("actiondfs probe mount: %w", err)
	}
	statErr := afs.disablePoll(dir)
	if statErr == nil {
		_, statErr = os.ReadDir(dir)
	}
	if err := unmountDir(dir); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	mfs.Join(ctx)
	if statErr != nil {
		return fmt.Errorf("actiondfs probe: list the test mount: %w", statErr)
	}
	return nil
}

var _ executor.OptionsInputRoot = (*InputRoot)(nil)
