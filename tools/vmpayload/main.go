// Command vmpayload builds what actiond's VM mode boots, for one
// architecture (amd64 or arm64), into an output directory:
//
//	vmlinux | Image          the kernel from Debian's linux-image package:
//	                         amd64: the uncompressed ELF vmlinux (PVH entry,
//	                         boots directly with QEMU -M microvm); arm64: the
//	                         raw Image (Virtualization.framework, QEMU -M virt)
//	initramfs.cpio.gz        newc cpio: /init (actiond, static, GOARCH),
//	                         /dev/console, /dev/null, the kernel modules the
//	                         guest needs with modules.dep and modules.actiond,
//	                         mke2fs and e2fsck with their libraries
//	runtimes.squashfs        the runtimes disk: one SquashFS with a directory
//	                         per runtime (glibc2.36/, ...), from the images of
//	                         tools/mkruntimes.sh
//	manifest.json            what was built: files, sizes, SHA-256s, kernel
//	                         release, modules, runtimes, suggested kernel
//	                         command lines
//	work/                    downloaded packages, extracted trees, the guest
//	                         binary (a cache; safe to delete)
//
// Every step is cached (a .stamp next to each output records its inputs)
// and reports progress on stderr; a second run with unchanged inputs
// rewrites nothing. Needs Debian's apt (apt-get download; for arm64 the
// architecture is added with dpkg --add-architecture, as root), dpkg-deb,
// squashfs-tools, and the go command.
//
// Usage:
//
//	go run ./tools/vmpayload [-arch amd64|arm64] [-out DIR] [-runtime-dir DIR] [-runtimes glibc2.36,...]
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// options configure a build.
type options struct {
	Arch          string   // amd64 or arm64
	Out           string   // output directory
	RuntimeDir    string   // per-runtime SquashFS images (<name>.squashfs)
	Runtimes      []string // subset of the images (default: all)
	NoRuntimes    bool     // skip the runtimes disk
	KernelPackage string   // e.g. linux-image-6.1.0-56-amd64 (default: what linux-image-<arch> depends on)
	Compression   string   // initramfs compression: gzip or zstd
	Src           string   // module root (for go build ./cmd/actiond)
	Progress      io.Writer
}

// defaultCacheDir is where payloads go by default: <dir>/<arch>.
const defaultCacheDir = "/var/cache/actiond/vm"

// defaultCompression is zstd: Debian's 6.1 kernels (amd64 and arm64) have
// RD_ZSTD, and under TCG it unpacked ~0.25 s faster than gzip and came out
// ~10% smaller (7.0 vs 7.8 MiB for amd64).
const defaultCompression = compZstd

type builder struct {
	opts options
	arch string
}

func (b *builder) progress(format string, args ...any) {
	fmt.Fprintf(b.opts.Progress, "vmpayload[%s]: %s\n", b.arch, fmt.Sprintf(format, args...))
}

func (b *builder) work(name string) string { return filepath.Join(b.opts.Out, "work", name) }

// Manifest describes a built payload directory (manifest.json). File
// names are relative to the directory.
type Manifest struct {
	Arch                 string              `json:"arch"`
	Kernel               string              `json:"kernel"`
	KernelFormat         string              `json:"kernel_format"` // elf-pvh (amd64 vmlinux) or arm64-image
	KernelRelease        string              `json:"kernel_release"`
	KernelPackage        string              `json:"kernel_package"`
	Initramfs            string              `json:"initramfs"`
	InitramfsCompression string              `json:"initramfs_compression"`
	InitramfsRawSize     int64               `json:"initramfs_uncompressed_size"`
	GuestBinarySize      int64               `json:"guest_binary_size"`
	Modules              []string            `json:"modules"`
	E2fsprogs            string              `json:"e2fsprogs"`
	Runtimes             string              `json:"runtimes,omitempty"`
	RuntimeNames         []string            `json:"runtime_names,omitempty"`
	RuntimesNote         string              `json:"runtimes_note,omitempty"`
	Cmdlines             map[string]string   `json:"cmdlines"`
	Files                map[string]FileInfo `json:"files"`
	BuiltAt              time.Time           `json:"built_at"`
}

