// Package bazelws holds what the end-to-end tests and the benchmarks both
// need around the Bazel workspace they build (testdata/bazel): a fresh copy
// of it, Bazel's process summary parsed, and the clean-up of what Bazel
// leaves read-only.
package bazelws

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Copy copies the workspace src into dst (new or empty), leaving out the
// bazel-* convenience symlinks at its top and the generated inputs
// (many/inputs), and runs the copy's gen_inputs.sh, when it has one, to
// make those afresh. Files keep their permission bits; symlinks are copied
// as symlinks; any other file type is an error.
func Copy(src, dst string) error {
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		if rel != "." && !strings.Contains(rel, string(filepath.Separator)) && strings.HasPrefix(rel, "bazel-") {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if rel == filepath.Join("many", "inputs") {
			return filepath.SkipDir // regenerated below
		}
		target := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case d.Type()&fs.ModeSymlink != 0:
			link, err := os.Readlink(path)
			if err != nil {
				return err
			}
			return os.Symlink(link, target)
		case d.Type().IsRegular():
			return CopyFile(path, target, info.Mode().Perm())
		default:
			return fmt.Errorf("%s: unsupported file type %v", path, d.Type())
		}
	})
	if err != nil {
		return fmt.Errorf("copying workspace %s: %w", src, err)
	}
	gen := filepath.Join(dst, "gen_inputs.sh")
	if _, err := os.Stat(gen); err == nil {
		if out, err := exec.Command("/bin/sh", gen, dst).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v\n%s", gen, err, out)
		}
	}
	return nil
}

// CopyFile copies the regular file src to dst, which must not exist yet,
// with the permission bits perm (not subject to the umask).
func CopyFile(src, dst string, perm fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chmod(dst, perm)
}
