package guest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// newRootDir is where switchRoot binds the root before moving it over /.
const newRootDir = "/.actiond-root"

type mountSpec struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
	optional               bool // failure is logged, not fatal
}

// basicMounts are the API file systems every Linux userspace expects, in
// order. cgroup2 goes where the sandbox looks for it (/sys/fs/cgroup).
var basicMounts = []mountSpec{
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755", false},
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", false},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", false},
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "nsdelegate", false},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", false},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", false},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620", true},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", true},
}

// mountBasics mounts basicMounts; a file system that is already mounted
// where it belongs is left alone.
func mountBasics() (warnings []string, err error) {
	for _, m := range basicMounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return warnings, fmt.Errorf("mkdir %s: %w", m.target, err)
		}
		err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data)
		if errors.Is(err, unix.EBUSY) && isMountPoint(m.target) {
			continue
		}
		if err != nil {
			err = fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
			if m.optional {
				warnings = append(warnings, err.Error())
				continue
			}
			return warnings, err
		}
	}
	return warnings, nil
}

// isMountPoint reports whether path is on a different device than its
// parent (or is /).
func isMountPoint(path string) bool {
	var st, pst unix.Stat_t
	if unix.Stat(path, &st) != nil || unix.Stat(filepath.Dir(path), &pst) != nil {
		return false
	}
	return st.Dev != pst.Dev || path == "/"
}

// rootIsInitramfs reports whether / is the kernel's rootfs, the initial
// file system that pivot_root cannot leave. It needs /proc.
func rootIsInitramfs() (bool, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		// id parent major:minor root mountpoint options... - fstype source superopts
		f := strings.Fields(line)
		if len(f) < 5 || f[4] != "/" {
			continue
		}
		_, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		pf := strings.Fields(post)
		return len(pf) > 0 && pf[0] == "rootfs", nil
	}
	return false, nil
}

// switchRoot makes the root a bind mount of the initramfs's rootfs,
// which pivot_root cannot leave (it has no parent mount): / is bound on
// newRootDir, that mount is moved over / and the process chroots into it.
// Nothing is copied. The sandbox can then pivot_root out of the new root
// in its mount namespaces, and the rootfs stays hidden underneath.
func switchRoot() error {
	if err := os.Mkdir(newRootDir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	if err := unix.Mount("/", newRootDir, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind / on %s: %w", newRootDir, err)
	}
	if err := unix.Chdir(newRootDir); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move %s to /: %w", newRootDir, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return unix.Chdir("/")
}
