//go:build linux

package guest

// The tar runtimes disk: the payload builder's "first stage" (Debian
// packages unpacked on the host, which may be a Mac without root) in a form
// the guest can read without any file system driver. Layout (the contract
// with the payload builder):
//
//	a POSIX tar stream ("ustar" at offset 257), zero-padded to 1 MiB
//	  actiond-runtimes.json   first member: runtimesManifest
//	  <name>.tar.zst          one member per runtime: zstd-compressed tar of
//	                          the unpacked tree with ownership, modes,
//	                          devices, symlinks and hard links in its
//	                          headers, dpkg's database in the unpacked state
//	                          and an executable /.actiond/second-stage
//
// The guest extracts each runtime onto the CAS disk, runs its second stage
// in a chroot and seals it (see prepareTarRuntimes).

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// runtimesManifestName is the tar runtimes disk's first member.
const runtimesManifestName = "actiond-runtimes.json"

// runtimesFormat is the manifest format this guest understands.
const runtimesFormat = 1

// maxManifestSize bounds the manifest read into memory.
const maxManifestSize = 4 << 20

// runtimesManifest is actiond-runtimes.json.
type runtimesManifest struct {
	Format   int            `json:"format"`
	Arch     string         `json:"arch"`
	Runtimes []runtimeEntry `json:"runtimes"`
}

// runtimeEntry describes one runtime member of the tar disk.
type runtimeEntry struct {
	Name   string `json:"name"`   // glibc2.36: the "libc" platform property
	Suite  string `json:"suite"`  // bookworm
	Glibc  string `json:"glibc"`  // 2.36
	Member string `json:"member"` // glibc2.36.tar.zst
	SHA256 string `json:"sha256"` // hex SHA-256 of the member's bytes
	Size   int64  `json:"size"`   // the member's size in bytes
	// Packages is informational (what the builder unpacked); its shape is
	// the builder's business.
	Packages json.RawMessage `json:"packages,omitempty"`
}

// readRuntimesManifest reads and checks the first member of a tar runtimes
// disk; tr is left positioned after it.
func readRuntimesManifest(tr *tar.Reader, arch string) (*runtimesManifest, error) {
	hdr, err := tr.Next()
	if err != nil {
		return nil, fmt.Errorf("read the first member: %w", err)
	}
	if path.Clean(hdr.Name) != runtimesManifestName {
		return nil, fmt.Errorf("the first member is %q, want %s", hdr.Name, runtimesManifestName)
	}
	if hdr.Size > maxManifestSize {
		return nil, fmt.Errorf("%s is %d bytes (limit %d)", runtimesManifestName, hdr.Size, maxManifestSize)
	}
	data, err := io.ReadAll(tr)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", runtimesManifestName, err)
	}
	var m runtimesManifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("parse %s: %w", runtimesManifestName, err)
	}
	if m.Format != runtimesFormat {
		return nil, fmt.Errorf("%s: format %d, this guest reads format %d (rebuild the payload with this actiond)", runtimesManifestName, m.Format, runtimesFormat)
	}
	if m.Arch != "" && arch != "" && m.Arch != arch {
		return nil, fmt.Errorf("%s: runtimes for %s, this guest is %s", runtimesManifestName, m.Arch, arch)
	}
	seen := map[string]bool{}
	for _, rt := range m.Runtimes {
		if err := checkRuntimeName(rt.Name); err != nil {
			return nil, fmt.Errorf("%s: %w", runtimesManifestName, err)
		}
		if seen[rt.Name] {
			return nil, fmt.Errorf("%s: runtime %q listed twice", runtimesManifestName, rt.Name)
		}
		seen[rt.Name] = true
		if rt.Member == "" || rt.Member == runtimesManifestName || strings.Contains(rt.Member, "/") {
			return nil, fmt.Errorf("%s: runtime %q: bad member name %q", runtimesManifestName, rt.Name, rt.Member)
		}
		if len(rt.SHA256) != 64 || strings.Trim(strings.ToLower(rt.SHA256), "0123456789abcdef") != "" {
			return nil, fmt.Errorf("%s: runtime %q: sha256 %q is not 64 hex digits", runtimesManifestName, rt.Name, rt.SHA256)
		}
	}
	return &m, nil
}

// checkRuntimeName refuses names that cannot be a directory under
// /runtimes or that clash with the host runtime.
func checkRuntimeName(name string) error {
	switch {
	case name == "":
		return errors.New("a runtime without a name")
	case name == "host":
		return errors.New(`runtime name "host" is reserved`)
	case strings.HasPrefix(name, "."), strings.ContainsAny(name, "/\x00 "), len(name) > 100:
		return fmt.Errorf("bad runtime name %q", name)
	}
	return nil
}

// extractStats says what extractTree wrote.
type extractStats struct {
	Entries int
	Bytes   int64 // regular file contents
	Took    time.Duration
}

