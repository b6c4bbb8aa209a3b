package cas

import (
	"os"
	"strconv"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// openAnon creates an unnamed file in dir (O_TMPFILE), already read-only
// for everyone: an upload written into it needs no name in the shared temp
// directory (whose lock 32 concurrent uploads contend for), no chmod, and
// no removal if it is abandoned or the server dies.
func openAnon(dir string) (*os.File, error) {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o444)
	if err != nil {
		return nil, &os.PathError{Op: "open O_TMPFILE", Path: dir, Err: err}
	}
	return os.NewFile(uintptr(fd), ""), nil
}

// noEmptyPathLinks is set once linkat's AT_EMPTY_PATH is refused: it
// needs CAP_DAC_READ_SEARCH (a server running as root has it).
var noEmptyPathLinks atomic.Bool

// linkAnon gives the unnamed file f the name dst (which must not exist):
// with AT_EMPTY_PATH where allowed, else through /proc/self/fd (a path
// walk through procfs per blob, which costs more).
func linkAnon(f *os.File, dst string) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var lerr error
	if err := rc.Control(func(fd uintptr) {
		tried := !noEmptyPathLinks.Load()
		if tried {
			lerr = unix.Linkat(int(fd), "", unix.AT_FDCWD, dst, unix.AT_EMPTY_PATH)
			if lerr != unix.EPERM && lerr != unix.ENOENT {
				return
			}
		}
		lerr = unix.Linkat(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(int(fd)), unix.AT_FDCWD, dst, unix.AT_SYMLINK_FOLLOW)
		if tried && lerr == nil {
			// Refused for want of the capability, not for dst.
			noEmptyPathLinks.Store(true)
		}
	}); err != nil {
		return err
	}
	if lerr != nil {
		return &os.LinkError{Op: "link", Old: "(upload)", New: dst, Err: lerr}
	}
	return nil
}

// anonSupported reports whether unnamed files work in dir: O_TMPFILE needs
// the file system's support (ext4, xfs, btrfs, tmpfs have it) and linking
// one needs /proc.
func anonSupported(dir string) bool {
	f, err := openAnon(dir)
	if err != nil {
		return false
	}
	defer f.Close()
	probe := dir + "/.anon-probe-" + strconv.Itoa(os.Getpid())
	if err := linkAnon(f, probe); err != nil {
		return false
	}
	os.Remove(probe)
	return true
}
