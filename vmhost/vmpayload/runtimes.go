package vmpayload

import (
	"archive/tar"
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/actiond/actiond/vmhost/vmpayload/debian"
)

// The runtimes disk (runtimes.tar) is what the guest turns into its
// sealed runtimes; its layout is the contract with package guest:
//
//   - a plain POSIX tar (ustar magic at offset 257), padded with zeros to a
//     multiple of 1 MiB (a disk image's size);
//   - first member actiond-runtimes.json (RuntimesIndex);
//   - then per runtime <name>.tar.zst: a zstd-compressed tar of the tree
//     (names ./usr/bin/bash ...) as debootstrap's first stage leaves it:
//     every package unpacked with the owners, modes, device nodes, symlinks
//     and hard links of the packages (tar headers record them, so the
//     host needs no root), dpkg's database in the state `dpkg --unpack`
//     leaves, and /.actiond/second-stage, the POSIX sh script the guest
//     runs in a chroot of the tree to configure it.

// RuntimesFormat is the format field of actiond-runtimes.json.
const RuntimesFormat = 1

// RuntimesIndexName is the first member of runtimes.tar.
const RuntimesIndexName = "actiond-runtimes.json"

// runtimesRecipe changes whenever the trees' content rules change.
const runtimesRecipe = "runtime v3"

// RuntimeSpec is one runtime: a Debian suite's glibc.
type RuntimeSpec struct {
	Name, Suite, Glibc string
}

// DefaultRuntimes are the runtimes a payload carries, named like the
// "libc" platform property that selects them.
var DefaultRuntimes = []RuntimeSpec{
	{Name: "glibc2.31", Suite: "bullseye", Glibc: "2.31"},
	{Name: "glibc2.36", Suite: "bookworm", Glibc: "2.36"},
	{Name: "glibc2.41", Suite: "trixie", Glibc: "2.41"},
}

// RuntimeRoots are the packages a runtime has besides Priority: required:
// what a build needs ("a|b": the first available, unless one is chosen).
var RuntimeRoots = []string{
	"coreutils", "bash", "sed", "grep", "gawk|mawk", "findutils", "diffutils",
	"tar", "gzip", "xz-utils", "zstd", "ca-certificates", "libc-bin",
}

// RuntimesIndex is actiond-runtimes.json.
type RuntimesIndex struct {
	Format   int            `json:"format"`
	Arch     string         `json:"arch"`
	Runtimes []RuntimeEntry `json:"runtimes"`
}

// RuntimeEntry describes one member of runtimes.tar.
type RuntimeEntry struct {
	Name     string   `json:"name"`
	Suite    string   `json:"suite"`
	Glibc    string   `json:"glibc"`
	Member   string   `json:"member"`
	SHA256   string   `json:"sha256"`
	Size     int64    `json:"size"`
	Packages []string `json:"packages"`
}

type runtimesInfo struct {
	File  string
	Names []string
}

// runtimesDisk builds each runtime's tree and then runtimes.tar.
func (b *builder) runtimesDisk(ctx context.Context) (*runtimesInfo, error) {
	specs := DefaultRuntimes
	if len(b.opts.Runtimes) > 0 {
		specs = nil
		for _, n := range b.opts.Runtimes {
			found := false
			for _, s := range DefaultRuntimes {
				if s.Name == n {
					specs, found = append(specs, s), true
				}
			}
			if !found {
				return nil, fmt.Errorf("unknown runtime %q (have glibc2.31, glibc2.36, glibc2.41)", n)
			}
		}
	}
	idx := RuntimesIndex{Format: RuntimesFormat, Arch: b.arch}
	info := &runtimesInfo{File: "runtimes.tar"}
	var members []string
	for _, spec := range specs {
		var e *RuntimeEntry
		err := b.step("runtime "+spec.Name+" ("+spec.Suite+")", func() (err error) {
			e, err = b.runtime(ctx, spec)
			return err
		})
		if err != nil {
			return nil, err
		}
		idx.Runtimes = append(idx.Runtimes, *e)
		members = append(members, b.work(filepath.Join("runtimes", e.Member)))
		info.Names = append(info.Names, spec.Name)
		b.pkgs[spec.Name] = e.Packages
	}
	js, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return nil, err
	}
	js = append(js, '\n')
	out := filepath.Join(b.opts.Dir, info.File)
	if stampMatches(out, string(js)) {
		b.log.Info("payload: runtimes disk up to date", "file", info.File, "runtimes", strings.Join(info.Names, " "))
		return info, nil
	}
	t := time.Now()
	if err := b.invalidate(); err != nil {
		return nil, err
	}
	if err := writeRuntimesTar(out, js, idx, members); err != nil {
		return nil, err
	}
	st, _ := os.Stat(out)
	b.log.Info("payload: wrote the runtimes disk", "file", out, "size", mib(st.Size()), "runtimes", strings.Join(info.Names, " "), "took", time.Since(t).Round(10*time.Millisecond))
	return info, writeStamp(out, string(js))
}

