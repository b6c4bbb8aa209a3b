package vmpayload

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/actiond/actiond/vmhost/vmpayload/debian"
)

// kernelInfo is the kernel step's result.
type kernelInfo struct {
	Package string // linux-image-6.1.0-56-amd64
	Version string // 6.1.192-2
	Release string // 6.1.0-56-amd64 (uname -r, the modules directory)
	Tree    string // extracted package (boot/ and lib/modules/)
	ModDir  string // lib/modules/<release> in Tree
	File    string // written kernel (vmlinux or Image), in the output directory
	Format  string // "elf-pvh" or "arm64-image"
}

// resolveKernelPackage returns the versioned kernel package the
// linux-image-<arch> metapackage depends on, e.g. linux-image-6.1.0-56-amd64.
func resolveKernelPackage(idx *debian.Index, arch string) (string, error) {
	meta := "linux-image-" + arch
	p, ok := idx.Packages[meta]
	if !ok {
		return "", fmt.Errorf("no package %s in the index", meta)
	}
	for _, rel := range strings.Split(p.Depends, ",") {
		for _, alt := range strings.Split(rel, "|") {
			name := strings.Fields(strings.TrimSpace(alt))
			if len(name) > 0 && strings.HasPrefix(name[0], "linux-image-") {
				if _, ok := idx.Packages[name[0]]; ok {
					return name[0], nil
				}
			}
		}
	}
	return "", fmt.Errorf("%s depends on no linux-image package (Depends: %s)", meta, p.Depends)
}

// kernel downloads the Debian kernel package, extracts its boot/ and
// modules, and writes the kernel file the hypervisors boot directly: for
// amd64 the uncompressed ELF vmlinux (with its PVH entry note, for QEMU -M
// microvm) decoded from the xz stream inside the bzImage; for arm64 the raw
// Image (Virtualization.framework and QEMU -M virt take it as is).
func (b *builder) kernel(ctx context.Context) (*kernelInfo, error) {
	a, err := b.archive(ctx, KernelSuite)
	if err != nil {
		return nil, err
	}
	pkg := b.opts.KernelPackage
	if pkg == "" {
		if pkg, err = resolveKernelPackage(a.Index, b.arch); err != nil {
			return nil, err
		}
	}
	pkgs, paths, sums, err := b.fetch(ctx, KernelSuite, []string{pkg})
	if err != nil {
		return nil, err
	}
	ki := &kernelInfo{Package: pkg, Version: pkgs[0].Version, Tree: b.work("kernel")}
	b.pkgs["kernel"] = []string{pkgs[0].ID()}
	b.log.Info("payload: kernel package", "package", pkg, "version", ki.Version, "size", mib(pkgs[0].Size))
	keep := func(rel string) bool {
		return strings.HasPrefix(rel, "boot/vmlinuz") || strings.HasPrefix(rel, "lib/modules/") || strings.HasPrefix(rel, "usr/lib/modules/")
	}
	if !stampMatches(ki.Tree, "extract v1\n"+strings.Join(sums, "\n")+"\n") {
		b.log.Info("payload: unpacking the kernel package (xz, in Go: takes a while)", "package", pkg)
	}
	if err := extractDebs(ki.Tree, paths, sums, keep); err != nil {
		return nil, err
	}
	var rels []string
	for _, d := range []string{"lib/modules", "usr/lib/modules"} {
		m, _ := filepath.Glob(filepath.Join(ki.Tree, d, "*"))
		rels = append(rels, m...)
	}
	if len(rels) != 1 {
		return nil, fmt.Errorf("kernel package %s: want one lib/modules/<release> directory, found %v", pkg, rels)
	}
	ki.ModDir = rels[0]
	ki.Release = filepath.Base(rels[0])
	vmlinuz := filepath.Join(ki.Tree, "boot", "vmlinuz-"+ki.Release)

	switch b.arch {
	case "amd64":
		ki.File, ki.Format = "vmlinux", "elf-pvh"
	case "arm64":
		ki.File, ki.Format = "Image", "arm64-image"
	}
	out := filepath.Join(b.opts.Dir, ki.File)
	recipe := fmt.Sprintf("kernel v2 %s %s %s\n", pkg, ki.Version, sums[0])
	if stampMatches(out, recipe) {
		b.log.Info("payload: kernel up to date", "file", ki.File)
		return ki, nil
	}
	var data []byte
	switch b.arch {
	case "amd64":
		data, err = vmlinuxFromBzImage(vmlinuz)
	case "arm64":
		data, err = arm64Image(vmlinuz)
	}
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w", vmlinuz, err)
	}
	if err := b.invalidate(); err != nil {
		return nil, err
	}
	if err := writeFileAtomic(out, data, 0o644); err != nil {
		return nil, err
	}
	b.log.Info("payload: wrote the kernel", "file", out, "size", mib(int64(len(data))))
	return ki, writeStamp(out, recipe)
}

