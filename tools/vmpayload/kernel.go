package main

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
	"os/exec"
	"path/filepath"
	"strings"
)

// kernelInfo is the kernel step's result.
type kernelInfo struct {
	Package string // linux-image-6.1.0-56-amd64
	Version string // 6.1.192-2
	Release string // 6.1.0-56-amd64 (uname -r, the modules directory)
	Tree    string // extracted package
	File    string // written kernel (vmlinux or Image), in the output directory
	Format  string // "elf-pvh" or "arm64-image"
}

// kernel downloads the Debian kernel package, extracts it and writes the
// kernel file the hypervisors boot directly: for amd64 the uncompressed
// ELF vmlinux (with its PVH entry note, for QEMU -M microvm) taken from the
// xz stream inside the bzImage; for arm64 the raw Image
// (Virtualization.framework and QEMU -M virt take it as is).
func (b *builder) kernel(ctx context.Context) (*kernelInfo, error) {
	pkg := b.opts.KernelPackage
	if pkg == "" {
		var err error
		if pkg, err = b.resolveKernelPackage(ctx); err != nil {
			return nil, err
		}
	}
	debs, err := b.download(ctx, b.work("debs"), pkg+":"+b.arch)
	if err != nil {
		return nil, err
	}
	ki := &kernelInfo{Package: pkg, Version: debs[0].Version(), Tree: b.work("kernel")}
	b.progress("kernel: %s %s", pkg, ki.Version)
	if err := b.extractDebs(ctx, b.work("debs"), ki.Tree, debs); err != nil {
		return nil, err
	}
	rels, err := filepath.Glob(filepath.Join(ki.Tree, "lib", "modules", "*"))
	if err != nil || len(rels) != 1 {
		return nil, fmt.Errorf("kernel package %s: want one lib/modules/<release> directory, found %v", pkg, rels)
	}
	ki.Release = filepath.Base(rels[0])
	vmlinuz := filepath.Join(ki.Tree, "boot", "vmlinuz-"+ki.Release)

	switch b.arch {
	case "amd64":
		ki.File, ki.Format = "vmlinux", "elf-pvh"
	case "arm64":
		ki.File, ki.Format = "Image", "arm64-image"
	default:
		return nil, fmt.Errorf("unsupported architecture %s", b.arch)
	}
	out := filepath.Join(b.opts.Out, ki.File)
	recipe := fmt.Sprintf("kernel %s %s %s\n", pkg, ki.Version, debs[0].SHA256)
	if stampMatches(out, recipe) {
		b.progress("kernel: %s up to date", ki.File)
		return ki, nil
	}
	var data []byte
	switch b.arch {
	case "amd64":
		data, err = vmlinuxFromBzImage(ctx, vmlinuz)
	case "arm64":
		data, err = arm64Image(vmlinuz)
	}
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w", vmlinuz, err)
	}
	if err := writeFileAtomic(out, data, 0o644); err != nil {
		return nil, err
	}
	b.progress("kernel: wrote %s (%s)", out, mib(int64(len(data))))
	return ki, writeStamp(out, recipe)
}

var xzMagic = []byte{0xFD, '7', 'z', 'X', 'Z', 0x00}

// vmlinuxFromBzImage finds the xz stream in a bzImage and returns the
// uncompressed kernel, checked to be an x86-64 ELF with a PVH entry. The
// stream uses xz's x86 BCJ filter, which pure-Go xz readers lack, so the
// xz command (xz-utils, essential in Debian) decompresses it.
func vmlinuxFromBzImage(ctx context.Context, path string) ([]byte, error) {
	bz, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	xzBin, err := exec.LookPath("xz")
	if err != nil {
		return nil, fmt.Errorf("the xz command is needed to unpack the kernel (apt-get install xz-utils): %w", err)
	}
	lastErr := errors.New("no xz stream (is this kernel compressed with something else?)")
	for off := 0; ; off++ {
		i := bytes.Index(bz[off:], xzMagic)
		if i < 0 {
			break
		}
		off += i
		cmd := exec.CommandContext(ctx, xzBin, "-dc", "--single-stream")
		cmd.Stdin = bytes.NewReader(bz[off:])
		var out, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &stderr
		if err := cmd.Run(); err != nil {
			lastErr = fmt.Errorf("xz at offset %d: %w: %s", off, err, strings.TrimSpace(stderr.String()))
			continue
		}
		if err := checkPVH(out.Bytes()); err != nil {
			lastErr = fmt.Errorf("xz stream at offset %d: %w", off, err)
			continue
		}
		return out.Bytes(), nil
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

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