// writeRuntimesTar writes runtimes.tar through a temporary file.
func writeRuntimesTar(out string, js []byte, idx RuntimesIndex, members []string) error {
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", out, err)
	}
	tw := tar.NewWriter(f)
	hdr := func(name string, size int64) *tar.Header {
		return &tar.Header{Typeflag: tar.TypeReg, Name: name, Size: size, Mode: 0o444, Uname: "root", Gname: "root",
			ModTime: time.Unix(0, 0), Format: tar.FormatUSTAR}
	}
	if err := tw.WriteHeader(hdr(RuntimesIndexName, int64(len(js)))); err != nil {
		return fail(err)
	}
	if _, err := tw.Write(js); err != nil {
		return fail(err)
	}
	for i, m := range members {
		e := idx.Runtimes[i]
		mf, err := os.Open(m)
		if err != nil {
			return fail(err)
		}
		if err := tw.WriteHeader(hdr(e.Member, e.Size)); err != nil {
			mf.Close()
			return fail(err)
		}
		n, err := io.Copy(tw, mf)
		mf.Close()
		if err != nil {
			return fail(err)
		}
		if n != e.Size {
			return fail(fmt.Errorf("%s changed while writing (%d bytes, want %d)", m, n, e.Size))
		}
	}
	if err := tw.Close(); err != nil {
		return fail(err)
	}
	// Pad to a whole MiB: the file is attached as a disk.
	end, err := f.Seek(0, io.SeekCurrent)
	if err != nil {
		return fail(err)
	}
	if r := end % (1 << 20); r != 0 {
		if _, err := f.Write(make([]byte, (1<<20)-r)); err != nil {
			return fail(err)
		}
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, out)
}

// runtime resolves, downloads and packs one runtime into
// work/runtimes/<name>.tar.zst (kept while its stamp matches).
func (b *builder) runtime(ctx context.Context, spec RuntimeSpec) (*RuntimeEntry, error) {
	a, err := b.archive(ctx, spec.Suite)
	if err != nil {
		return nil, err
	}
	roots := b.roots
	if roots == nil {
		roots = RuntimeRoots
	}
	res, err := debian.Resolve(a.Index, append(runtimeSeeds(a.Index), roots...))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", spec.Suite, err)
	}
	for _, n := range res.Notes {
		b.log.Debug("payload: resolver", "suite", spec.Suite, "note", n)
	}
	libc, ok := a.Index.Packages["libc6"]
	if !ok || !strings.HasPrefix(libc.Version, spec.Glibc+"-") {
		v := "none"
		if ok {
			v = libc.Version
		}
		return nil, fmt.Errorf("%s: libc6 is %s, but runtime %s wants glibc %s", spec.Suite, v, spec.Name, spec.Glibc)
	}
	var total int64
	for _, p := range res.Packages {
		total += p.Size
	}
	b.log.Info("payload: runtime packages", "runtime", spec.Name, "suite", spec.Suite, "packages", len(res.Packages), "size", mib(total))
	paths, sums, err := b.download(ctx, res.Packages)
	if err != nil {
		return nil, err
	}
	e := &RuntimeEntry{Name: spec.Name, Suite: spec.Suite, Glibc: spec.Glibc, Member: spec.Name + ".tar.zst"}
	for _, p := range res.Packages {
		e.Packages = append(e.Packages, p.ID())
	}
	out := b.work(filepath.Join("runtimes", e.Member))
	recipe := fmt.Sprintf("%s arch=%s suite=%s mirror=%s\n%s\n", runtimesRecipe, b.arch, spec.Suite, b.opts.Mirror, strings.Join(sums, "\n"))
	if !stampMatches(out, recipe) {
		t := time.Now()
		if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
			return nil, err
		}
		tw := &treeWriter{arch: b.arch, suite: spec.Suite, mirror: b.opts.Mirror}
		if err := tw.write(out, res.Packages, paths); err != nil {
			return nil, fmt.Errorf("runtime %s: %w", spec.Name, err)
		}
		st, _ := os.Stat(out)
		b.log.Info("payload: packed runtime", "runtime", spec.Name, "size", mib(st.Size()), "took", time.Since(t).Round(10*time.Millisecond))
		if err := writeStamp(out, recipe); err != nil {
			return nil, err
		}
	}
	sum, err := fileSHA256(out)
	if err != nil {
		return nil, err
	}
	st, err := os.Stat(out)
	if err != nil {
		return nil, err
	}
	e.SHA256, e.Size = sum, st.Size()
	return e, nil
}

