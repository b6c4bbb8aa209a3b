package sandbox

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/internal/mountinfo"
)

// imageSuffix marks runtime images in LoadRuntimes' image directory.
const imageSuffix = ".squashfs"

// LoadRuntimes mounts every <name>.squashfs in imageDir read-only on
// mountDir/<name> and returns the runtimes, sorted by name. A mount of the
// same image that is already there (left by an earlier process that did not
// unmount) is reused. Sandbox.Close unmounts them.
func LoadRuntimes(imageDir, mountDir string) ([]Runtime, error) {
	images, err := filepath.Glob(filepath.Join(imageDir, "*"+imageSuffix))
	if err != nil {
		return nil, fmt.Errorf("load runtimes: %w", err)
	}
	var rts []Runtime
	fail := func(err error) ([]Runtime, error) {
		for _, rt := range rts {
			_ = unmount(rt.Root)
		}
		return nil, fmt.Errorf("load runtimes: %w", err)
	}
	for _, img := range images { // Glob sorts
		name := strings.TrimSuffix(filepath.Base(img), imageSuffix)
		if name == "" || name == HostRuntimeName {
			return fail(fmt.Errorf("image %s: runtime name %q is reserved", img, name))
		}
		dir := filepath.Join(mountDir, name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fail(err)
		}
		if err := MountImage(img, dir); err != nil {
			return fail(err)
		}
		rts = append(rts, Runtime{Name: name, Root: dir, Image: img})
	}
	return rts, nil
}

// MountImage mounts the SquashFS image read-only (and nosuid, nodev) on dir
// through a loop device that is released when dir is unmounted. If dir
// already has a mount of this very image (same device and inode) it is left
// as it is; any other mount on dir is detached first.
func MountImage(image, dir string) error {
	var st unix.Stat_t
	if err := unix.Stat(image, &st); err != nil {
		return fmt.Errorf("mount image: %w", err)
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("mount image: %w", err)
	}
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		dir = real
	}
	for range 8 { // mounts may be stacked
		src, mounted, err := mountSource(dir)
		if err != nil {
			return fmt.Errorf("mount image: %w", err)
		}
		if !mounted {
			break
		}
		if loopBacks(src, &st) {
			return nil
		}
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("mount image: replacing the mount on %s: %w", dir, err)
		}
	}

	loop, dev, err := attachLoop(image)
	if err != nil {
		return fmt.Errorf("mount image %s: %w", image, err)
	}
	// With autoclear the device detaches once unmounted; our descriptor
	// keeps it attached until the mount holds it.
	defer loop.Close()
	if err := unix.Mount(dev, dir, "squashfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("mount image %s on %s: %w", image, dir, err)
	}
	return nil
}

// mountSource returns the source of the topmost mount on dir.
func mountSource(dir string) (source string, mounted bool, err error) {
	mounts, err := mountinfo.Read()
	if err != nil {
		return "", false, err
	}
	for _, mi := range mounts {
		if mi.Point == dir {
			source, mounted = mi.Source, true // later lines are mounted on top
		}
	}
	return source, mounted, nil
}

// loopBacks reports whether source is a loop device backed by the file st.
func loopBacks(source string, st *unix.Stat_t) bool {
	if !strings.HasPrefix(source, "/dev/loop") {
		return false
	}
	f, err := os.Open(source)
	if err != nil {
		return false
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	return err == nil && info.Device == st.Dev && info.Inode == st.Ino
}

// attachLoop attaches image read-only to a free loop device.
func attachLoop(image string) (*os.File, string, error) {
	img, err := os.Open(image)
	if err != nil {
		return nil, "", err
	}
	defer img.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return nil, "", err
	}
	defer ctl.Close()

	info := unix.LoopInfo64{Flags: unix.LO_FLAGS_READ_ONLY | unix.LO_FLAGS_AUTOCLEAR}
	copy(info.File_name[:len(info.File_name)-1], image)
	for range 16 { // another process may grab the free device first
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, "", fmt.Errorf("finding a free loop device: %w", err)
		}
		dev := "/dev/loop" + strconv.Itoa(n)
		loop, err := os.OpenFile(dev, os.O_RDONLY, 0)
		if errors.Is(err, fs.ErrNotExist) {
			// A static /dev (containers) has no node for a new device.
			const loopMajor = 7
			if err = unix.Mknod(dev, unix.S_IFBLK|0o600, int(unix.Mkdev(loopMajor, uint32(n)))); err == nil || errors.Is(err, fs.ErrExist) {
				loop, err = os.OpenFile(dev, os.O_RDONLY, 0)
			}
		}
		if err != nil {
			return nil, "", err
		}
		err = unix.IoctlLoopConfigure(int(loop.Fd()), &unix.LoopConfig{Fd: uint32(img.Fd()), Info: info})
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY) {
			// Before Linux 5.8: attach, then set flags.
			err = unix.IoctlSetInt(int(loop.Fd()), unix.LOOP_SET_FD, int(img.Fd()))
			if err == nil {
				if err = unix.IoctlLoopSetStatus64(int(loop.Fd()), &info); err != nil {
					_ = unix.IoctlSetInt(int(loop.Fd()), unix.LOOP_CLR_FD, 0)
				}
			}
		}
		if errors.Is(err, unix.EBUSY) {
			loop.Close()
			continue
		}
		if err != nil {
			loop.Close()
			return nil, "", fmt.Errorf("configuring %s: %w", dev, err)
		}
		return loop, dev, nil
	}
	return nil, "", errors.New("no free loop device")
}

// unmount unmounts dir, lazily if it is busy; a dir that is not mounted is
// not an error.
func unmount(dir string) error {
	err := unix.Unmount(dir, 0)
	if errors.Is(err, unix.EBUSY) {
		err = unix.Unmount(dir, unix.MNT_DETACH)
	}
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
		return nil
	}
	return err
}
