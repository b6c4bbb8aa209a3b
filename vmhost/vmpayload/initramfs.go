package vmpayload

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// Initramfs compressions (both are in Debian's 6.1 kernels: RD_GZIP,
// RD_ZSTD).
const (
	compGzip = "gzip"
	compZstd = "zstd"
)

var compExt = map[string]string{compGzip: "gz", compZstd: "zst"}

// initramfsInfo is the initramfs step's result.
type initramfsInfo struct {
	File        string
	Compression string
	RawSize     int64
	Modules     []string
	E2fsprogs   string
	BinarySize  int64
}

// buildActiond cross-compiles cmd/actiond: static (CGO_ENABLED=0),
// stripped, for the target architecture.
func (b *builder) buildActiond(ctx context.Context) (string, error) {
	goBin := b.opts.GoBin
	if goBin == "" {
		var err error
		if goBin, err = exec.LookPath("go"); err != nil {
			return "", fmt.Errorf("the go command is needed to build the guest binary (install Go from https://go.dev/dl): %w", err)
		}
	}
	if b.opts.Src == "" {
		return "", errors.New("no actiond source to build the guest binary from: run from a clone of actiond (go run ./cmd/actiond ...) or pass its path")
	}
	out := b.work("actiond")
	t := time.Now()
	cmd := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", out+".tmp", "./cmd/actiond")
	cmd.Dir = b.opts.Src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+b.arch)
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/actiond (GOOS=linux GOARCH=%s) in %s: %w\n%s", b.arch, b.opts.Src, err, msg)
	}
	if err := os.Rename(out+".tmp", out); err != nil {
		return "", err
	}
	b.log.Info("payload: built the guest actiond", "target", "linux/"+b.arch, "took", time.Since(t).Round(100*time.Millisecond))
	return out, nil
}

// initramfs assembles the guest's initramfs: /init (actiond), /dev/console
// and /dev/null (the kernel opens the console for init before any devtmpfs
// exists; the Go runtime needs /dev/null when there is none), the mount
// points, the kernel modules with modules.dep and the load list, and
// mke2fs/e2fsck with their libraries. It is rewritten only when its
// content changes.
func (b *builder) initramfs(ctx context.Context, ki *kernelInfo) (*initramfsInfo, error) {
	bin, err := b.buildActiond(ctx)
	if err != nil {
		return nil, err
	}
	wanted := append(append([]string{}, guestModules["common"]...), guestModules[b.arch]...)
	ms, err := selectModules(ki.ModDir, ki.Release, wanted)
	if err != nil {
		return nil, err
	}
	if len(ms.Missing) > 0 {
		b.log.Warn("payload: modules neither in the kernel package nor built in", "modules", strings.Join(ms.Missing, " "))
	}
	e2, e2ver, err := b.e2fs(ctx)
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(bin)
	if err != nil {
		return nil, err
	}
	entries := []entry{
		{Path: "/init", Mode: 0o755, Source: bin},
		{Path: "/dev", Dir: true, Mode: 0o755},
		{Path: "/dev/console", Char: true, Major: 5, Minor: 1, Mode: 0o600},
		{Path: "/dev/null", Char: true, Major: 1, Minor: 3, Mode: 0o666},
		{Path: "/etc/actiond-payload", Mode: 0o644, Data: []byte(fmt.Sprintf("arch=%s\nkernel=%s %s\nrelease=%s\ne2fsprogs=%s\n", b.arch, ki.Package, ki.Version, ki.Release, e2ver))},
	}
	for _, d := range []string{"/proc", "/sys", "/run", "/tmp", "/cas", "/runtimes", "/root"} {
		mode := uint32(0o755)
		if d == "/tmp" {
			mode = 0o1777
		}
		entries = append(entries, entry{Path: d, Dir: true, Mode: mode})
	}
	modRoot := "/lib/modules/" + ki.Release
	var names []string
	for _, mi := range ms.Mods {
		entries = append(entries, entry{Path: modRoot + "/" + mi.Path, Mode: 0o644, Source: filepath.Join(ms.Dir, mi.Path)})
		names = append(names, mi.Name)
	}
	entries = append(entries,
		entry{Path: modRoot + "/modules.dep", Mode: 0o644, Data: []byte(ms.modulesDep())},
		entry{Path: modRoot + "/modules.actiond", Mode: 0o644, Data: []byte(ms.loadList())},
	)
	entries = append(entries, e2...)

	var raw bytes.Buffer
	if err := writeCpio(&raw, entries); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(raw.Bytes())
	comp := b.opts.Compression
	info := &initramfsInfo{
		File:        "initramfs.cpio." + compExt[comp],
		Compression: comp,
		RawSize:     int64(raw.Len()),
		Modules:     names,
		E2fsprogs:   e2ver,
		BinarySize:  fi.Size(),
	}
	out := filepath.Join(b.opts.Dir, info.File)
	recipe := fmt.Sprintf("initramfs cpio-sha256=%s compression=%s\n", hex.EncodeToString(sum[:]), comp)
	if stampMatches(out, recipe) {
		b.log.Info("payload: initramfs up to date", "file", info.File, "modules", len(names), "actiond", mib(fi.Size()))
		return info, nil
	}
	t := time.Now()
	var z bytes.Buffer
	if err := compress(&z, raw.Bytes(), comp); err != nil {
		return nil, err
	}
	if err := b.invalidate(); err != nil {
		return nil, err
	}
	if err := writeFileAtomic(out, z.Bytes(), 0o644); err != nil {
		return nil, err
	}
	// Only one compression at a time in the directory.
	for c, ext := range compExt {
		if c != comp {
			os.Remove(filepath.Join(b.opts.Dir, "initramfs.cpio."+ext))
			os.Remove(filepath.Join(b.opts.Dir, "initramfs.cpio."+ext+".stamp"))
		}
	}
	b.log.Info("payload: wrote the initramfs", "file", out, "size", mib(int64(z.Len())), "uncompressed", mib(int64(raw.Len())),
		"modules", len(names), "actiond", mib(fi.Size()), "e2fsprogs", e2ver, "took", time.Since(t).Round(10*time.Millisecond))
	return info, writeStamp(out, recipe)
}

// compress writes data compressed with comp.
func compress(w io.Writer, data []byte, comp string) error {
	switch comp {
	case compGzip:
		zw, err := gzip.NewWriterLevel(w, gzip.BestCompression)
		if err != nil {
			return err
		}
		if _, err := zw.Write(data); err != nil {
			return err
		}
		return zw.Close()
	case compZstd:
		// The kernel's unzstd allocates the frame's window; 8 MiB keeps
		// that small while compressing nearly as well as larger ones.
		zw, err := zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithWindowSize(8<<20))
		if err != nil {
			return err
		}
		if _, err := zw.Write(data); err != nil {
			return err
		}
		return zw.Close()
	}
	return fmt.Errorf("unknown compression %q (want gzip or zstd)", comp)
}
