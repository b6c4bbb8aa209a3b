package vmhost

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// PayloadDirEnv overrides the payload directory's parent (one directory
// per guest arch below it); `make test` points it at the shared cache
// /var/cache/actiond/vm.
const PayloadDirEnv = "ACTIOND_VM_PAYLOAD_DIR"

// PayloadDirHelp describes DefaultPayloadDir for flag help.
const PayloadDirHelp = "$" + PayloadDirEnv + "/<arch>, else <user cache dir>/actiond/vm/<arch>: ~/Library/Caches on macOS, ~/.cache on Linux"

// DefaultPayloadDir returns the payload directory for a guest arch:
// $ACTIOND_VM_PAYLOAD_DIR/<arch> when that is set, else the user's cache
// directory: ~/Library/Caches/actiond/vm/<arch> on macOS,
// $XDG_CACHE_HOME/actiond/vm/<arch> (else ~/.cache/actiond/vm/<arch>) on
// Linux. Without a home directory it falls back to the system temp dir.
func DefaultPayloadDir(arch string) string {
	if d := os.Getenv(PayloadDirEnv); d != "" {
		return filepath.Join(d, arch)
	}
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	return filepath.Join(base, "actiond", "vm", arch)
}

// Payload names the files the guest boots from.
type Payload struct {
	Kernel, Initrd, Runtimes string
}

// Candidate file names in a payload directory, preferred first.
var (
	kernelNames   = map[string][]string{"amd64": {"vmlinux"}, "arm64": {"Image"}}
	initrdNames   = []string{"initramfs.cpio.gz", "initramfs.cpio.zst", "initramfs.cpio", "initramfs.img", "initrd.img", "initrd"}
	runtimesNames = []string{"runtimes.tar", "runtimes.squashfs", "runtimes.img"}
)

// FindPayload locates the kernel, initramfs and runtimes image in dir for
// a guest arch: the files its manifest.json (written by package
// vmhost/vmpayload) names, else the usual names. A missing runtimes image is not an error
// (Runtimes is "").
func FindPayload(dir, arch string) (Payload, error) {
	var p Payload
	names, ok := kernelNames[arch]
	if !ok {
		return p, fmt.Errorf("guest arch %q: want amd64 or arm64", arch)
	}
	initrdNames, runtimesNames := initrdNames, runtimesNames
	if b, err := os.ReadFile(filepath.Join(dir, "manifest.json")); err == nil {
		var m struct {
			Arch      string `json:"arch"`
			Kernel    string `json:"kernel"`
			Initramfs string `json:"initramfs"`
			Runtimes  string `json:"runtimes"`
		}
		if err := json.Unmarshal(b, &m); err != nil {
			return p, fmt.Errorf("guest payload manifest %s: %w", filepath.Join(dir, "manifest.json"), err)
		}
		if m.Arch != "" && m.Arch != arch {
			return p, fmt.Errorf("guest payload in %s is for %s, not %s", dir, m.Arch, arch)
		}
		if m.Kernel != "" {
			names = []string{m.Kernel}
		}
		if m.Initramfs != "" {
			initrdNames = []string{m.Initramfs}
		}
		if m.Runtimes != "" {
			runtimesNames = []string{m.Runtimes}
		}
	}
	first := func(names []string) string {
		for _, n := range names {
			if st, err := os.Stat(filepath.Join(dir, n)); err == nil && st.Mode().IsRegular() {
				return filepath.Join(dir, n)
			}
		}
		return ""
	}
	p.Kernel, p.Initrd, p.Runtimes = first(names), first(initrdNames), first(runtimesNames)
	var missing []string
	if p.Kernel == "" {
		missing = append(missing, "kernel ("+strings.Join(names, " or ")+")")
	}
	if p.Initrd == "" {
		missing = append(missing, "initramfs ("+strings.Join(initrdNames, ", ")+")")
	}
	if len(missing) > 0 {
		return p, fmt.Errorf("guest payload in %s: missing %s; build it with `actiond vm payload` (or pass --kernel/--initrd)", dir, strings.Join(missing, " and "))
	}
	return p, nil
}

// EnsureDiskImage creates path as a sparse file of size bytes when it does
// not exist (the guest formats a blank disk on first boot) and reports
// whether it did. An existing image is left as it is; its size is
// returned so the caller can mention a mismatch.
func EnsureDiskImage(path string, size int64) (created bool, actual int64, err error) {
	if st, err := os.Stat(path); err == nil {
		if !st.Mode().IsRegular() && st.Mode()&fs.ModeDevice == 0 {
			return false, 0, fmt.Errorf("disk image %s: not a regular file", path)
		}
		return false, st.Size(), nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return false, 0, fmt.Errorf("disk image: %w", err)
	}
	if size <= 0 {
		return false, 0, fmt.Errorf("disk image %s: size %d must be positive", path, size)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, 0, fmt.Errorf("disk image: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return false, 0, fmt.Errorf("create disk image: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		return false, 0, fmt.Errorf("size disk image %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return false, 0, fmt.Errorf("create disk image: %w", err)
	}
	return true, size, nil
}
