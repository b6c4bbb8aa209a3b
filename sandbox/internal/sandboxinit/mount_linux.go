package sandboxinit

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// hostSystemDirs are the host directories the host runtime exposes. Each is
// bound read-only, or recreated as a symlink where the host has one
// (merged-/usr systems).
var hostSystemDirs = []string{"/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"}

// hostEtcEntries are what the host runtime takes from the host's /etc.
var hostEtcEntries = []string{"ld.so.cache", "alternatives"}

// ownedTopLevel are top-level names the sandbox provides itself, so a
// directory runtime's own entries of that name are not used (nor is the
// top-level directory of the execroot mount).
var ownedTopLevel = map[string]bool{"dev": true, "proc": true, "sys": true, "tmp": true, "etc": true}

// Mount attribute sets.
const (
	attrReadOnly = unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV
	attrWritable = unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV
	attrDevice   = unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NOEXEC
)

// buildRoot builds the action's root file system at spec.RootDir and pivots
// into it. It runs in the helper, in the new mount namespace.
//
// trees holds detached mount trees (see Spec.Files) to use instead of the
// paths spec.ExecRoot and spec.Runtime.Root, or -1.
func buildRoot(spec *Spec, trees treeFDs) error {
	if err := makePrivate(); err != nil {
		return err
	}
	if err := buildBase(spec, trees.runtime); err != nil {
		return err
	}
	generated, err := generatedEtcNames(spec.EtcDir)
	if err != nil {
		return err
	}
	return finishRoot(spec, trees.execRoot, generated)
}

// makePrivate makes every mount of the calling thread's mount namespace
// private: nothing mounted in it may propagate back to the host.
func makePrivate() error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making / private: %w", err)
	}
	return nil
}

