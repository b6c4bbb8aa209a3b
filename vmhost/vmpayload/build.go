// Package vmpayload builds what actiond's VM mode boots, for one guest
// architecture (amd64 or arm64), into a payload directory, with nothing
// but Go and HTTP access to a Debian mirror (no root, no Debian tools, so
// it runs on macOS as well as Linux):
//
//	vmlinux | Image      the kernel from Debian's linux-image package:
//	                     amd64: the uncompressed ELF vmlinux (PVH entry,
//	                     boots directly with QEMU -M microvm), decoded from
//	                     the bzImage in Go; arm64: the raw Image
//	initramfs.cpio.zst   newc cpio: /init (actiond, static, GOARCH),
//	                     /dev/console, /dev/null, the kernel modules the
//	                     guest needs with modules.dep and modules.actiond,
//	                     mke2fs and e2fsck with their libraries
//	runtimes.tar         the runtimes disk: actiond-runtimes.json, then per
//	                     runtime (glibc2.31, glibc2.36, glibc2.41) a
//	                     zstd-compressed tar of debootstrap's first stage
//	                     (unpacked, unconfigured) with /.actiond/second-stage
//	manifest.json        what was built: package versions, files with
//	                     SHA-256s, the content hash; written last, so a
//	                     directory without it is not a payload
//	work/                downloads (verified), extracted trees, the guest
//	                     binary: a cache, safe to delete
//
// Every step is cached (a .stamp next to each output records its inputs);
// a second run with unchanged inputs downloads and rewrites nothing.
package vmpayload

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/actiond/actiond/vmhost/vmpayload/debian"
)

// ManifestFormat changes when the payload layout changes incompatibly.
const ManifestFormat = 2

// KernelSuite is the Debian release the kernel and the initramfs tools
// come from.
const KernelSuite = "bookworm"

// Options configure a build.
type Options struct {
	Arch string // amd64 or arm64
	Dir  string // payload directory
	// Mirror is the Debian archive (default $ACTIOND_DEBIAN_MIRROR, else
	// http://deb.debian.org/debian).
	Mirror string
	// Update fetches the suites' InRelease again (new package versions);
	// otherwise the cached indexes are used and a complete cache needs no
	// network.
	Update bool
	// KernelPackage overrides the kernel package (default: what
	// linux-image-<arch> depends on in KernelSuite).
	KernelPackage string
	// Runtimes selects runtimes by name (default: all of DefaultRuntimes);
	// NoRuntimes builds none.
	Runtimes   []string
	NoRuntimes bool
	// Compression of the initramfs: zstd (default) or gzip.
	Compression string
	// Src is the actiond module root the guest binary is built from.
	Src string
	// GoBin is the go command (default: "go" on PATH).
	GoBin string
	// BuilderID identifies the program building (e.g. the SHA-256 of the
	// running actiond); recorded in the manifest so that a new binary is
	// noticed (it rebuilds only the initramfs).
	BuilderID string
	Logger    *slog.Logger
	HTTP      *http.Client
}

// DefaultCompression is zstd: Debian's 6.1 kernels (amd64 and arm64) have
// RD_ZSTD, and under TCG it unpacked ~0.25 s faster than gzip and came out
// ~10% smaller (7.0 vs 7.8 MiB for amd64).
const DefaultCompression = compZstd

type builder struct {
	opts     Options
	arch     string
	log      *slog.Logger
	client   *debian.Client
	archives map[string]*debian.Archive // by suite
	pkgs     map[string][]string        // manifest package lists
	roots    []string                   // runtime roots (nil: RuntimeRoots)
	// invalidated: manifest.json was removed (a payload file is replaced).
	invalidated bool
}

func (b *builder) work(name string) string { return filepath.Join(b.opts.Dir, "work", name) }

