package vmpayload

import (
	"archive/tar"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/actiond/actiond/vmhost/vmpayload/debian"
)

// extractDebs unpacks the data of packages into a fresh directory dir on
// the host, for the builder to read files from (kernel, modules,
// e2fsprogs). Only directories, regular files, symlinks and hard links
// (as copies) are made, owned by the current user: what goes into the
// payload gets its mode and owner from the builder, not from this tree.
// keep, if set, selects entries by their path ("usr/sbin/mke2fs"). The
// tree is kept while dir.stamp matches the packages.
func extractDebs(dir string, debs []string, sums []string, keep func(string) bool) error {
	stamp := "extract v1\n" + strings.Join(sums, "\n") + "\n"
	if stampMatches(dir, stamp) {
		return nil
	}
	tmp := dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return err
	}
	for _, p := range debs {
		if err := extractDeb(tmp, p, keep); err != nil {
			os.RemoveAll(tmp)
			return err
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	return writeStamp(dir, stamp)
}

func extractDeb(root, debPath string, keep func(string) bool) error {
	d, err := debian.OpenDeb(debPath)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Data(func(h *tar.Header, r io.Reader) error {
		rel := path.Clean(strings.TrimPrefix(h.Name, "./"))
		if rel == "." || rel == "" {
			return nil
		}
		if strings.HasPrefix(rel, "../") || rel == ".." {
			return fmt.Errorf("%s: entry %q leaves the tree", debPath, h.Name)
		}
		if keep != nil && !keep(rel) {
			return nil
		}
		dst := filepath.Join(root, filepath.FromSlash(rel))
		switch h.Typeflag {
		case tar.TypeDir:
			return os.MkdirAll(dst, 0o755)
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			os.Remove(dst)
			f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode&0o755|0o600))
			if err != nil {
				return err
			}
			if _, err := io.Copy(f, r); err != nil {
				f.Close()
				return fmt.Errorf("%s: %s: %w", debPath, rel, err)
			}
			return f.Close()
		case tar.TypeSymlink:
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			os.Remove(dst)
			return os.Symlink(h.Linkname, dst)
		case tar.TypeLink:
			target := path.Clean(strings.TrimPrefix(h.Linkname, "./"))
			if strings.HasPrefix(target, "../") {
				return fmt.Errorf("%s: hard link %q leaves the tree", debPath, h.Linkname)
			}
			data, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(target)))
			if err != nil {
				if keep != nil {
					return nil // its target was not kept
				}
				return fmt.Errorf("%s: hard link %s → %s: %w", debPath, rel, target, err)
			}
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			return os.WriteFile(dst, data, 0o755)
		}
		return nil // device nodes, fifos: not needed from these packages
	})
}
