//go:build linux

package guest

// Test inputs in the tar runtimes disk format (the contract with the Go
// payload builder; see runtar.go), made from a directory tree or from
// hand-written entries, until that builder writes them.

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/actiond/actiond/internal/testutil"
)

// testRuntime is one runtime of a test runtimes disk.
type testRuntime struct {
	Name string
	// Tree is a directory whose contents become the runtime; Entries are
	// written after it (or alone).
	Tree    string
	Entries []testEntry
	// Script is /.actiond/second-stage.
	Script string
}

// testEntry is a hand-written tar entry.
type testEntry struct {
	Hdr  tar.Header
	Data string
}

// writeMember writes rt as a zstd-compressed tar to w.
func writeMember(w io.Writer, rt testRuntime) error {
	zw, err := zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedFastest))
	if err != nil {
		return err
	}
	tw := tar.NewWriter(zw)
	if rt.Tree != "" {
		if err := tarTree(tw, rt.Tree); err != nil {
			return err
		}
	}
	entries := rt.Entries
	if rt.Script != "" {
		entries = append(entries,
			testEntry{Hdr: tar.Header{Name: "./.actiond/", Typeflag: tar.TypeDir, Mode: 0o755}},
			testEntry{Hdr: tar.Header{Name: "./.actiond/second-stage", Typeflag: tar.TypeReg, Mode: 0o755}, Data: rt.Script})
	}
	for _, e := range entries {
		h := e.Hdr
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.Data))
		}
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(&h); err != nil {
			return err
		}
		if _, err := io.WriteString(tw, e.Data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}

// tarTree writes the tree under dir with its owners, modes, devices,
// symlinks and hard links, as "./path" names, parents first.
func tarTree(tw *tar.Writer, dir string) error {
	links := map[[2]uint64]string{}
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		name := "./" + filepath.ToSlash(rel)
		if rel == "." {
			name = "./"
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		target := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if target, err = os.Readlink(p); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(fi, target)
		if err != nil {
			return err
		}
		h.Name, h.Uname, h.Gname, h.Format = name, "", "", tar.FormatPAX
		if fi.IsDir() && rel != "." {
			h.Name += "/"
		}
		if fi.Mode().IsRegular() && st.Nlink > 1 {
			key := [2]uint64{uint64(st.Dev), st.Ino}
			if first, ok := links[key]; ok {
				h.Typeflag, h.Linkname, h.Size = tar.TypeLink, first, 0
			} else {
				links[key] = name
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if h.Typeflag == tar.TypeReg && h.Size > 0 {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			return err
		}
		return nil
	})
}

// writeRuntimesDisk writes a tar runtimes disk for arch ("": this
// machine's) with rts to path and returns its manifest.
func writeRuntimesDisk(t testing.TB, path, arch string, rts []testRuntime) runtimesManifest {
	t.Helper()
	if arch == "" {
		arch = runtime.GOARCH
	}
	m := runtimesManifest{Format: runtimesFormat, Arch: arch}
	dir := t.TempDir()
	var members []string
	for _, rt := range rts {
		mp := filepath.Join(dir, rt.Name+".tar.zst")
		f, err := os.Create(mp)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		if err := writeMember(io.MultiWriter(f, h), rt); err != nil {
			t.Fatalf("runtime %s: %v", rt.Name, err)
		}
		fi, _ := f.Stat()
		f.Close()
		members = append(members, mp)
		m.Runtimes = append(m.Runtimes, runtimeEntry{Name: rt.Name, Suite: "test", Member: rt.Name + ".tar.zst",
			SHA256: hex.EncodeToString(h.Sum(nil)), Size: fi.Size(), Packages: json.RawMessage(`[]`)})
	}
	writeDisk(t, path, m, members)
	return m
}

// writeDisk writes the outer tar: the manifest, then the member files.
func writeDisk(t testing.TB, path string, m runtimesManifest, members []string) {
	t.Helper()
	out, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	tw := tar.NewWriter(out)
	data, _ := json.Marshal(m)
	if err := tw.WriteHeader(&tar.Header{Name: runtimesManifestName, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg, Format: tar.FormatUSTAR}); err != nil {
		t.Fatal(err)
	}
	tw.Write(data)
	for _, mp := range members {
		fi, err := os.Stat(mp)
		if err != nil {
			t.Fatal(err)
		}
		if err := tw.WriteHeader(&tar.Header{Name: filepath.Base(mp), Mode: 0o644, Size: fi.Size(), Typeflag: tar.TypeReg, Format: tar.FormatUSTAR}); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(mp)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(tw, f); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	// Zero-padded to a 1 MiB multiple, as a disk image.
	pos, _ := out.Seek(0, io.SeekCurrent)
	if err := out.Truncate((pos + 1<<20 - 1) &^ (1<<20 - 1)); err != nil {
		t.Fatal(err)
	}
}

// tinyHostTree makes a minimal runtime tree from the host's dash and the
// libraries it needs (merged /usr layout): enough for a second-stage
// script made of shell builtins.
func tinyHostTree(t testing.TB) string {
	t.Helper()
	sh, err := exec.LookPath("dash")
	testutil.Require(t, err == nil, "no dash on the host to build a tiny runtime from (apt-get install dash)")
	sh, _ = filepath.EvalSymlinks(sh)
	out, err := exec.Command("ldd", sh).Output()
	if err != nil {
		t.Fatalf("ldd %s: %v", sh, err)
	}
	files := []string{sh}
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				files = append(files, f)
			}
		}
	}
	root := t.TempDir()
	for _, d := range []string{"usr/bin", "usr/lib", "usr/lib64", "etc", "root", "tmp", "proc", "sys", "dev"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	for _, l := range [][2]string{{"bin", "usr/bin"}, {"lib", "usr/lib"}, {"lib64", "usr/lib64"}} {
		os.Symlink(l[1], filepath.Join(root, l[0]))
	}
	for _, f := range files {
		real, err := filepath.EvalSymlinks(f)
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(real)
		if err != nil {
			t.Fatal(err)
		}
		// /lib/x86_64-linux-gnu/libc.so.6 → usr/lib/x86_64-linux-gnu/libc.so.6
		rel := strings.TrimPrefix(f, "/")
		if !strings.HasPrefix(rel, "usr/") {
			rel = "usr/" + rel
		}
		dst := filepath.Join(root, rel)
		os.MkdirAll(filepath.Dir(dst), 0o755)
		if err := os.WriteFile(dst, data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(filepath.Base(sh), filepath.Join(root, "usr/bin/sh")); err != nil && !os.IsExist(err) {
		t.Fatal(err)
	}
	return root
}

// sortedNames lists a directory's entry names.
func sortedNames(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}

// memberBytes returns rt as member bytes and their SHA-256.
func memberBytes(t testing.TB, rt testRuntime) ([]byte, string) {
	t.Helper()
	var b bytes.Buffer
	if err := writeMember(&b, rt); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b.Bytes())
	return b.Bytes(), fmt.Sprintf("%x", sum)
}