// step runs fn and logs how long it took.
func (b *builder) step(name string, fn func() error) error {
	t := time.Now()
	b.log.Info("payload: "+name, "arch", b.arch)
	if err := fn(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	b.log.Info("payload: "+name+" done", "arch", b.arch, "took", time.Since(t).Round(10*time.Millisecond))
	return nil
}

// Manifest describes a built payload directory (manifest.json). File
// names are relative to the directory.
type Manifest struct {
	Format               int                 `json:"format"`
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
	Mirror               string              `json:"mirror"`
	Suites               map[string]string   `json:"suites"`   // suite → InRelease date
	Packages             map[string][]string `json:"packages"` // kernel, initramfs, <runtime> → name=version
	Cmdlines             map[string]string   `json:"cmdlines"`
	Files                map[string]FileInfo `json:"files"`
	// ContentHash is the SHA-256 over the files' names and SHA-256s: two
	// payloads with the same hash boot the same thing.
	ContentHash string    `json:"content_hash"`
	BuilderID   string    `json:"builder_id,omitempty"`
	BuiltAt     time.Time `json:"built_at"`
	// Download is what this build fetched (bytes); Took its duration.
	Download int64  `json:"download_bytes"`
	Took     string `json:"took"`
}

// FileInfo is one output file.
type FileInfo struct {
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// ReadManifest reads dir/manifest.json; it fails when there is none, it is
// of another format or arch, or a file it names is missing or has another
// size (a payload being rebuilt or damaged).
func ReadManifest(dir, arch string) (*Manifest, error) {
	data, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, "manifest.json"), err)
	}
	if m.Format != ManifestFormat {
		return nil, fmt.Errorf("%s: format %d, this actiond makes %d", filepath.Join(dir, "manifest.json"), m.Format, ManifestFormat)
	}
	if arch != "" && m.Arch != arch {
		return nil, fmt.Errorf("%s: payload for %s, not %s", dir, m.Arch, arch)
	}
	for name, fi := range m.Files {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("payload %s: %w", dir, err)
		}
		if st.Size() != fi.Size {
			return nil, fmt.Errorf("payload %s: %s has %d bytes, the manifest says %d", dir, name, st.Size(), fi.Size)
		}
	}
	return &m, nil
}

