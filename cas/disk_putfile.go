// PutFile: moving an existing file (an action's output) into a DiskStore
// by rename, or by copy when it cannot be renamed.

package cas

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"github.com/actiond/actiond/internal/ctxio"
)

// PutFile implements Store. The file is made root-owned (when running as
// root) and read-only, hashed, and renamed into the CAS; if the blob is
// already present the file is removed instead. Symbolic links and other
// non-regular files are refused. A file with other hard links, or on
// another file system, is copied, so its other names never become (or
// change the mode of) a shared blob.
func (s *DiskStore) PutFile(ctx context.Context, path string) (Digest, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return Digest{}, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return Digest{}, fmt.Errorf("stat %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return Digest{}, fmt.Errorf("%s is not a regular file (%s)", path, fi.Mode().Type())
	}
	// Before reading a byte: a sparse file can claim any size for free
	// (truncate -s), and hashing it costs its full logical size.
	if s.maxSize > 0 && fi.Size() > s.maxSize {
		return Digest{}, fmt.Errorf("%s is %d bytes, larger than the store's size limit of %d bytes (--max-size): %w", path, fi.Size(), s.maxSize, ErrNoSpace)
	}
	if linkCount(fi) > 1 {
		return s.putCopy(ctx, f, path)
	}
	// The file may have been written by a sandboxed user: take ownership
	// before hashing, so that the hash is of content that user can no
	// longer change. (The sandbox guarantees none of its processes still
	// hold the file open.)
	if os.Geteuid() == 0 && fileUID(fi) != 0 {
		if err := f.Chown(0, 0); err != nil {
			return Digest{}, fmt.Errorf("chown %s: %w", path, err)
		}
	}
	if err := f.Chmod(0o444); err != nil {
		return Digest{}, fmt.Errorf("chmod %s: %w", path, err)
	}
	d, err := hashFile(ctx, f)
	if err != nil {
		return Digest{}, fmt.Errorf("hash %s: %w", path, err)
	}
	if d.IsEmpty() || s.intact(d) {
		os.Remove(path)
		return d, nil
	}
	if s.maxSize > 0 && d.Size > s.maxSize {
		return Digest{}, fmt.Errorf("blob %s (%s) is larger than the store's size limit of %d bytes: %w", d, path, s.maxSize, ErrNoSpace)
	}
	if err := s.syncData(f); err != nil {
		return Digest{}, s.spaceErr(fmt.Errorf("sync %s: %w", path, err))
	}
	// The name must still be the file that was hashed.
	if li, err := os.Lstat(path); err != nil || !os.SameFile(li, fi) {
		return Digest{}, fmt.Errorf("%s was replaced while being stored", path)
	}
	err = s.linkPath(path, d, true)
	if errors.Is(err, syscall.EXDEV) {
		return s.putCopy(ctx, f, path)
	}
	if err != nil {
		return Digest{}, err
	}
	return d, nil
}

// putCopy stores the content of f as a new blob and removes path.
func (s *DiskStore) putCopy(ctx context.Context, f *os.File, path string) (Digest, error) {
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return Digest{}, err
	}
	d, err := hashFile(ctx, f)
	if err != nil {
		return Digest{}, fmt.Errorf("hash %s: %w", path, err)
	}
	if !d.IsEmpty() && !s.intact(d) {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return Digest{}, err
		}
		// Put verifies the copy against d, so a file that changes now is
		// refused rather than stored wrongly.
		if err := s.Put(ctx, d, ctxio.Reader(ctx, f)); err != nil {
			return Digest{}, fmt.Errorf("copy %s into the CAS: %w", path, err)
		}
	}
	os.Remove(path)
	return d, nil
}

// hashFile hashes f from its current offset with a large buffer; it stops
// when ctx ends (a large output must not outlive its action's caller).
func hashFile(ctx context.Context, f *os.File) (Digest, error) {
	h := sha256.New()
	// No 1 MiB buffer for a small file: allocating one costs ~0.3 ms (page
	// faults), twice per action for stdout and stderr alone.
	size := int64(copyBufSize)
	if fi, err := f.Stat(); err == nil {
		size = min(size, max(fi.Size()+1, 512))
	}
	buf := make([]byte, size)
	// Hide f's WriteTo, which would use a small buffer.
	n, err := io.CopyBuffer(h, ctxio.Reader(ctx, f), buf)
	if err != nil {
		return Digest{}, err
	}
	return Digest{Hash: hex.EncodeToString(h.Sum(nil)), Size: n}, nil
}
