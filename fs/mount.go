//go:build linux

package fs

// One mount of an input root: mounting (FUSE, and the overlay for
// mutates_inputs), unmounting, and what the executor asks of a mount once
// the command is done (refusals, output files).

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/jacobsa/fuse"
	"golang.org/x/sys/unix"
)

// staged describes m to the executor; a spare is not where it was asked
// for, so its directory is named.
func (m *Mount) staged() *executor.StagedRoot {
	s := &executor.StagedRoot{Cleanup: m.Unmount, SelfProtected: true, OutputPath: m.OutputPath, Report: m.Report}
	if m.spare {
		s.Dir = m.dir
	}
	return s
}

// MountOptions configure one mount.
type MountOptions struct {
	// Dirs are Directory messages already fetched and validated (the
	// executor's InputTree.Dirs); others are read from the CAS on demand.
	Dirs map[cas.Digest]*repb.Directory
	// Writable selects the mutates_inputs mode: an overlayfs with a
	// private upper directory over a read-only mount of the tree.
	Writable bool
	// User is who the command runs as: the mount serves only root and
	// this user, who in Writable mode owns the inputs. Nil means the
	// user of WithSandboxUser.
	User *executor.User

	spare bool // a spare: the empty tree, served to root only until setRoot
}

// Mount is one mounted input root.
type Mount struct {
	r       *InputRoot
	dir     string // what the caller sees
	fuseDir string // where the FUSE file system is mounted
	overlay bool
	spare   bool      // made ahead of time, at a mount point of its own
	stage   string    // per-mount state under stateDir/stage
	owner   [2]uint32 // the action's user (uid, gid)
	upper   string    // overlay upper directory
	fs      *actionFS
	mfs     *fuse.MountedFileSystem

	unmountOnce sync.Once
	unmountErr  error
	syncOnce    sync.Once
	links       atomic.Uint64
}

// overlayError is a failure to set up the overlay of a writable mount.
type overlayError struct{ err error }

func (e *overlayError) Error() string { return "overlayfs: " + e.err.Error() }

func (e *overlayError) Unwrap() error { return e.err }

// Mount shows the input root with digest root at dir, which must not exist
// yet. Unmount it when done.
func (r *InputRoot) Mount(ctx context.Context, root cas.Digest, dir string, opts MountOptions) (*Mount, error) {
	return r.mount(ctx, root, dir, r.nextID(), opts)
}

func (r *InputRoot) mount(ctx context.Context, root cas.Digest, dir, id string, opts MountOptions) (*Mount, error) {
	m := &Mount{r: r, dir: dir, fuseDir: dir, overlay: opts.Writable, stage: filepath.Join(r.stateDir, "stage", id), owner: r.userOf(opts.User)}
	if m.overlay {
		m.fuseDir = filepath.Join(r.stateDir, "mnt", id)
		if err := os.Mkdir(m.fuseDir, 0o755); err != nil {
			return nil, fmt.Errorf("actiondfs: create mount point: %w", err)
		}
	} else if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, fmt.Errorf("actiondfs: create mount point: %w", err)
	}
	m.fs = newActionFS(r, root, opts.Dirs, filepath.Join(m.stage, "files"), m.overlay, m.owner, opts.spare)
	mfs, err := r.mountFUSE(m.fuseDir, m.fs, m.overlay)
	if err != nil {
		os.Remove(m.fuseDir)
		return nil, fmt.Errorf("actiondfs: mount %s: %w", m.fuseDir, err)
	}
	m.mfs = mfs
	if err := m.fs.disablePoll(m.fuseDir); err != nil {
		unmountDir(m.fuseDir)
		m.join()
		os.Remove(m.fuseDir)
		return nil, fmt.Errorf("actiondfs: mount %s: %w", m.fuseDir, err)
	}
	if m.overlay {
		if err := m.mountOverlay(); err != nil {
			unmountDir(m.fuseDir)
			m.join()
			os.Remove(m.fuseDir)
			os.RemoveAll(m.stage)
			return nil, err
		}
	}
	r.mu.Lock()
	r.mounts[m] = struct{}{}
	r.mu.Unlock()
	return m, nil
}

