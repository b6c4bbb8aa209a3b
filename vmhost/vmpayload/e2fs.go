package vmpayload

import (
	"context"
	"debug/elf"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
)

// e2fsPackages carry mke2fs and e2fsck and the libraries they load, for the
// target architecture (bookworm names; DT_NEEDED decides what is taken).
var e2fsPackages = []string{"e2fsprogs", "libext2fs2", "libcom-err2", "libblkid1", "libuuid1", "libc6"}

// e2fsTools are the programs the guest runs on the CAS disk.
var e2fsTools = []string{"mke2fs", "e2fsck"}

// debTriplet is the multiarch directory of a Debian architecture.
var debTriplet = map[string]string{"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}

// archMachine is the ELF machine of a Debian architecture's binaries.
var archMachine = map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}

// e2fs downloads e2fsprogs for the target architecture (unpacked, never
// installed) and returns the initramfs entries for mke2fs, e2fsck, the
// shared libraries they need (DT_NEEDED, recursively) in /lib/<triplet>,
// the dynamic loader at its PT_INTERP path, and /etc/mke2fs.conf.
func (b *builder) e2fs(ctx context.Context) ([]entry, string, error) {
	pkgs, paths, sums, err := b.fetch(ctx, KernelSuite, e2fsPackages)
	if err != nil {
		return nil, "", err
	}
	var ids []string
	for _, p := range pkgs {
		ids = append(ids, p.ID())
	}
	b.pkgs["initramfs"] = ids
	tree := b.work("e2fsprogs")
	if err := extractDebs(tree, paths, sums, nil); err != nil {
		return nil, "", err
	}
	triplet := debTriplet[b.arch]
	libDirs := []string{"lib/" + triplet, "usr/lib/" + triplet, "lib", "usr/lib"}
	var entries []entry
	added := map[string]bool{}
	placed := map[string]string{} // real file in the tree → where it went
	var addELF func(treePath string, dest string) error
	addELF = func(treePath, dest string) error {
		if added[dest] {
			return nil
		}
		added[dest] = true
		real, err := resolveInTree(tree, treePath)
		if err != nil {
			return err
		}
		if first, ok := placed[real]; ok {
			// The same file under a second name (the loader is both
			// PT_INTERP and libc's DT_NEEDED): a symlink.
			entries = append(entries, entry{Path: dest, Link: first})
			return nil
		}
		placed[real] = dest
		entries = append(entries, entry{Path: dest, Mode: 0o755, Source: filepath.Join(tree, real)})
		f, err := elf.Open(filepath.Join(tree, real))
		if err != nil {
			return fmt.Errorf("%s: %w", treePath, err)
		}
		defer f.Close()
		if f.Machine != archMachine[b.arch] {
			return fmt.Errorf("%s is for %v, not %s", treePath, f.Machine, b.arch)
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				buf := make([]byte, p.Filesz)
				if _, err := p.ReadAt(buf, 0); err != nil {
					return err
				}
				interp := strings.TrimRight(string(buf), "\x00")
				if err := addELF(strings.TrimPrefix(interp, "/"), interp); err != nil {
					return fmt.Errorf("interpreter of %s: %w", treePath, err)
				}
			}
		}
		libs, err := f.ImportedLibraries()
		if err != nil {
			return err
		}
		for _, lib := range libs {
			found := ""
			for _, d := range libDirs {
				if _, err := os.Lstat(filepath.Join(tree, d, lib)); err == nil {
					found = path.Join(d, lib)
					break
				}
			}
			if found == "" {
				return fmt.Errorf("%s needs %s, which none of %v provides", treePath, lib, e2fsPackages)
			}
			if err := addELF(found, "/lib/"+triplet+"/"+lib); err != nil {
				return err
			}
		}
		return nil
	}
	for _, t := range e2fsTools {
		src := ""
		for _, d := range []string{"sbin", "usr/sbin"} {
			if _, err := os.Lstat(filepath.Join(tree, d, t)); err == nil {
				src = path.Join(d, t)
				break
			}
		}
		if src == "" {
			return nil, "", fmt.Errorf("e2fsprogs has no %s", t)
		}
		if err := addELF(src, "/usr/sbin/"+t); err != nil {
			return nil, "", err
		}
	}
	entries = append(entries, entry{Path: "/usr/sbin/mkfs.ext4", Mode: 0o777, Link: "mke2fs"})
	if _, err := os.Stat(filepath.Join(tree, "etc", "mke2fs.conf")); err == nil {
		entries = append(entries, entry{Path: "/etc/mke2fs.conf", Mode: 0o644, Source: filepath.Join(tree, "etc", "mke2fs.conf")})
	}
	return entries, pkgs[0].Version, nil
}

// resolveInTree follows symlinks of rel inside tree (absolute targets are
// taken relative to tree) and returns the real relative path.
func resolveInTree(tree, rel string) (string, error) {
	rel = path.Clean(strings.TrimPrefix(rel, "/"))
	for range 40 {
		parts := strings.Split(rel, "/")
		changed := false
		for i := range parts {
			prefix := path.Join(parts[:i+1]...)
			fi, err := os.Lstat(filepath.Join(tree, prefix))
			if err != nil {
				return "", fmt.Errorf("%s: %w", rel, err)
			}
			if fi.Mode()&os.ModeSymlink == 0 {
				continue
			}
			target, err := os.Readlink(filepath.Join(tree, prefix))
			if err != nil {
				return "", err
			}
			if path.IsAbs(target) {
				target = strings.TrimPrefix(target, "/")
			} else {
				target = path.Join(path.Dir(prefix), target)
			}
			rel = path.Clean(path.Join(append([]string{target}, parts[i+1:]...)...))
			changed = true
			break
		}
		if !changed {
			return rel, nil
		}
	}
	return "", fmt.Errorf("%s: too many symlinks", rel)
}
