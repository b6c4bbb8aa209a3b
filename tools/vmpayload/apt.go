package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// run runs a command, returning its stdout; on failure the error has the
// command line and the tail of stderr.
func run(ctx context.Context, dir string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		tail := strings.TrimSpace(stderr.String())
		if len(tail) > 2000 {
			tail = "…" + tail[len(tail)-2000:]
		}
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, tail)
	}
	return stdout.String(), nil
}

// hostDebArch is dpkg's name of the build machine's architecture.
func hostDebArch(ctx context.Context) (string, error) {
	out, err := run(ctx, "", "dpkg", "--print-architecture")
	return strings.TrimSpace(out), err
}

// ensureForeignArch makes apt know packages of arch: dpkg
// --add-architecture and apt-get update, once (needs root).
func (b *builder) ensureForeignArch(ctx context.Context) error {
	host, err := hostDebArch(ctx)
	if err != nil {
		return err
	}
	if host == b.arch {
		return nil
	}
	out, err := run(ctx, "", "dpkg", "--print-foreign-architectures")
	if err != nil {
		return err
	}
	if !containsLine(out, b.arch) {
		if os.Geteuid() != 0 {
			return fmt.Errorf("apt does not know %s packages; as root run: dpkg --add-architecture %s && apt-get update", b.arch, b.arch)
		}
		b.progress("apt: adding architecture %s (dpkg --add-architecture %s; apt-get update)", b.arch, b.arch)
		if _, err := run(ctx, "", "dpkg", "--add-architecture", b.arch); err != nil {
			return err
		}
		if _, err := run(ctx, "", "apt-get", "update", "-qq"); err != nil {
			return err
		}
		return nil
	}
	// Known architecture, but lists may never have been fetched for it.
	if _, err := run(ctx, "", "apt-cache", "show", "libc6:"+b.arch); err != nil {
		if os.Geteuid() != 0 {
			return fmt.Errorf("no %s package lists; as root run: apt-get update", b.arch)
		}
		b.progress("apt: fetching package lists for %s (apt-get update)", b.arch)
		_, err = run(ctx, "", "apt-get", "update", "-qq")
		return err
	}
	return nil
}

func containsLine(s, want string) bool {
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) == want {
			return true
		}
	}
	return false
}

// resolveKernelPackage returns the versioned kernel package the
// linux-image-<arch> metapackage currently depends on, e.g.
// linux-image-6.1.0-56-amd64.
func (b *builder) resolveKernelPackage(ctx context.Context) (string, error) {
	meta := "linux-image-" + b.arch
	out, err := run(ctx, "", "apt-cache", "depends", meta+":"+b.arch)
	if err != nil {
		return "", fmt.Errorf("find the current kernel package: %w", err)
	}
	for _, line := range strings.Split(out, "\n") {
		dep, ok := strings.CutPrefix(strings.TrimSpace(line), "Depends: ")
		if !ok {
			continue
		}
		dep, _, _ = strings.Cut(dep, ":")
		if strings.HasPrefix(dep, "linux-image-") {
			return dep, nil
		}
	}
	return "", fmt.Errorf("apt-cache depends %s names no linux-image package:\n%s", meta, out)
}

// debFile is a package apt would download.
type debFile struct {
	Package string // as asked, e.g. libc6:arm64
	File    string // file name, e.g. libc6_2.36-9+deb12u14_arm64.deb
	Size    int64
	SHA256  string
}

// Version returns the package version from the file name.
func (d debFile) Version() string {
	parts := strings.Split(strings.TrimSuffix(d.File, ".deb"), "_")
	if len(parts) >= 2 {
		return parts[1]
	}
	return ""
}

// download fetches packages (name or name:arch) into dir with apt-get
// download, skipping files already there with the right hash.
func (b *builder) download(ctx context.Context, dir string, pkgs ...string) ([]debFile, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	// --print-uris omits files already in the current directory: ask in
	// an empty one.
	empty, err := os.MkdirTemp("", "vmpayload-apt-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(empty)
	out, err := run(ctx, empty, "apt-get", append([]string{"download", "--print-uris"}, pkgs...)...)
	if err != nil {
		return nil, err
	}
	var debs []debFile
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 {
			continue
		}
		size, _ := strconv.ParseInt(f[2], 10, 64)
		debs = append(debs, debFile{File: f[1], Size: size, SHA256: strings.TrimPrefix(f[3], "SHA256:")})
	}
	if len(debs) != len(pkgs) {
		return nil, fmt.Errorf("apt-get download --print-uris %v: expected %d packages, got %d:\n%s", pkgs, len(pkgs), len(debs), out)
	}
	// apt prints them in its own order: match by name.
	ordered := make([]debFile, len(pkgs))
	for i, p := range pkgs {
		name, _, _ := strings.Cut(p, ":")
		found := false
		for _, d := range debs {
			if strings.HasPrefix(d.File, name+"_") {
				d.Package = p
				ordered[i], found = d, true
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("apt-get download --print-uris %v: no file for %s:\n%s", pkgs, p, out)
		}
	}
	debs = ordered
	var missing []string
	for _, d := range debs {
		if ok, _ := fileHasSHA256(filepath.Join(dir, d.File), d.SHA256); !ok {
			missing = append(missing, d.Package)
		}
	}
	if len(missing) > 0 {
		b.progress("apt: downloading %s", strings.Join(missing, " "))
		// apt drops privileges to _apt when it can; the cache directory
		// is root's, so it warns and downloads as root. Harmless.
		if _, err := run(ctx, dir, "apt-get", append([]string{"download", "-q"}, missing...)...); err != nil {
			return nil, err
		}
		for _, d := range debs {
			if ok, err := fileHasSHA256(filepath.Join(dir, d.File), d.SHA256); !ok {
				return nil, fmt.Errorf("downloaded %s does not have the expected SHA-256 (%v)", d.File, err)
			}
		}
	}
	return debs, nil
}

func fileHasSHA256(path, want string) (bool, error) {
	got, err := fileSHA256(path)
	if err != nil {
		return false, err
	}
	return strings.EqualFold(got, want), nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// extractDebs unpacks packages (dpkg-deb -x, no maintainer scripts) into a
// fresh tree at dir, which is kept while stamp matches the package files.
func (b *builder) extractDebs(ctx context.Context, debDir, dir string, debs []debFile) error {
	var recipe []string
	for _, d := range debs {
		recipe = append(recipe, d.File+" "+d.SHA256)
	}
	stamp := strings.Join(recipe, "\n") + "\n"
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
	for _, d := range debs {
		if _, err := run(ctx, "", "dpkg-deb", "-x", filepath.Join(debDir, d.File), tmp); err != nil {
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

// Stamps: DIR.stamp holds the recipe DIR (or a file) was made from.
func stampMatches(path, recipe string) bool {
	if _, err := os.Stat(path); err != nil {
		return false
	}
	got, err := os.ReadFile(path + ".stamp")
	return err == nil && string(got) == recipe
}

func writeStamp(path, recipe string) error {
	return writeFileAtomic(path+".stamp", []byte(recipe), 0o644)
}

// writeFileAtomic writes data to a temporary file next to path and renames
// it into place.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