func (m *Mount) mountOverlay() error {
	m.upper = filepath.Join(m.stage, "upper")
	work := filepath.Join(m.stage, "work")
	for _, d := range []string{m.upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("actiondfs: create overlay directory: %w", err)
		}
	}
	// The upper directory is the overlay's root: owned like the inputs,
	// and the owner's alone.
	if err := os.Chown(m.upper, int(m.owner[0]), int(m.owner[1])); err != nil {
		return fmt.Errorf("actiondfs: overlay directory: %w", err)
	}
	if err := os.Chmod(m.upper, 0o755); err != nil {
		return fmt.Errorf("actiondfs: overlay directory: %w", err)
	}
	if err := os.Mkdir(m.dir, 0o755); err != nil {
		return fmt.Errorf("actiondfs: create mount point: %w", err)
	}
	data := "lowerdir=" + m.fuseDir + ",upperdir=" + m.upper + ",workdir=" + work + ",index=off,metacopy=off"
	if err := unix.Mount(m.r.overlayTag, m.dir, "overlay", 0, data); err != nil {
		os.Remove(m.dir)
		return &overlayError{fmt.Errorf("mount %s: %w", m.dir, err)}
	}
	return nil
}

// mountConfig is the connection's configuration (the options of the
// mount itself are mountFUSE's).
func (r *InputRoot) mountConfig() *fuse.MountConfig {
	return &fuse.MountConfig{
		// Writes must reach the stage file before the command ends, so
		// outputs can be taken from there.
		DisableWritebackCaching: true,
		EnableAtomicTrunc:       true,
		EnableParallelDirOps:    true,
		EnableSymlinkCaching:    true,
		EnableAsyncReads:        true,
		// Every request buffer is this big plus a page, and each mount
		// allocates its own: 1 MiB (the default) makes mounting slower.
		MaxWrite: maxWrite,
		MaxPages: maxRead / 4096,
	}
}

// Request sizes: writes of staged files arrive in pieces of at most
// maxWrite bytes; reads ask for up to maxRead.
const (
	maxWrite = 128 << 10
	maxRead  = 1 << 20
)

// Dir is where the input root is visible.
func (m *Mount) Dir() string { return m.dir }

// Unmount removes the mount and the files the command created that were
// not moved out; it may be called more than once.
func (m *Mount) Unmount() error {
	m.unmountOnce.Do(func() {
		var errs []error
		if m.overlay {
			errs = append(errs, unmountDir(m.dir))
		}
		if err := unmountDir(m.fuseDir); err != nil {
			errs = append(errs, err)
		} else {
			m.join()
		}
		if m.overlay || m.spare {
			os.Remove(m.fuseDir)
		}
		if err := os.RemoveAll(m.stage); err != nil {
			errs = append(errs, fmt.Errorf("actiondfs: remove stage: %w", err))
		}
		m.r.mu.Lock()
		delete(m.r.mounts, m)
		m.r.mu.Unlock()
		m.unmountErr = errors.Join(errs...)
	})
	return m.unmountErr
}

// join waits (a bounded time) for the server to finish after unmounting.
func (m *Mount) join() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := m.mfs.Join(ctx); err != nil {
		m.r.log.Warn("actiondfs: server did not stop after unmount", "dir", m.fuseDir, "err", err)
	}
}

// unmountDir unmounts dir with umount(2), lazily if it is busy.
func unmountDir(dir string) error {
	err := unix.Unmount(dir, 0)
	if errors.Is(err, unix.EBUSY) {
		err = unix.Unmount(dir, unix.MNT_DETACH)
	}
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
		return nil // not mounted (any more)
	}
	if err != nil {
		return fmt.Errorf("actiondfs: unmount %s: %w", dir, err)
	}
	return nil
}