var xzMagic = []byte{0xFD, '7', 'z', 'X', 'Z', 0x00}

// vmlinuxFromBzImage finds the xz stream in a bzImage and returns the
// uncompressed kernel, checked to be an x86-64 ELF with a PVH entry.
func vmlinuxFromBzImage(path string) ([]byte, error) {
	bz, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return kernelFromImage(bz, checkPVH)
}

// kernelFromImage tries each xz stream in img until one decodes to
// something check accepts.
func kernelFromImage(img []byte, check func([]byte) error) ([]byte, error) {
	lastErr := errors.New("no xz stream (is this kernel compressed with something else?)")
	for off := 0; ; off++ {
		i := bytes.Index(img[off:], xzMagic)
		if i < 0 {
			break
		}
		off += i
		out, err := decodeXZ(img[off:])
		if err != nil {
			lastErr = fmt.Errorf("xz at offset %d: %w", off, err)
			continue
		}
		if err := check(out); err != nil {
			lastErr = fmt.Errorf("xz stream at offset %d: %w", off, err)
			continue
		}
		return out, nil
	}
	return nil, fmt.Errorf("extract vmlinux: %w", lastErr)
}

// checkPVH verifies data is an x86-64 ELF with the Xen PVH entry note
// (XEN_ELFNOTE_PHYS32_ENTRY) that lets QEMU boot it directly.
func checkPVH(data []byte) error {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("not an ELF: %w", err)
	}
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("ELF machine %v, want x86-64", f.Machine)
	}
	const xenElfnotePhys32Entry = 18
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		notes, err := io.ReadAll(p.Open())
		if err != nil {
			continue
		}
		for len(notes) >= 12 {
			order := f.ByteOrder
			namesz, descsz, typ := order.Uint32(notes), order.Uint32(notes[4:]), order.Uint32(notes[8:])
			name := notes[12:min(len(notes), 12+int(namesz))]
			if typ == xenElfnotePhys32Entry && strings.HasPrefix(string(name), "Xen") {
				return nil
			}
			adv := 12 + align4(int(namesz)) + align4(int(descsz))
			if adv > len(notes) {
				break
			}
			notes = notes[adv:]
		}
	}
	return errors.New("no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); this vmlinux cannot boot with -M microvm")
}

func align4(n int) int { return (n + 3) &^ 3 }

// arm64Image returns the raw arm64 Image from a Debian vmlinuz (raw, or
// gzip-compressed in some releases), checked by its header magic.
func arm64Image(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(data) > 2 && data[0] == 0x1f && data[1] == 0x8b {
		zr, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, err
		}
		zr.Multistream(false)
		if data, err = io.ReadAll(zr); err != nil {
			return nil, fmt.Errorf("gunzip: %w", err)
		}
	}
	// arm64 Image header: magic "ARM\x64" at 0x38, image_size at 0x10.
	if len(data) < 64 || string(data[0x38:0x3c]) != "ARM\x64" {
		return nil, errors.New("not an arm64 Image (no ARM\\x64 magic at 0x38)")
	}
	if size := binary.LittleEndian.Uint64(data[0x10:]); size == 0 {
		return nil, errors.New("arm64 Image header has image_size 0")
	}
	return data, nil
}
