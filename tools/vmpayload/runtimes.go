package main

import (
	"context"
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// runtimesVersion changes when the runtimes disk recipe changes.
const runtimesVersion = "1"

// The runtimes disk is ONE SquashFS (zstd) with a directory per runtime,
// named like the "libc" platform property that selects it:
//
//	/glibc2.31/{usr,etc,...}
//	/glibc2.36/...
//
// The guest mounts it read-only on /runtimes and offers each directory that
// has usr/ or bin/ as a sandbox runtime. It is built from the per-runtime
// images of tools/mkruntimes.sh (unsquashfs each, mksquashfs them
// together; identical files across runtimes are stored once).

// runtimesInfo is the runtimes step's result.
type runtimesInfo struct {
	File  string
	Names []string
	Note  string
}

// runtimesDisk builds the runtimes disk from the images in
// opts.RuntimeDir. For a foreign architecture without images, it builds a
// minimal "glibc2.36" runtime from debootstrap's first stage (see
// foreignRuntime).
func (b *builder) runtimesDisk(ctx context.Context) (*runtimesInfo, error) {
	images, err := filepath.Glob(filepath.Join(b.opts.RuntimeDir, "*.squashfs"))
	if err != nil {
		return nil, err
	}
	if len(b.opts.Runtimes) > 0 {
		var sel []string
		for _, name := range b.opts.Runtimes {
			img := filepath.Join(b.opts.RuntimeDir, name+".squashfs")
			if _, err := os.Stat(img); err != nil {
				return nil, fmt.Errorf("runtime %s: %w", name, err)
			}
			sel = append(sel, img)
		}
		images = sel
	}
	sort.Strings(images)
	for _, tool := range []string{"mksquashfs", "unsquashfs"} {
		if _, err := lookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found (apt-get install squashfs-tools)", tool)
		}
	}
	// The images of a runtime directory are usually for the build
	// machine's architecture: keep those for the target's (an image named
	// explicitly with -runtimes must be for it).
	var kept []string
	for _, img := range images {
		m, err := imageMachine(ctx, img)
		if err != nil {
			return nil, fmt.Errorf("runtime image %s: %w", img, err)
		}
		if m != archMachine[b.arch] {
			if len(b.opts.Runtimes) > 0 {
				return nil, fmt.Errorf("runtime image %s is for %v, not %s", img, m, b.arch)
			}
			b.progress("runtimes: skipping %s (for %v, not %s)", filepath.Base(img), m, b.arch)
			continue
		}
		kept = append(kept, img)
	}
	images = kept
	info := &runtimesInfo{File: "runtimes.squashfs"}
	out := filepath.Join(b.opts.Out, info.File)

	var recipe strings.Builder
	fmt.Fprintf(&recipe, "runtimes version=%s arch=%s comp=zstd\n", runtimesVersion, b.arch)
	for _, img := range images {
		name := strings.TrimSuffix(filepath.Base(img), ".squashfs")
		sum := stampField(img+".stamp", "sha256")
		if sum == "" {
			if sum, err = fileSHA256(img); err != nil {
				return nil, err
			}
		}
		info.Names = append(info.Names, name)
		fmt.Fprintf(&recipe, "%s %s\n", name, sum)
	}
	foreign := false
	if len(images) == 0 {
		host, err := hostDebArch(ctx)
		if err != nil {
			return nil, err
		}
		if host == b.arch {
			return nil, fmt.Errorf("no runtime images (*.squashfs) in %s; build them with `make runtimes` (tools/mkruntimes.sh), or pass -no-runtimes", b.opts.RuntimeDir)
		}
		foreign = true
		info.Names = []string{foreignRuntimeName}
		info.Note = "minimal " + foreignRuntimeName + " from debootstrap --foreign (unconfigured first stage)"
		fmt.Fprintf(&recipe, "%s debootstrap-foreign suite=%s variant=minbase mirror=%s\n", foreignRuntimeName, foreignSuite, debianMirror())
	}
	if stampMatches(out, recipe.String()) {
		b.progress("runtimes: %s up to date (%s)", info.File, strings.Join(info.Names, " "))
		return info, nil
	}

	t := time.Now()
	tree := b.work("runtimes-tree")
	if err := os.RemoveAll(tree); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(tree, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(tree)
	if os.Geteuid() != 0 {
		b.progress("runtimes: warning: not root; file ownership in the runtimes will be wrong")
	}
	var dirs []string
	if foreign {
		dir := filepath.Join(tree, foreignRuntimeName)
		if err := b.foreignRuntime(ctx, dir); err != nil {
			return nil, err
		}
		dirs = append(dirs, dir)
	}
	for i, img := range images {
		name := info.Names[i]
		dir := filepath.Join(tree, name)
		b.progress("runtimes: unpacking %s (%d/%d)", filepath.Base(img), i+1, len(images))
		if _, err := run(ctx, "", "unsquashfs", "-q", "-no-progress", "-d", dir, img); err != nil {
			return nil, err
		}
		dirs = append(dirs, dir)
	}
	for i, dir := range dirs {
		if err := checkRuntimeArch(dir, b.arch); err != nil {
			return nil, fmt.Errorf("runtime %s: %w", info.Names[i], err)
		}
	}
	b.progress("runtimes: mksquashfs %s -comp zstd ...", strings.Join(info.Names, " "))
	tmp := out + ".tmp"
	args := append(append([]string{}, dirs...), tmp, "-comp", "zstd", "-noappend", "-no-progress", "-quiet")
	if len(dirs) == 1 {
		args = append(args, "-keep-as-directory")
	}
	if _, err := run(ctx, "", "mksquashfs", args...); err != nil {
		os.Remove(tmp)
		return nil, err
	}
	if err := os.Rename(tmp, out); err != nil {
		return nil, err
	}
	fi, _ := os.Stat(out)
	b.progress("runtimes: wrote %s (%s: %s) in %s", out, mib(fi.Size()), strings.Join(info.Names, " "), time.Since(t).Round(100*time.Millisecond))
	return info, writeStamp(out, recipe.String())
}

// A foreign-architecture runtime when no images exist for it.
const (
	foreignRuntimeName = "glibc2.36"
	foreignSuite       = "bookworm"
)

// foreignRuntime makes a runtime for another architecture without
// emulation: debootstrap's first stage (--foreign) downloads and unpacks
// every minbase package, but runs no maintainer scripts (that needs the
// target CPU). The tree has the programs and libraries (sh, coreutils,
// glibc) but no generated configuration; the sandbox generates the /etc
// files actions need (passwd, group, hosts). Full runtimes for arm64 are
// built by mkruntimes.sh on an arm64 machine (or with qemu-user-static).
func (b *builder) foreignRuntime(ctx context.Context, dir string) error {
	if _, err := lookPath("debootstrap"); err != nil {
		return fmt.Errorf("no %s runtime images and no debootstrap to make a minimal one (apt-get install debootstrap)", b.arch)
	}
	b.progress("runtimes: no %s runtime images; debootstrap --foreign --arch=%s --variant=minbase %s (minimal %s)", b.arch, b.arch, foreignSuite, foreignRuntimeName)
	if _, err := run(ctx, "", "debootstrap", "--foreign", "--arch="+b.arch, "--variant=minbase", foreignSuite, dir, debianMirror()); err != nil {
		return err
	}
	os.RemoveAll(filepath.Join(dir, "debootstrap"))
	debs, _ := filepath.Glob(filepath.Join(dir, "var/cache/apt/archives/*.deb"))
	for _, d := range debs {
		os.Remove(d)
	}
	for _, f := range []string{"usr/bin/dash", "bin/sh"} {
		if _, err := os.Lstat(filepath.Join(dir, f)); err != nil {
			return fmt.Errorf("minimal runtime lacks /%s", f)
		}
	}
	return nil
}

// archMachine is the ELF machine of a Debian architecture's binaries.
var archMachine = map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}