// FileInfo is one output file.
type FileInfo struct {
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Suggested kernel command lines per machine type: the console, a kernel
// panic reboots (so the hypervisor sees the VM end instead of a hung one),
// warnings only on the console.
func cmdlines(arch string) map[string]string {
	common := "panic=-1 loglevel=4"
	switch arch {
	case "amd64":
		return map[string]string{
			// (microvm has no PCI bus: the kernel logs "PCI: Fatal: No
			// config space access function found"; harmless.)
			"qemu-microvm": "console=ttyS0 reboot=t " + common,
			"vz":           "console=hvc0 " + common,
		}
	case "arm64":
		return map[string]string{
			"qemu-virt": "console=ttyAMA0 " + common,
			"vz":        "console=hvc0 " + common,
		}
	}
	return nil
}

// build runs every step and writes manifest.json.
func build(ctx context.Context, opts options) (*Manifest, error) {
	b := &builder{opts: opts, arch: opts.Arch}
	if b.opts.Progress == nil {
		b.opts.Progress = io.Discard
	}
	if b.arch != "amd64" && b.arch != "arm64" {
		return nil, fmt.Errorf("-arch %q: want amd64 or arm64", b.arch)
	}
	if _, ok := compExt[b.opts.Compression]; !ok {
		return nil, fmt.Errorf("-compression %q: want gzip or zstd", b.opts.Compression)
	}
	if err := os.MkdirAll(b.work(""), 0o755); err != nil {
		return nil, err
	}
	// One build per output directory at a time (make -j, parallel tests).
	lock, err := os.OpenFile(filepath.Join(b.opts.Out, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b.progress("waiting for another build of %s", b.opts.Out)
		if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
			return nil, fmt.Errorf("lock %s: %w", b.opts.Out, err)
		}
	}
	t0 := time.Now()
	b.progress("building into %s", b.opts.Out)
	if err := b.ensureForeignArch(ctx); err != nil {
		return nil, err
	}
	ki, err := b.kernel(ctx)
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	ii, err := b.initramfs(ctx, ki)
	if err != nil {
		return nil, fmt.Errorf("initramfs: %w", err)
	}
	m := &Manifest{
		Arch:                 b.arch,
		Kernel:               ki.File,
		KernelFormat:         ki.Format,
		KernelRelease:        ki.Release,
		KernelPackage:        ki.Package + " " + ki.Version,
		Initramfs:            ii.File,
		InitramfsCompression: ii.Compression,
		InitramfsRawSize:     ii.RawSize,
		GuestBinarySize:      ii.BinarySize,
		Modules:              ii.Modules,
		E2fsprogs:            ii.E2fsprogs,
		Cmdlines:             cmdlines(b.arch),
		Files:                map[string]FileInfo{},
		BuiltAt:              time.Now().UTC().Round(time.Second),
	}
	if !b.opts.NoRuntimes {
		ri, err := b.runtimesDisk(ctx)
		if err != nil {
			return nil, fmt.Errorf("runtimes: %w", err)
		}
		m.Runtimes, m.RuntimeNames, m.RuntimesNote = ri.File, ri.Names, ri.Note
	}
	for _, f := range []string{m.Kernel, m.Initramfs, m.Runtimes} {
		if f == "" {
			continue
		}
		p := filepath.Join(b.opts.Out, f)
		fi, err := os.Stat(p)
		if err != nil {
			return nil, err
		}
		sum, err := fileSHA256(p)
		if err != nil {
			return nil, err
		}
		m.Files[f] = FileInfo{Size: fi.Size(), SHA256: sum}
	}
	// Unchanged content keeps the old manifest (and its build time).
	manifestPath := filepath.Join(b.opts.Out, "manifest.json")
	if old, err := os.ReadFile(manifestPath); err == nil {
		var prev Manifest
		if json.Unmarshal(old, &prev) == nil {
			m.BuiltAt = prev.BuiltAt
		}
	}
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	data = append(data, '\n')
	if old, err := os.ReadFile(manifestPath); err != nil || !bytes.Equal(old, data) {
		if old != nil {
			m.BuiltAt = time.Now().UTC().Round(time.Second)
			if data, err = json.MarshalIndent(m, "", "  "); err != nil {
				return nil, err
			}
			data = append(data, '\n')
		}
		if err := writeFileAtomic(manifestPath, data, 0o644); err != nil {
			return nil, err
		}
	}
	var sizes []string
	for _, f := range []string{m.Kernel, m.Initramfs, m.Runtimes} {
		if f != "" {
			sizes = append(sizes, fmt.Sprintf("%s %s", f, mib(m.Files[f].Size)))
		}
	}
	b.progress("done in %s: %s", time.Since(t0).Round(100*time.Millisecond), strings.Join(sizes, ", "))
	return m, nil
}

// moduleRoot finds the directory with go.mod from dir upwards.
func moduleRoot(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod found above the current directory; pass -src")
		}
		dir = parent
	}
}

