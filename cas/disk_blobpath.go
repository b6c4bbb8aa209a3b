// Blob paths: the local files of blobs, and executable copies of them,
// for input roots that hardlink or serve files instead of copying.

package cas

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// BlobPath implements LocalStore: it is LocalPath.
func (s *DiskStore) BlobPath(d Digest, executable bool) (string, error) {
	return s.LocalPath(context.Background(), d, executable)
}

// LocalPath implements Store. The returned file may be evicted unless the
// caller has pinned d.
func (s *DiskStore) LocalPath(_ context.Context, d Digest, executable bool) (string, error) {
	if err := d.Validate(); err != nil {
		return "", err
	}
	if d.IsEmpty() {
		return s.emptyBlob(executable)
	}
	if !s.has(d) {
		return "", fmt.Errorf("blob %s: %w", d, ErrNotFound)
	}
	p := s.blobPath(d.Hash)
	if !executable {
		// A packed blob gets a file the first time someone needs one.
		if _, err := s.materialize(d); err != nil {
			return "", err
		}
		return p, nil
	}
	ep := filepath.Join(s.execDir, d.Hash)
	if _, err := os.Stat(ep); err == nil {
		return ep, nil
	}
	var src io.Reader
	if data, packed, err := s.readPacked(d); packed {
		if err != nil {
			return "", err
		}
		src = bytes.NewReader(data)
	} else {
		f, err := os.Open(p)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return "", fmt.Errorf("blob %s: %w", d, ErrNotFound)
			}
			return "", fmt.Errorf("open blob %s: %w", d, err)
		}
		defer f.Close()
		src = f
	}
	tmp, err := s.createTemp("exec")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.CopyBuffer(tmp, struct{ io.Reader }{src}, make([]byte, copyBufSize)); err != nil {
		tmp.Close()
		return "", s.spaceErr(fmt.Errorf("copy executable %s: %w", d, err))
	}
	if err := tmp.Chmod(0o555); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", s.spaceErr(err)
	}
	if err := os.Rename(tmp.Name(), ep); err != nil {
		return "", s.spaceErr(fmt.Errorf("move executable copy of %s: %w", d, err))
	}
	return ep, nil
}

func (s *DiskStore) emptyBlob(executable bool) (string, error) {
	name, mode := "empty", os.FileMode(0o444)
	if executable {
		name, mode = "empty-exec", 0o555
	}
	p := filepath.Join(s.execDir, name)
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	f, err := s.createTemp(name)
	if err != nil {
		return "", err
	}
	err = f.Chmod(mode)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		os.Remove(f.Name())
		return "", s.spaceErr(fmt.Errorf("create empty blob file: %w", err))
	}
	return p, nil
}