// Refused lists the refused changes to inputs (at most 50, without
// repeats) and how many attempts there were in all.
func (m *Mount) Refused() ([]Refusal, int) { return m.fs.Refused() }

// Report describes the refused changes for the user (nil when there were
// none): which inputs the command tried to change and how to allow it.
func (m *Mount) Report() []string {
	refused, n := m.fs.Refused()
	if n == 0 {
		return nil
	}
	lines := []string{"actiond: the command tried to change input files, which are read-only (EROFS):"}
	for _, r := range refused {
		lines = append(lines, fmt.Sprintf("  %s: %s", r.Op, r.Path))
	}
	if n > len(refused) {
		lines = append(lines, fmt.Sprintf("  (%d attempts in all)", n))
	}
	return append(lines, `actiond: if the tool must modify its inputs, set the platform property mutates_inputs=1 on the action (Bazel: exec_properties = {"mutates_inputs": "1"}).`)
}

// OutputPath returns the file holding the bytes of the regular file at rel
// (relative to the root) when the command created it, so that it can be
// moved into the CAS by rename; "" otherwise. Call it only after
// everything that wrote to the mount has exited.
//
// An input declared as an output (and, in an overlay, left untouched) is
// answered with a new hard link to its CAS blob: the CAS copies a file
// with other links instead of renaming it, and removes the link.
func (m *Mount) OutputPath(rel string) string {
	ctx := context.Background()
	if m.overlay {
		if p := regularBeneath(m.upper, rel); p != "" {
			return p
		}
		if !m.lowerVisible(rel) {
			return ""
		}
		if n, err := m.fs.resolve(ctx, rel); err == nil && n.input && n.kind == kindFile {
			return m.linkBlob(n.digest)
		}
		return ""
	}
	m.syncOnce.Do(func() {
		// Dirty pages of shared writable mappings reach the server when
		// the mapping goes away; flush anything still pending anyway.
		if fd, err := unix.Open(m.dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err == nil {
			unix.Syncfs(fd)
			unix.Close(fd)
		}
	})
	p, input := m.fs.backingOf(ctx, rel)
	if input != nil {
		return m.linkBlob(*input)
	}
	return p
}

// lowerVisible reports whether the overlay shows the lower layer's entry
// at rel: the upper layer has nothing there, and no directory on the way
// there that redirects or hides the lower one.
func (m *Mount) lowerVisible(rel string) bool {
	p := m.upper
	parts := strings.Split(rel, "/")
	for i, c := range parts {
		p = filepath.Join(p, c)
		fi, err := os.Lstat(p)
		if errors.Is(err, os.ErrNotExist) {
			return true
		}
		if err != nil || i == len(parts)-1 || !fi.IsDir() {
			return false
		}
		for _, x := range []string{"trusted.overlay.redirect", "trusted.overlay.opaque"} {
			if _, err := unix.Lgetxattr(p, x, nil); !errors.Is(err, unix.ENODATA) {
				return false
			}
		}
	}
	return false
}

// linkBlob returns a new hard link, in the stage, to the CAS blob d.
func (m *Mount) linkBlob(d cas.Digest) string {
	src, err := m.r.store.BlobPath(d, false)
	if err != nil {
		return ""
	}
	if err := os.MkdirAll(m.stage, 0o700); err != nil {
		return ""
	}
	dst := filepath.Join(m.stage, "link-"+strconv.FormatUint(m.links.Add(1), 10))
	if err := os.Link(src, dst); err != nil {
		return ""
	}
	return dst
}

// regularBeneath returns root/rel if it is a regular file with one link,
// reached without following symlinks.
func regularBeneath(root, rel string) string {
	dfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return ""
	}
	defer unix.Close(dfd)
	fd, err := unix.Openat2(dfd, rel, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV,
	})
	if err != nil {
		return ""
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Nlink != 1 {
		return ""
	}
	return filepath.Join(root, filepath.FromSlash(rel))
}