func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found", name)
}

// defaultRuntimeDir: ACTIOND_RUNTIME_DIR (what `make runtimes` fills) for
// the build machine's architecture, <cache>/runtimes-<arch> for others.
func defaultRuntimeDir(arch string) string {
	if arch == runtime.GOARCH {
		if d := os.Getenv("ACTIOND_RUNTIME_DIR"); d != "" {
			return d
		}
		return "/var/cache/actiond/runtimes"
	}
	return "/var/cache/actiond/runtimes-" + arch
}

func main() {
	arch := runtime.GOARCH
	if a := os.Getenv("ARCH"); a != "" {
		arch = a
	}
	var opts options
	flag.StringVar(&opts.Arch, "arch", arch, "target architecture: amd64 or arm64 (default $ARCH or this machine's)")
	flag.StringVar(&opts.Out, "out", "", "output directory (default "+defaultCacheDir+"/<arch>)")
	flag.StringVar(&opts.RuntimeDir, "runtime-dir", "", "directory of runtime images <name>.squashfs (default $ACTIOND_RUNTIME_DIR or /var/cache/actiond/runtimes for this machine's architecture, /var/cache/actiond/runtimes-<arch> otherwise)")
	runtimes := flag.String("runtimes", "", "comma-separated runtime names to put on the runtimes disk (default: every image)")
	flag.BoolVar(&opts.NoRuntimes, "no-runtimes", false, "do not build the runtimes disk")
	flag.StringVar(&opts.KernelPackage, "kernel-package", "", "Debian kernel package (default: the one linux-image-<arch> depends on)")
	flag.StringVar(&opts.Compression, "compression", defaultCompression, "initramfs compression: gzip or zstd")
	flag.StringVar(&opts.Src, "src", "", "actiond module root (default: found from the current directory)")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "vmpayload: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	if opts.Out == "" {
		opts.Out = filepath.Join(defaultCacheDir, opts.Arch)
	}
	if opts.RuntimeDir == "" {
		opts.RuntimeDir = defaultRuntimeDir(opts.Arch)
	}
	if *runtimes != "" {
		opts.Runtimes = strings.Split(*runtimes, ",")
	}
	if opts.Src == "" {
		src, err := moduleRoot(".")
		if err != nil {
			fmt.Fprintln(os.Stderr, "vmpayload:", err)
			os.Exit(2)
		}
		opts.Src = src
	}
	opts.Progress = os.Stderr
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	m, err := build(ctx, opts)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vmpayload[%s]: FAILED: %v\n", opts.Arch, err)
		os.Exit(1)
	}
	fmt.Println(filepath.Join(opts.Out, "manifest.json"))
	_ = m
}
