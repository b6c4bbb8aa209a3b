package fs

import (
	"bytes"
	"context"
	"errors"
	"io"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/actiond/actiond/cas"
)

// Blob files are read through raw descriptors: reads return what os.File's
// ReadAt would (short only at the end, with io.EOF), and the descriptors
// are close-on-exec, so no helper or command the server starts inherits
// one.
func TestBlobFilesReadAndCloseOnExec(t *testing.T) {
	store, err := cas.NewDiskStore(filepath.Join(t.TempDir(), "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	content := bytes.Repeat([]byte("0123456789"), 100_000)
	d := cas.DigestOf(content)
	if err := store.Put(context.Background(), d, bytes.NewReader(content)); err != nil {
		t.Fatal(err)
	}
	b := newBlobFiles(store, 1)
	bf, err := b.acquire(d)
	if err != nil {
		t.Fatal(err)
	}
	flags, err := unix.FcntlInt(uintptr(bf.fd), unix.F_GETFD, 0)
	if err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("blob descriptor flags = %#x, %v; want FD_CLOEXEC", flags, err)
	}
	buf := make([]byte, 300_000)
	if n, err := bf.readAt(buf, 500_000); n != len(buf) || err != nil || !bytes.Equal(buf, content[500_000:800_000]) {
		t.Errorf("readAt(middle) = %d, %v (content equal: %v)", n, err, bytes.Equal(buf[:n], content[500_000:500_000+n]))
	}
	if n, err := bf.readAt(buf, 900_000); n != 100_000 || !errors.Is(err, io.EOF) || !bytes.Equal(buf[:n], content[900_000:]) {
		t.Errorf("readAt(across the end) = %d, %v; want 100000, EOF", n, err)
	}
	if n, err := bf.readAt(buf, int64(len(content))); n != 0 || !errors.Is(err, io.EOF) {
		t.Errorf("readAt(at the end) = %d, %v; want 0, EOF", n, err)
	}
	fd := bf.fd
	b.release(bf)
	// Released, it stays open for the next user (the cache holds one)...
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		t.Fatalf("idle blob descriptor closed early: %v", err)
	}
	// ...until the cache drops it.
	b.closeIdle()
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); !errors.Is(err, unix.EBADF) {
		t.Fatalf("descriptor of a dropped idle blob: %v, want EBADF", err)
	}
}
