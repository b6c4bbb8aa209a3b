package cas

import (
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// syncFSSupported reports whether syncFS works here.
const syncFSSupported = true

// syncFS flushes every dirty page of the file system holding dir: one
// durability barrier for a whole batch of small files. Since Linux 5.8 it
// reports writeback errors, those since dir was opened: the writeback it
// does itself, which covers the files of the last moments (a failure of
// background writeback before that, of an older file, is not seen here,
// as fsync would have; verified reads catch what that loses).
func syncFS(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return &os.PathError{Op: "syncfs", Path: dir, Err: err}
	}
	return nil
}

// writeBehind asks the kernel to start writing back a range of f now, so a
// later fsync has less to wait for. Best effort.
func writeBehind(f *os.File, off, n int64) {
	if rc, err := f.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			_ = unix.SyncFileRange(int(fd), off, n, unix.SYNC_FILE_RANGE_WRITE)
		})
	}
}

// changeTime is when the file fi describes last changed: its data, its
// mode or its names (ctime, which nothing can set back).
func changeTime(fi os.FileInfo) time.Time {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return time.Unix(st.Ctim.Unix())
	}
	return time.Now()
}