// runtimeSeeds are choices made before the roots: usr-is-merged (where it
// exists) says the tree has merged /usr, which it has (treeWriter makes
// /bin, /sbin, /lib symlinks into /usr as debootstrap does); without it
// init-system-helpers' "usrmerge | usr-is-merged" would take usrmerge and
// with it perl.
func runtimeSeeds(idx *debian.Index) []string {
	if _, ok := idx.Packages["usr-is-merged"]; ok {
		return []string{"usr-is-merged"}
	}
	return nil
}

// treeWriter writes one runtime tree as a zstd-compressed tar.
type treeWriter struct {
	arch, suite, mirror string
	tw                  *tar.Writer
	dirs                map[string]bool // emitted directories
	files               map[string]bool // emitted non-directories
	merged              map[string]string
}

// mergedDirs are the top-level directories that are symlinks into /usr on
// a merged-/usr system (what debootstrap makes for these suites).
func mergedDirs(arch string) map[string]string {
	m := map[string]string{"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib"}
	if arch == "amd64" {
		m["lib64"] = "usr/lib64"
	}
	return m
}

// canon maps a package path ("./bin/bash") to where it is in the merged
// tree ("usr/bin/bash"); skip is set for the merged directories
// themselves and the root.
func (w *treeWriter) canon(name string) (p string, skip bool) {
	p = path.Clean(strings.TrimPrefix(strings.TrimPrefix(name, "./"), "/"))
	if p == "." || p == "" {
		return "", true
	}
	first, rest, _ := strings.Cut(p, "/")
	if target, ok := w.merged[first]; ok {
		if rest == "" {
			return "", true
		}
		p = target + "/" + rest
	}
	return p, false
}

var epoch = time.Unix(0, 0)

func (w *treeWriter) dir(p string, mode int64) error {
	if p == "" || p == "." || w.dirs[p] {
		return nil
	}
	if parent := path.Dir(p); parent != "." {
		if err := w.dir(parent, 0o755); err != nil {
			return err
		}
	}
	w.dirs[p] = true
	return w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "./" + p + "/", Mode: mode, Uname: "root", Gname: "root", ModTime: epoch})
}

func (w *treeWriter) file(p string, mode int64, data []byte) error {
	if err := w.dir(path.Dir(p), 0o755); err != nil {
		return err
	}
	w.files[p] = true
	if err := w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "./" + p, Mode: mode, Size: int64(len(data)), Uname: "root", Gname: "root", ModTime: epoch}); err != nil {
		return err
	}
	_, err := w.tw.Write(data)
	return err
}

// write packs pkgs (whose .debs are at paths) into out.
func (w *treeWriter) write(out string, pkgs []*debian.Package, paths []string) error {
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	bw := bufio.NewWriterSize(f, 1<<20)
	zw, err := zstd.NewWriter(bw, zstd.WithEncoderLevel(zstd.SpeedDefault))
	if err != nil {
		f.Close()
		return err
	}
	w.tw = tar.NewWriter(zw)
	w.dirs, w.files, w.merged = map[string]bool{}, map[string]bool{}, mergedDirs(w.arch)
	if err := w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "./", Mode: 0o755, Uname: "root", Gname: "root", ModTime: epoch}); err != nil {
		return err
	}
	// Merged /usr first, so that no package makes /bin a directory.
	for _, alias := range slices.Sorted(maps.Keys(w.merged)) {
		target := w.merged[alias]
		if err := w.dir(target, 0o755); err != nil {
			return err
		}
		if err := w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "./" + alias, Linkname: target, Mode: 0o777, Uname: "root", Gname: "root", ModTime: epoch}); err != nil {
			return err
		}
		w.files[alias] = true
	}
	var status strings.Builder
	var order []dpkgName
	for i := range pkgs {
		st, name, err := w.unpack(paths[i])
		if err != nil {
			return err
		}
		status.WriteString(st)
		status.WriteString("\n")
		order = append(order, name)
	}
	if err := w.dpkgFiles(status.String()); err != nil {
		return err
	}
	if err := w.dir(".actiond", 0o755); err != nil {
		return err
	}
	if err := w.file(".actiond/second-stage", 0o755, []byte(secondStage(order, w.arch))); err != nil {
		return err
	}
	if err := w.tw.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}