// extractTree extracts the zstd-compressed tar r into the empty directory
// dir, applying ownership, modes (setuid included), device numbers,
// symlinks, hard links, extended attributes and modification times from
// the headers. Every path is resolved inside dir (openat2
// RESOLVE_IN_ROOT), so neither ".." nor a symlink in the archive can reach
// outside it.
func extractTree(r io.Reader, dir string) (extractStats, error) {
	t0 := time.Now()
	var st extractStats
	zr, err := zstd.NewReader(r, zstd.WithDecoderLowmem(false))
	if err != nil {
		return st, err
	}
	defer zr.Close()
	x, err := newExtractor(dir)
	if err != nil {
		return st, err
	}
	defer x.close()
	tr := tar.NewReader(zr)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return st, fmt.Errorf("after %d entries: %w", st.Entries, err)
		}
		n, err := x.entry(hdr, tr)
		if err != nil {
			return st, fmt.Errorf("%s: %w", hdr.Name, err)
		}
		st.Entries++
		st.Bytes += n
	}
	if err := x.finishDirs(); err != nil {
		return st, err
	}
	// Whatever follows the tar's end (zstd frame padding) is read so that
	// the caller's hash covers the whole member.
	if _, err := io.Copy(io.Discard, zr); err != nil {
		return st, fmt.Errorf("after the tar end: %w", err)
	}
	st.Took = time.Since(t0)
	return st, nil
}

// extractor writes tar entries below a root directory fd.
type extractor struct {
	root int
	// The parent directory of the last entry, kept open: entries come
	// grouped by directory.
	lastDir   string
	lastDirFd int
	dirs      []dirMeta
}

// dirMeta is applied to directories after their contents: a read-only
// directory would refuse its own entries, and writing an entry changes the
// directory's mtime.
type dirMeta struct {
	rel      string
	mode     uint32
	uid, gid int
	mtime    time.Time
}

func newExtractor(dir string) (*extractor, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	return &extractor{root: fd, lastDirFd: -1}, nil
}

func (x *extractor) close() {
	if x.lastDirFd >= 0 {
		unix.Close(x.lastDirFd)
	}
	unix.Close(x.root)
}

// cleanName turns an archive name into a path relative to the root:
// "./usr/bin/bash" → "usr/bin/bash", "./" → "".
func cleanName(name string) (string, error) {
	if strings.ContainsRune(name, 0) {
		return "", errors.New("NUL in name")
	}
	p := path.Clean("/" + name)
	if p == "/" {
		return "", nil
	}
	return p[1:], nil
}

// parent returns an fd for the directory holding rel (resolved inside the
// root) and rel's last component.
func (x *extractor) parent(rel string) (int, string, error) {
	dir, base := path.Split(rel)
	dir = strings.TrimSuffix(dir, "/")
	if dir == "" {
		return x.root, base, nil
	}
	if dir == x.lastDir && x.lastDirFd >= 0 {
		return x.lastDirFd, base, nil
	}
	fd, err := x.open(dir)
	if err != nil {
		return -1, "", err
	}
	if x.lastDirFd >= 0 {
		unix.Close(x.lastDirFd)
	}
	x.lastDir, x.lastDirFd = dir, fd
	return fd, base, nil
}

// open opens the directory rel inside the root as an O_PATH fd.
func (x *extractor) open(rel string) (int, error) {
	for {
		fd, err := unix.Openat2(x.root, rel, &unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
		})
		if err == unix.EAGAIN || err == unix.EINTR {
			continue
		}
		if err != nil {
			return -1, fmt.Errorf("open directory %s: %w", rel, err)
		}
		return fd, nil
	}
}