// Suggested kernel command lines per machine type.
func cmdlines(arch string) map[string]string {
	common := "panic=-1 loglevel=4"
	switch arch {
	case "amd64":
		return map[string]string{
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

// Build runs every step into opts.Dir and writes manifest.json last. It
// removes manifest.json before it replaces the first payload file, so an
// interrupted build leaves a directory that is not booted (the next build
// resumes: finished steps are kept), while a build that fails before
// changing anything (e.g. no network) leaves a complete payload usable.
func Build(ctx context.Context, opts Options) (*Manifest, error) {
	b := &builder{opts: opts, arch: opts.Arch, log: opts.Logger, archives: map[string]*debian.Archive{}, pkgs: map[string][]string{}}
	if b.log == nil {
		b.log = slog.Default()
	}
	if b.arch != "amd64" && b.arch != "arm64" {
		return nil, fmt.Errorf("arch %q: want amd64 or arm64", b.arch)
	}
	if b.opts.Compression == "" {
		b.opts.Compression = DefaultCompression
	}
	if _, ok := compExt[b.opts.Compression]; !ok {
		return nil, fmt.Errorf("compression %q: want gzip or zstd", b.opts.Compression)
	}
	if b.opts.Mirror == "" {
		b.opts.Mirror = debian.MirrorFromEnv()
	}
	if b.opts.Dir == "" {
		return nil, errors.New("no payload directory")
	}
	if err := os.MkdirAll(b.work(""), 0o755); err != nil {
		return nil, fmt.Errorf("payload directory: %w", err)
	}
	unlock, err := lockDir(b.opts.Dir, func() { b.log.Info("payload: waiting for another build of the same directory", "dir", b.opts.Dir) })
	if err != nil {
		return nil, err
	}
	defer unlock()
	manifestPath := filepath.Join(b.opts.Dir, "manifest.json")
	b.client = &debian.Client{
		Mirror: b.opts.Mirror, Dir: b.work(""), HTTP: b.opts.HTTP,
		Progress: func(format string, args ...any) { b.log.Info("payload: " + fmt.Sprintf(format, args...)) },
	}
	t0 := time.Now()
	b.log.Info("payload: building", "arch", b.arch, "dir", b.opts.Dir, "mirror", b.opts.Mirror)

	var ki *kernelInfo
	if err := b.step("kernel", func() (err error) { ki, err = b.kernel(ctx); return }); err != nil {
		return nil, b.explain(err)
	}
	var ii *initramfsInfo
	if err := b.step("initramfs", func() (err error) { ii, err = b.initramfs(ctx, ki); return }); err != nil {
		return nil, b.explain(err)
	}
	m := &Manifest{
		Format:               ManifestFormat,
		Arch:                 b.arch,
		Kernel:               ki.File,
		KernelFormat:         ki.Format,
		KernelRelease:        ki.Release,
		KernelPackage:        ki.Package + "=" + ki.Version,
		Initramfs:            ii.File,
		InitramfsCompression: ii.Compression,
		InitramfsRawSize:     ii.RawSize,
		GuestBinarySize:      ii.BinarySize,
		Modules:              ii.Modules,
		E2fsprogs:            ii.E2fsprogs,
		Mirror:               b.opts.Mirror,
		Suites:               map[string]string{},
		Cmdlines:             cmdlines(b.arch),
		Files:                map[string]FileInfo{},
		BuilderID:            b.opts.BuilderID,
		BuiltAt:              time.Now().UTC().Round(time.Second),
	}
	if !b.opts.NoRuntimes {
		var ri *runtimesInfo
		if err := b.step("runtimes", func() (err error) { ri, err = b.runtimesDisk(ctx); return }); err != nil {
			return nil, b.explain(err)
		}
		m.Runtimes, m.RuntimeNames = ri.File, ri.Names
	}
	m.Packages = b.pkgs
	for suite, a := range b.archives {
		m.Suites[suite] = a.Release.Date.UTC().Format(time.RFC3339)
	}
	var names []string
	for _, f := range []string{m.Kernel, m.Initramfs, m.Runtimes} {
		if f == "" {
			continue
		}
		p := filepath.Join(b.opts.Dir, f)
		fi, err := os.Stat(p)
		if err != nil {
			return nil, err
		}
		sum, err := fileSHA256(p)
		if err != nil {
			return nil, err
		}
		m.Files[f] = FileInfo{Size: fi.Size(), SHA256: sum}
		names = append(names, f)
	}
	sort.Strings(names)
	h := sha256.New()
	for _, n := range names {
		fmt.Fprintf(h, "%s %s\n", n, m.Files[n].SHA256)
	}
	m.ContentHash = hex.EncodeToString(h.Sum(nil))
	m.Download = b.client.Downloaded
	m.Took = time.Since(t0).Round(100 * time.Millisecond).String()
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(manifestPath, append(data, '\n'), 0o644); err != nil {
		return nil, err
	}
	var sizes []string
	for _, f := range names {
		sizes = append(sizes, fmt.Sprintf("%s %s", f, mib(m.Files[f].Size)))
	}
	b.log.Info("payload: ready", "arch", b.arch, "dir", b.opts.Dir, "took", m.Took, "downloaded", mib(m.Download),
		"files", strings.Join(sizes, ", "), "content_hash", m.ContentHash[:16])
	return m, nil
}

// invalidate removes manifest.json before the first payload file is
// replaced.
func (b *builder) invalidate() error {
	if b.invalidated {
		return nil
	}
	b.invalidated = true
	err := os.Remove(filepath.Join(b.opts.Dir, "manifest.json"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// explain adds what a user can do to network and disk errors.
func (b *builder) explain(err error) error {
	if errors.Is(err, syscall.ENOSPC) {
		return fmt.Errorf("%w (disk full: a payload needs about 1.5 GiB in %s while it is built; free some space and start again: finished steps are kept)", err, b.opts.Dir)
	}
	var ue interface{ Timeout() bool }
	if errors.As(err, &ue) || strings.Contains(err.Error(), "dial tcp") || strings.Contains(err.Error(), "no such host") {
		return fmt.Errorf("%w (the Debian mirror %s is unreachable; set --mirror or %s to another one; a complete cached payload in %s would have been used without network)",
			err, b.opts.Mirror, debian.MirrorEnv, b.opts.Dir)
	}
	return err
}

// archive returns the verified index of suite for the target arch.
func (b *builder) archive(ctx context.Context, suite string) (*debian.Archive, error) {
	if a, ok := b.archives[suite]; ok {
		return a, nil
	}
	t := time.Now()
	a, err := b.client.Open(ctx, suite, b.arch, b.opts.Update)
	if err != nil {
		return nil, err
	}
	b.log.Info("payload: package index", "suite", suite, "arch", b.arch, "packages", len(a.Index.Packages),
		"date", a.Release.Date.Format("2006-01-02"), "took", time.Since(t).Round(10*time.Millisecond))
	b.archives[suite] = a
	return a, nil
}

// fetch downloads packages (names in suite) and returns their cache paths
// and SHA-256s.
func (b *builder) fetch(ctx context.Context, suite string, names []string) ([]*debian.Package, []string, []string, error) {
	a, err := b.archive(ctx, suite)
	if err != nil {
		return nil, nil, nil, err
	}
	var pkgs []*debian.Package
	for _, n := range names {
		p, ok := a.Index.Packages[n]
		if !ok {
			return nil, nil, nil, fmt.Errorf("%s has no package %s for %s", suite, n, b.arch)
		}
		pkgs = append(pkgs, p)
	}
	paths, sums, err := b.download(ctx, pkgs)
	return pkgs, paths, sums, err
}

func (b *builder) download(ctx context.Context, pkgs []*debian.Package) ([]string, []string, error) {
	var paths, sums []string
	for _, p := range pkgs {
		path, err := b.client.Download(ctx, p)
		if err != nil {
			return nil, nil, err
		}
		paths = append(paths, path)
		sums = append(sums, p.SHA256)
	}
	return paths, sums, nil
}