// buildBase builds, at spec.RootDir, the part of an action's root that does
// not depend on the action: a read-only tmpfs with the runtime's system
// directories, /etc (with empty files where the generated ones go), /dev
// (without /dev/shm), and the mount points of what finishRoot adds. A kept
// helper builds it once per runtime as its template (see template) and each
// action's mount namespace starts with a copy of it.
//
// runtimeFD is a detached tree of spec.Runtime.Root, or -1.
func buildBase(spec *Spec, runtimeFD int) error {
	root := spec.RootDir
	if err := mountTmpfs(root, "mode=0755,size=1m", unix.MS_NOSUID|unix.MS_NODEV); err != nil {
		return err
	}
	// A runtime tree is moved to a scratch point in the new root while
	// its entries are bound, then removed.
	runtimeStage := ""
	if runtimeFD >= 0 {
		runtimeStage = join(root, ".actiond-runtime")
		if err := os.Mkdir(runtimeStage, 0o700); err != nil {
			return err
		}
		if err := attachTree(runtimeFD, runtimeStage); err != nil {
			return fmt.Errorf("runtime %q: %w", spec.Runtime.Name, err)
		}
		staged := *spec
		staged.Runtime.Root = runtimeStage
		spec = &staged
	}
	steps := []func() error{
		func() error { return mountRuntime(root, spec) },
		func() error { return mountEtc(root, spec) },
		func() error {
			if runtimeStage == "" {
				return nil
			}
			if err := unix.Unmount(runtimeStage, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("runtime %q: %w", spec.Runtime.Name, err)
			}
			return os.Remove(runtimeStage)
		},
		func() error { return os.MkdirAll(join(root, spec.ExecRootMount), 0o755) },
		func() error { return os.Mkdir(join(root, "tmp"), 0o755) },
		func() error { return os.Mkdir(join(root, "proc"), 0o755) },
		func() error { return mountDev(root) },
		func() error { return setAttr(root, false, attrReadOnly) },
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

// finishRoot adds what is the action's own to the base at spec.RootDir
// (see buildBase): the generated /etc files (named in generated), the
// execroot, /tmp, /dev/shm and /proc. Then it pivots into the root.
//
// execRootFD is a detached tree of spec.ExecRoot, or -1.
func finishRoot(spec *Spec, execRootFD int, generated []string) error {
	root := spec.RootDir
	steps := []func() error{
		func() error { return bindGeneratedEtc(root, spec.EtcDir, generated) },
		func() error { return mountExecRoot(root, spec, execRootFD) },
		func() error {
			return mountTmpfs(join(root, "dev", "shm"), tmpOptions(spec.TmpSize), unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC)
		},
		func() error {
			return mountTmpfs(join(root, "tmp"), tmpOptions(spec.TmpSize), unix.MS_NOSUID|unix.MS_NODEV)
		},
		func() error { return mountProc(join(root, "proc")) },
		func() error { return pivot(root) },
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

// treeFDs are detached mount trees from the parent, or -1.
type treeFDs struct{ execRoot, runtime int }

// attachTree moves the detached mount tree fd (from open_tree(2) in the
// parent) to dst and makes every mount in it private, then closes fd.
//
// An OPEN_TREE_CLONE copy of a mount that is shared on the host (on a
// systemd host / is rshared, so an actiondfs execroot mounted under it is
// too) joins the host mount's peer group. Left so, the binds made onto it
// next (writable directories) would propagate back to the host, leaking a
// mount per action and keeping its FUSE server alive. Making / private
// earlier does not reach it: the tree arrives afterwards.
func attachTree(fd int, dst string) error {
	defer unix.Close(fd)
	if err := unix.MoveMount(fd, "", unix.AT_FDCWD, dst, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move its tree to %s: %w", dst, err)
	}
	if err := unix.Mount("", dst, "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making %s private: %w", dst, err)
	}
	return nil
}

// mountRuntime exposes the runtime's system directories in root.
func mountRuntime(root string, spec *Spec) error {
	rt := spec.Runtime
	if rt.Host {
		for _, dir := range hostSystemDirs {
			if err := bindEntry(dir, join(root, dir), attrReadOnly); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
		return nil
	}
	entries, err := os.ReadDir(rt.Root)
	if err != nil {
		return fmt.Errorf("runtime %q: %w", rt.Name, err)
	}
	execTop, _, _ := strings.Cut(join(spec.ExecRootMount)[1:], "/")
	for _, e := range entries {
		if ownedTopLevel[e.Name()] || e.Name() == execTop {
			continue
		}
		if err := bindEntry(join(rt.Root, e.Name()), join(root, e.Name()), attrReadOnly); err != nil {
			return fmt.Errorf("runtime %q: %w", rt.Name, err)
		}
	}
	return nil
}

// mountEtc provides /etc: the runtime's /etc (for the host runtime only
// ld.so.cache and alternatives), with an empty file (or the runtime's own)
// where each generated file of spec.EtcDir goes; bindGeneratedEtc binds
// them there.
func mountEtc(root string, spec *Spec) error {
	etc := join(root, "etc")
	if err := os.Mkdir(etc, 0o755); err != nil {
		return err
	}
	generated, err := generatedEtcNames(spec.EtcDir)
	if err != nil {
		return err
	}
	var src string
	var names []string
	switch {
	case spec.Runtime.Host:
		src, names = "/etc", hostEtcEntries
	default:
		src = join(spec.Runtime.Root, "etc")
		if hasRegularFiles(src, generated) {
			// The common case: bind the runtime's /etc whole; the
			// generated files go over their namesakes.
			return bind(src, etc, attrReadOnly)
		}
		// Otherwise build /etc entry by entry.
		entries, err := os.ReadDir(src)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("runtime %q: %w", spec.Runtime.Name, err)
		}
		for _, e := range entries {
			names = append(names, e.Name())
		}
	}
	for _, name := range generated {
		if err := createFile(join(etc, name)); err != nil {
			return err
		}
	}
	for _, name := range names {
		if contains(generated, name) {
			continue
		}
		if err := bindEntry(join(src, name), join(etc, name), attrReadOnly); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// bindGeneratedEtc binds the files named generated of etcDir over their
// places in /etc (see mountEtc).
func bindGeneratedEtc(root, etcDir string, generated []string) error {
	for _, name := range generated {
		if err := bind(join(etcDir, name), join(root, "etc", name), attrReadOnly); err != nil {
			return err
		}
	}
	return nil
}

// generatedEtcNames lists the generated /etc files in dir.
func generatedEtcNames(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("generated /etc: %w", err)
	}
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.Name()
	}
	return names, nil
}

func hasRegularFiles(dir string, names []string) bool {
	for _, name := range names {
		fi, err := os.Lstat(join(dir, name))
		if err != nil || !fi.Mode().IsRegular() {
			return false
		}
	}
	return true
}

// mountExecRoot binds the execroot read-only (writable with WritableInputs)
// and the writable directories over it.
func mountExecRoot(root string, spec *Spec, execRootFD int) error {
	dst := join(root, spec.ExecRootMount)
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	attr := uint64(attrReadOnly)
	if spec.WritableInputs {
		attr = attrWritable
	}
	src := spec.ExecRoot
	if execRootFD >= 0 {
		if err := attachTree(execRootFD, dst); err != nil {
			return fmt.Errorf("execroot: %w", err)
		}
		if err := setAttr(dst, true, attr); err != nil {
			return err
		}
		src = dst // writable directories come from the moved tree
	} else if err := bind(src, dst, attr); err != nil {
		return err
	}
	if spec.WritableInputs {
		return nil
	}
	for _, d := range spec.WritableDirs {
		if err := bind(join(src, d), join(dst, d), attrWritable); err != nil {
			return err
		}
	}
	return nil
}

// devNodes are the host devices an action gets.
var devNodes = []string{"null", "zero", "full", "random", "urandom", "tty"}

// devLinks are the usual /dev symlinks.
var devLinks = map[string]string{
	"fd":     "/proc/self/fd",
	"stdin":  "/proc/self/fd/0",
	"stdout": "/proc/self/fd/1",
	"stderr": "/proc/self/fd/2",
}

// tmpOptions are the options of the action's writable tmpfs mounts: a
// tmpfs lives in memory, so without size= one action could take half the
// host's memory through each.
func tmpOptions(size int64) string {
	if size > 0 {
		return "mode=1777,size=" + strconv.FormatInt(size, 10)
	}
	return "mode=1777"
}

// mountDev builds a minimal read-only /dev, with an empty shm directory
// for finishRoot's writable /dev/shm.
func mountDev(root string) error {
	dev := join(root, "dev")
	if err := mountTmpfs(dev, "mode=0755,size=64k", unix.MS_NOSUID|unix.MS_NOEXEC|unix.MS_NODEV); err != nil {
		return err
	}
	for _, name := range devNodes {
		// Each bound node is its own mount, so the tmpfs's nodev does not apply to it.
		if err := bindEntry(join("/dev", name), join(dev, name), attrDevice); err != nil {
			return err
		}
	}
	for name, target := range devLinks {
		if err := os.Symlink(target, join(dev, name)); err != nil {
			return err
		}
	}
	if err := os.Mkdir(join(dev, "shm"), 0o755); err != nil {
		return err
	}
	return setAttr(dev, false, unix.MOUNT_ATTR_RDONLY|unix.MOUNT_ATTR_NOSUID|unix.MOUNT_ATTR_NOEXEC|unix.MOUNT_ATTR_NODEV)
}

// pivot makes root the root directory and detaches the host's tree.
func pivot(root string) error {
	if err := unix.Chdir(root); err != nil {
		return fmt.Errorf("chdir %s: %w", root, err)
	}
	// pivot_root(".", ".") stacks the old root on top of the new one;
	// detaching it leaves the new root. This needs no put_old directory,
	// which a read-only root could not hold.
	if err := unix.PivotRoot(".", "."); err != nil {
		if !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("pivot_root: %w", err)
		}
		// The host root cannot be pivoted away (initramfs): move the
		// new root over / and chroot into it instead.
		if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("moving root: %w", err)
		}
		if err := unix.Chroot("."); err != nil {
			return fmt.Errorf("chroot: %w", err)
		}
		return unix.Chdir("/")
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detaching the host root: %w", err)
	}
	return unix.Chdir("/")
}

// bindEntry makes dst look like src: a symlink is copied, anything else is
// bound with attr. It returns an error wrapping fs.ErrNotExist when src is
// missing.
func bindEntry(src, dst string, attr uint64) error {
	fi, err := os.Lstat(src)
	if err != nil {
		return err
	}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		target, err := os.Readlink(src)
		if err != nil {
			return err
		}
		return os.Symlink(target, dst)
	case fi.IsDir():
		if err := os.Mkdir(dst, 0o755); err != nil {
			return err
		}
	default:
		if err := createFile(dst); err != nil {
			return err
		}
	}
	return bind(src, dst, attr)
}

