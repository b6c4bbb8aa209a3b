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

// A small blob is read from its pack, never past its own end (the next
// blob of the pack follows it there), through a close-on-exec descriptor.
func TestBlobFilesReadPackedBlobs(t *testing.T) {
	store, err := cas.NewDiskStore(filepath.Join(t.TempDir(), "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	first, second := bytes.Repeat([]byte("a"), 300), bytes.Repeat([]byte("b"), 500)
	var blobs []cas.Blob
	for _, c := range [][]byte{first, second} {
		blobs = append(blobs, cas.Blob{Digest: cas.DigestOf(c), Data: c})
	}
	for _, err := range store.PutBatch(context.Background(), blobs) {
		if err != nil {
			t.Fatal(err)
		}
	}
	b := newBlobFiles(store, 4)
	bf, err := b.acquire(blobs[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	defer b.release(bf)
	if bf.base == 0 {
		t.Fatal("a packed blob read from offset 0: not from its pack")
	}
	flags, err := unix.FcntlInt(uintptr(bf.fd), unix.F_GETFD, 0)
	if err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("pack descriptor flags = %#x, %v; want FD_CLOEXEC", flags, err)
	}
	buf := make([]byte, 4096)
	if n, err := bf.readAt(buf, 0); n != len(first) || !errors.Is(err, io.EOF) || !bytes.Equal(buf[:n], first) {
		t.Errorf("readAt(0) of a packed blob = %d, %v (%q...); want its %d bytes and EOF", n, err, buf[:min(n, 8)], len(first))
	}
	if n, err := bf.readAt(buf, 250); n != 50 || !errors.Is(err, io.EOF) || !bytes.Equal(buf[:n], first[250:]) {
		t.Errorf("readAt(250) = %d, %v; want 50, EOF", n, err)
	}
	if n, err := bf.readAt(buf, 300); n != 0 || !errors.Is(err, io.EOF) {
		t.Errorf("readAt(at the end) = %d, %v; want 0, EOF", n, err)
	}
}