// entry writes one tar entry; it returns the bytes of file content written.
func (x *extractor) entry(hdr *tar.Header, r io.Reader) (int64, error) {
	rel, err := cleanName(hdr.Name)
	if err != nil {
		return 0, err
	}
	mode := uint32(hdr.Mode) & 0o7777
	switch hdr.Typeflag {
	case tar.TypeXGlobalHeader:
		return 0, nil
	case 0: // pre-POSIX regular file
		hdr.Typeflag = tar.TypeReg
	}
	if rel == "" { // the root itself
		if hdr.Typeflag == tar.TypeDir {
			x.dirs = append(x.dirs, dirMeta{rel: ".", mode: mode, uid: hdr.Uid, gid: hdr.Gid, mtime: hdr.ModTime})
		}
		return 0, nil
	}
	pfd, base, err := x.parent(rel)
	if err != nil {
		return 0, err
	}
	var written int64
	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := unix.Mkdirat(pfd, base, 0o700); err != nil && err != unix.EEXIST {
			return 0, fmt.Errorf("mkdir: %w", err)
		}
		x.dirs = append(x.dirs, dirMeta{rel: rel, mode: mode, uid: hdr.Uid, gid: hdr.Gid, mtime: hdr.ModTime})
		return 0, nil
	case tar.TypeReg, tar.TypeChar, tar.TypeBlock, tar.TypeFifo, tar.TypeSymlink, tar.TypeLink:
		// Replace whatever a previous entry left there (tar semantics:
		// the last entry for a name wins).
		if err := unix.Unlinkat(pfd, base, 0); err != nil && err != unix.ENOENT {
			return 0, fmt.Errorf("replace: %w", err)
		}
	default:
		return 0, fmt.Errorf("unsupported tar entry type %q", hdr.Typeflag)
	}
	switch hdr.Typeflag {
	case tar.TypeReg:
		fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return 0, fmt.Errorf("create: %w", err)
		}
		f := os.NewFile(uintptr(fd), rel)
		written, err = io.Copy(f, r)
		if err == nil {
			// chown before chmod: chown clears setuid and setgid.
			err = f.Chown(hdr.Uid, hdr.Gid)
		}
		if err == nil {
			err = unix.Fchmod(fd, mode)
		}
		if err == nil {
			err = setXattrs(fd, hdr)
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return written, err
		}
	case tar.TypeSymlink:
		if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
			return 0, fmt.Errorf("symlink: %w", err)
		}
		if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return 0, fmt.Errorf("chown: %w", err)
		}
	case tar.TypeLink:
		target, err := cleanName(hdr.Linkname)
		if err != nil || target == "" {
			return 0, fmt.Errorf("bad hard link target %q", hdr.Linkname)
		}
		tdir, tbase := path.Split(target)
		tfd := x.root
		if tdir = strings.TrimSuffix(tdir, "/"); tdir != "" {
			if tfd, err = x.open(tdir); err != nil {
				return 0, err
			}
			defer unix.Close(tfd)
		}
		if err := unix.Linkat(tfd, tbase, pfd, base, 0); err != nil {
			return 0, fmt.Errorf("hard link to %s: %w", target, err)
		}
		return 0, nil // the link shares its target's metadata
	default: // char, block, fifo
		kind := map[byte]uint32{tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK, tar.TypeFifo: unix.S_IFIFO}[hdr.Typeflag]
		dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
		if err := unix.Mknodat(pfd, base, kind|0o600, int(dev)); err != nil {
			return 0, fmt.Errorf("mknod: %w", err)
		}
		if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return 0, fmt.Errorf("chown: %w", err)
		}
		if err := unix.Fchmodat(pfd, base, mode, 0); err != nil {
			return 0, fmt.Errorf("chmod: %w", err)
		}
	}
	ts := []unix.Timespec{unix.NsecToTimespec(hdr.ModTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
	if err := unix.UtimesNanoAt(pfd, base, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return written, fmt.Errorf("set mtime: %w", err)
	}
	return written, nil
}

// setXattrs applies the extended attributes a tar records as
// SCHILY.xattr.* PAX records (file capabilities, e.g. ping's).
func setXattrs(fd int, hdr *tar.Header) error {
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok {
			continue
		}
		if err := unix.Fsetxattr(fd, name, []byte(v), 0); err != nil {
			return fmt.Errorf("set xattr %s: %w", name, err)
		}
	}
	return nil
}

// finishDirs applies the directories' metadata, deepest first.
func (x *extractor) finishDirs() error {
	for i := len(x.dirs) - 1; i >= 0; i-- {
		d := x.dirs[i]
		var fd int
		if d.rel != "." {
			var err error
			// O_PATH fds do not take fchown/fchmod; open the directory
			// itself read-only (it is ours, still 0700 or already final).
			if fd, err = unix.Openat2(x.root, d.rel, &unix.OpenHow{
				Flags:   unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC,
				Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
			}); err != nil {
				return fmt.Errorf("%s: open: %w", d.rel, err)
			}
		} else {
			var err error
			if fd, err = unix.Openat(x.root, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
				return fmt.Errorf("open the root: %w", err)
			}
		}
		err := unix.Fchown(fd, d.uid, d.gid)
		if err == nil {
			err = unix.Fchmod(fd, d.mode)
		}
		if err == nil {
			tv := []unix.Timeval{unix.NsecToTimeval(d.mtime.UnixNano()), unix.NsecToTimeval(d.mtime.UnixNano())}
			err = unix.Futimes(fd, tv)
		}
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("%s: %w", d.rel, err)
		}
	}
	return nil
}

// treeBytes estimates the space a runtime takes on the CAS disk once
// extracted, before it is: a zstd-compressed Debian tree expands about
// 2.5–3.5 times (measured on the payload builder's runtimes), so four times
// the member errs on the safe side when the CAS's share of the disk is set.
func (e runtimeEntry) treeBytes() int64 { return 4 * e.Size }