// createFile creates an empty file (a mount point) at path. A raw open:
// os.OpenFile would also try the poller (two more system calls), and
// WriteFile a write of nothing.
func createFile(path string) error {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return &os.PathError{Op: "create", Path: path, Err: err}
	}
	return unix.Close(fd)
}

// bind bind-mounts src (recursively) on the existing dst and applies attr to
// every mount in the new tree.
func bind(src, dst string, attr uint64) error {
	if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s on %s: %w", src, dst, err)
	}
	return setAttr(dst, true, attr)
}

// setAttr sets mount attributes on the mount at path (and, when recursive,
// on every mount below it). Attributes not in attr are cleared.
func setAttr(path string, recursive bool, attr uint64) error {
	flags := uint(0)
	if recursive {
		flags = unix.AT_RECURSIVE
	}
	all := uint64(unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV | unix.MOUNT_ATTR_NOEXEC)
	err := unix.MountSetattr(unix.AT_FDCWD, path, flags, &unix.MountAttr{Attr_set: attr, Attr_clr: all &^ attr})
	if errors.Is(err, unix.ENOSYS) {
		// Before Linux 5.12: remount the top mount only.
		var ms uintptr = unix.MS_REMOUNT | unix.MS_BIND
		for a, f := range map[uint64]uintptr{
			unix.MOUNT_ATTR_RDONLY: unix.MS_RDONLY, unix.MOUNT_ATTR_NOSUID: unix.MS_NOSUID,
			unix.MOUNT_ATTR_NODEV: unix.MS_NODEV, unix.MOUNT_ATTR_NOEXEC: unix.MS_NOEXEC,
		} {
			if attr&a != 0 {
				ms |= f
			}
		}
		err = unix.Mount("", path, "", ms, "")
	}
	if err != nil {
		return fmt.Errorf("setting mount attributes on %s: %w", path, err)
	}
	return nil
}

// mountProc mounts a /proc that shows only the action's own processes. It
// is a view of the helper's PID namespace, where the helper is PID 1 and
// runs as root: hidepid hides processes of other users, so the command
// cannot even read what the kernel shows of root's processes to anyone
// (the helper's mount table, which is a copy of the host's).
func mountProc(dst string) error {
	const flags = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	err := mountAt(dst, "proc", "proc", flags, "hidepid=invisible")
	if errors.Is(err, unix.EINVAL) {
		err = mountAt(dst, "proc", "proc", flags, "hidepid=2") // before Linux 5.8
	}
	return err
}

func mountTmpfs(dst, options string, flags uintptr) error {
	return mountAt(dst, "tmpfs", "tmpfs", flags, options)
}

// mountAt creates dst if needed and mounts there.
func mountAt(dst, source, fstype string, flags uintptr, data string) error {
	if err := os.Mkdir(dst, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	if err := unix.Mount(source, dst, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s: %w", fstype, dst, err)
	}
	return nil
}