// dpkgName is a package as dpkg names its files in /var/lib/dpkg/info.
type dpkgName struct {
	Pkg, Info, Arch string
	Preinst         bool
}

// unpack writes one package's files and its dpkg info files, and returns
// its status paragraph.
func (w *treeWriter) unpack(debPath string) (string, dpkgName, error) {
	d, err := debian.OpenDeb(debPath)
	if err != nil {
		return "", dpkgName{}, err
	}
	defer d.Close()
	name := d.Control.Get("Package")
	arch := d.Control.Get("Architecture")
	info := name
	if d.Control.Get("Multi-Arch") == "same" {
		info = name + ":" + arch
	}
	conff := map[string]bool{}
	for _, c := range d.Conffiles() {
		conff[path.Clean(c)] = true
	}
	list := []string{"/."}
	err = d.Data(func(h *tar.Header, r io.Reader) error {
		orig := path.Clean("/" + strings.TrimPrefix(h.Name, "./"))
		if orig != "/" {
			list = append(list, orig)
		}
		p, skip := w.canon(h.Name)
		if skip {
			return nil
		}
		nh := &tar.Header{
			Typeflag: h.Typeflag, Name: "./" + p, Linkname: h.Linkname, Size: h.Size, Mode: h.Mode,
			Uid: h.Uid, Gid: h.Gid, Uname: h.Uname, Gname: h.Gname, ModTime: h.ModTime,
			Devmajor: h.Devmajor, Devminor: h.Devminor,
		}
		for k, v := range h.PAXRecords {
			if strings.HasPrefix(k, "SCHILY.xattr.") {
				if nh.PAXRecords == nil {
					nh.PAXRecords = map[string]string{}
				}
				nh.PAXRecords[k] = v
			}
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if w.files[p] {
				return nil // a merged-/usr symlink or a file already there
			}
			if w.dirs[p] {
				return nil
			}
			if err := w.dir(path.Dir(p), 0o755); err != nil {
				return err
			}
			w.dirs[p] = true
			nh.Name += "/"
			return w.tw.WriteHeader(nh)
		case tar.TypeLink:
			lp, skip := w.canon(h.Linkname)
			if skip {
				return fmt.Errorf("%s: hard link %s to %q", debPath, h.Name, h.Linkname)
			}
			if conff[path.Clean("/"+strings.TrimPrefix(h.Linkname, "./"))] {
				lp += ".dpkg-new"
			}
			nh.Linkname = "./" + lp
		case tar.TypeReg, tar.TypeSymlink, tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		default:
			return fmt.Errorf("%s: %s: unsupported tar entry type %q", debPath, h.Name, h.Typeflag)
		}
		if w.dirs[p] {
			return fmt.Errorf("%s: %s is a directory in another package", debPath, orig)
		}
		// dpkg --unpack leaves a new conffile next to its final name; dpkg
		// --configure moves it into place.
		if conff[orig] && h.Typeflag != tar.TypeDir {
			nh.Name += ".dpkg-new"
		}
		if err := w.dir(path.Dir(p), 0o755); err != nil {
			return err
		}
		w.files[p] = true
		if err := w.tw.WriteHeader(nh); err != nil {
			return err
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := io.Copy(w.tw, r); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return "", dpkgName{}, err
	}
	// /var/lib/dpkg/info/<pkg>.*: the file list, then every control member
	// but control itself, as dpkg --unpack installs them.
	infoDir := "var/lib/dpkg/info/"
	if err := w.file(infoDir+info+".list", 0o644, []byte(strings.Join(list, "\n")+"\n")); err != nil {
		return "", dpkgName{}, err
	}
	for _, cf := range slices.Sorted(maps.Keys(d.ControlFiles)) {
		c := d.ControlFiles[cf]
		mode := int64(0o644)
		if c.Mode&0o111 != 0 {
			mode = 0o755
		}
		if err := w.file(infoDir+info+"."+cf, mode, c.Data); err != nil {
			return "", dpkgName{}, err
		}
	}
	// The status paragraph: the control file with the state and the
	// conffiles, which dpkg hashes when it configures them.
	var para debian.Paragraph
	for _, f := range d.Control {
		para = append(para, f)
		if strings.EqualFold(f.Name, "Package") {
			para = append(para, debian.Field{Name: "Status", Value: "install ok unpacked"})
		}
	}
	if cfs := d.Conffiles(); len(cfs) > 0 {
		var v strings.Builder
		for _, c := range cfs {
			v.WriteString("\n " + c + " newconffile")
		}
		para = append(para, debian.Field{Name: "Conffiles", Value: v.String()})
	}
	_, hasPreinst := d.ControlFiles["preinst"]
	return para.String(), dpkgName{Pkg: name, Info: info, Arch: arch, Preinst: hasPreinst}, nil
}

// dpkgFiles writes dpkg's database files and apt's sources.list.
func (w *treeWriter) dpkgFiles(status string) error {
	for _, f := range []struct {
		path string
		data string
	}{
		{"var/lib/dpkg/status", status},
		{"var/lib/dpkg/available", ""},
		{"var/lib/dpkg/arch", w.arch + "\n"},
		{"var/lib/dpkg/diversions", ""},
		{"var/lib/dpkg/statoverride", ""},
		{"var/lib/dpkg/info/format", "1\n"},
		{"etc/apt/sources.list", fmt.Sprintf("deb %s %s main\n", strings.TrimRight(w.mirror, "/"), w.suite)},
	} {
		if w.files[f.path] {
			continue
		}
		if err := w.file(f.path, 0o644, []byte(f.data)); err != nil {
			return err
		}
	}
	for _, d := range []string{"var/lib/dpkg/updates", "var/lib/dpkg/triggers", "var/lib/dpkg/alternatives", "var/lib/dpkg/parts", "etc/apt/apt.conf.d"} {
		if err := w.dir(d, 0o755); err != nil {
			return err
		}
	}
	return nil
}

// secondStage is /.actiond/second-stage: what debootstrap --second-stage
// does for a tree whose packages are unpacked but not configured. The
// guest runs it as `chroot <tree> /bin/sh /.actiond/second-stage` with
// /proc, /sys and /dev mounted. Preinst scripts (never run: the host only
// unpacked) go first, base-passwd's before all (it makes /etc/passwd and
// /etc/group that later scripts need), the others in dependency order;
// then dpkg configures everything in its own order.
func secondStage(order []dpkgName, arch string) string {
	sorted := append([]dpkgName(nil), order...)
	sort.SliceStable(sorted, func(i, j int) bool { return sorted[i].Pkg == "base-passwd" && sorted[j].Pkg != "base-passwd" })
	var pre strings.Builder
	for _, p := range sorted {
		if p.Preinst {
			fmt.Fprintf(&pre, "preinst %s %s %s\n", p.Pkg, p.Info, p.Arch)
		}
	}
	return `#!/bin/sh
# Written by actiond's payload builder (vmhost/vmpayload): configures a
# Debian tree that the host unpacked without running anything, like
# debootstrap --second-stage. Runs inside the tree (chroot) as root.
set -e
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true DEBCONF_NOWARNINGS=yes
cd /
fail() { echo "second-stage: $*" >&2; exit 1; }
[ -x /usr/bin/dpkg ] || fail "no /usr/bin/dpkg in the tree"
# No daemons start in a runtime.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
preinst() {
	script=/var/lib/dpkg/info/$2.preinst
	[ -f "$script" ] || return 0
	DPKG_MAINTSCRIPT_PACKAGE=$1 DPKG_MAINTSCRIPT_ARCH=$3 DPKG_MAINTSCRIPT_NAME=preinst DPKG_ROOT= \
		DPKG_RUNNING_VERSION=$(dpkg-query --version 2>/dev/null | sed -n '1s/.* version \([^ ]*\).*/\1/p') \
		"$script" install || fail "preinst install of $1 failed"
}
` + pre.String() + `dpkg --force-confdef --force-confold --configure -a || fail "dpkg --configure -a failed"
ldconfig || fail "ldconfig failed"
rm -f /usr/sbin/policy-rc.d
left=$(dpkg-query -W -f='${db:Status-Abbrev} ${binary:Package}\n' | grep -v '^ii ' || true)
[ -z "$left" ] || fail "packages not configured: $left"
echo "second-stage: ` + arch + ` tree configured"
`
}