// imageMachine reads the ELF machine of the shell in a runtime image
// without unpacking it (unsquashfs -cat).
func imageMachine(ctx context.Context, img string) (elf.Machine, error) {
	var lastErr error
	for _, p := range []string{"usr/bin/dash", "bin/dash", "usr/bin/bash", "bin/bash"} {
		out, err := run(ctx, "", "unsquashfs", "-cat", img, p)
		if err != nil {
			lastErr = err
			continue
		}
		f, err := elf.NewFile(strings.NewReader(out))
		if err != nil {
			lastErr = err
			continue
		}
		return f.Machine, nil
	}
	return 0, fmt.Errorf("no shell (dash or bash) to tell its architecture: %v", lastErr)
}

// checkRuntimeArch verifies a runtime tree's shell is for arch.
func checkRuntimeArch(dir, arch string) error {
	for _, p := range []string{"usr/bin/dash", "bin/dash", "usr/bin/bash", "bin/bash"} {
		f, err := elf.Open(filepath.Join(dir, p))
		if err != nil {
			continue
		}
		m := f.Machine
		f.Close()
		if m != archMachine[arch] {
			return fmt.Errorf("/%s is for %v, but the payload is for %s (use -runtime-dir with %s images)", p, m, arch, arch)
		}
		return nil
	}
	return fmt.Errorf("no shell (dash or bash) found to check the architecture")
}

// stampField reads key=value from a mkruntimes.sh stamp file.
func stampField(path, key string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, key+"="); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// debianMirror is ACTIOND_DEBIAN_MIRROR or deb.debian.org.
func debianMirror() string {
	if m := os.Getenv("ACTIOND_DEBIAN_MIRROR"); m != "" {
		return strings.TrimRight(m, "/")
	}
	return "http://deb.debian.org/debian"
}
