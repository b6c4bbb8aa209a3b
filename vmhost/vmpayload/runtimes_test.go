package vmpayload

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/actiond/actiond/vmhost/vmpayload/debian"
	"github.com/actiond/actiond/vmhost/vmpayload/debian/debtest"
)

// runtimeMirror is a tiny bookworm: libc6 (Multi-Arch: same, a conffile,
// a preinst), base-files with /bin entries (merged /usr), a device node
// and a hard link.
func runtimeMirror(t *testing.T) *debtest.Mirror {
	libc := debtest.Deb{
		Control:      "Package: libc6\nVersion: 2.36-9\nArchitecture: amd64\nMulti-Arch: same\nPriority: required\nDescription: libc\n long\n",
		ControlFiles: map[string]string{"conffiles": "/etc/ld.so.conf\n", "preinst": "#!/bin/sh\nexit 0\n", "md5sums": "0  lib/x\n"},
		Data: []debtest.Entry{
			{Name: "./", Type: tar.TypeDir, Mode: 0o755},
			{Name: "./etc/", Type: tar.TypeDir, Mode: 0o755},
			{Name: "./etc/ld.so.conf", Data: "include /etc/ld.so.conf.d/*.conf\n", Mode: 0o644},
			{Name: "./lib/", Type: tar.TypeDir, Mode: 0o755},
			{Name: "./lib/x86_64-linux-gnu/", Type: tar.TypeDir, Mode: 0o755},
			{Name: "./lib/x86_64-linux-gnu/libc.so.6", Data: "ELF", Mode: 0o755},
			{Name: "./lib64/", Type: tar.TypeDir, Mode: 0o755},
			{Name: "./lib64/ld-linux-x86-64.so.2", Type: tar.TypeSymlink, Link: "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"},
		},
	}
	base := debtest.Deb{
		Control:      "Package: base-files\nVersion: 12.4\nArchitecture: amd64\nPriority: required\nDepends: libc6\n",
		ControlFiles: map[string]string{"postinst": "#!/bin/sh\nexit 0\n"},
		Data: []debtest.Entry{
			{Name: "./", Type: tar.TypeDir, Mode: 0o755},
			{Name: "./bin/", Type: tar.TypeDir, Mode: 0o755},
			{Name: "./bin/sh", Data: "#!shell", Mode: 0o755},
			{Name: "./bin/sh2", Type: tar.TypeLink, Link: "./bin/sh"},
			{Name: "./dev/", Type: tar.TypeDir, Mode: 0o755},
			{Name: "./dev/null", Type: tar.TypeChar, Mode: 0o666, Major: 1, Minor: 3},
			{Name: "./var/", Type: tar.TypeDir, Mode: 0o755},
			{Name: "./var/mail/", Type: tar.TypeDir, Mode: 0o2775, Gid: 8},
		},
		Compression: "zst",
	}
	return debtest.NewMirror(t, "bookworm", "amd64", []debtest.Package{
		{Name: "libc6", Version: "2.36-9", Priority: "required", MultiArch: "same", Deb: libc.Build(t)},
		{Name: "base-files", Version: "12.4", Priority: "required", Depends: "libc6", Deb: base.Build(t)},
	})
}

func testBuilder(t *testing.T, m *debtest.Mirror, dir string) *builder {
	b := &builder{
		opts: Options{Arch: "amd64", Dir: dir, Mirror: m.URL},
		arch: "amd64", log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		archives: map[string]*debian.Archive{}, pkgs: map[string][]string{}, roots: []string{},
	}
	b.client = &debian.Client{Mirror: m.URL, Dir: b.work(""), Keyring: m.Keyring()}
	return b
}

var testSpec = RuntimeSpec{Name: "glibc2.36", Suite: "bookworm", Glibc: "2.36"}

// readTree reads a runtime member: name → header, and file contents.
func readTree(t *testing.T, path string) (map[string]*tar.Header, map[string]string, []string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := zstd.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
	tr := tar.NewReader(zr)
	hdrs, data := map[string]*tar.Header{}, map[string]string{}
	var order []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, dup := hdrs[h.Name]; dup {
			t.Errorf("%s twice in the tree", h.Name)
		}
		hdrs[h.Name] = h
		order = append(order, h.Name)
		b, _ := io.ReadAll(tr)
		data[h.Name] = string(b)
	}
	return hdrs, data, order
}

// The runtime tree: merged /usr, the packages' owners, modes, device
// nodes and hard links, conffiles left as .dpkg-new, and dpkg's database
// as dpkg --unpack leaves it, plus the second stage.
func TestRuntimeTree(t *testing.T) {
	m := runtimeMirror(t)
	b := testBuilder(t, m, t.TempDir())
	e, err := b.runtime(context.Background(), testSpec)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(e.Packages, " ") != "libc6=2.36-9 base-files=12.4" {
		t.Errorf("packages %v (want libc6 first: base-files depends on it)", e.Packages)
	}
	hdrs, data, order := readTree(t, b.work("runtimes/glibc2.36.tar.zst"))
	check := func(name string, ok bool, what string) {
		t.Helper()
		if !ok {
			t.Errorf("%s: %s; header %+v", name, what, hdrs[name])
		}
	}
	h := func(n string) *tar.Header {
		if hdrs[n] == nil {
			return &tar.Header{}
		}
		return hdrs[n]
	}
	if order[0] != "./" {
		t.Errorf("first entry %q, want ./", order[0])
	}
	check("./bin", h("./bin").Typeflag == tar.TypeSymlink && h("./bin").Linkname == "usr/bin", "merged /usr symlink")
	check("./lib64", h("./lib64").Typeflag == tar.TypeSymlink && h("./lib64").Linkname == "usr/lib64", "merged /usr symlink")
	check("./usr/bin/sh", h("./usr/bin/sh").Typeflag == tar.TypeReg && data["./usr/bin/sh"] == "#!shell", "file moved under /usr")
	check("./usr/bin/sh2", h("./usr/bin/sh2").Typeflag == tar.TypeLink && h("./usr/bin/sh2").Linkname == "./usr/bin/sh", "hard link, target under /usr")
	check("./dev/null", h("./dev/null").Typeflag == tar.TypeChar && h("./dev/null").Devmajor == 1 && h("./dev/null").Devminor == 3 && h("./dev/null").Mode == 0o666, "device node")
	check("./var/mail/", h("./var/mail/").Mode == 0o2775 && h("./var/mail/").Gid == 8, "setgid directory with its group")
	check("./usr/lib64/ld-linux-x86-64.so.2", h("./usr/lib64/ld-linux-x86-64.so.2").Typeflag == tar.TypeSymlink, "symlink under /usr")
	check("./etc/ld.so.conf.dpkg-new", h("./etc/ld.so.conf.dpkg-new").Typeflag == tar.TypeReg, "conffile left for dpkg --configure")
	if _, ok := hdrs["./etc/ld.so.conf"]; ok {
		t.Error("conffile at its final name before configure")
	}
	for _, n := range []string{"./bin/", "./lib/", "./lib64/"} {
		if _, ok := hdrs[n]; ok {
			t.Errorf("%s is a directory: merged /usr broken", n)
		}
	}
	status := data["./var/lib/dpkg/status"]
	for _, want := range []string{"Package: libc6\nStatus: install ok unpacked\n", "Package: base-files\nStatus: install ok unpacked\n", "Conffiles:\n /etc/ld.so.conf newconffile\n", "Description: libc\n long\n"} {
		if !strings.Contains(status, want) {
			t.Errorf("status lacks %q:\n%s", want, status)
		}
	}
	if l := data["./var/lib/dpkg/info/libc6:amd64.list"]; !strings.HasPrefix(l, "/.\n") || !strings.Contains(l, "\n/lib64/ld-linux-x86-64.so.2\n") || !strings.Contains(l, "\n/etc/ld.so.conf\n") {
		t.Errorf("libc6:amd64.list (Multi-Arch: same) = %q", l)
	}
	check("./var/lib/dpkg/info/libc6:amd64.preinst", h("./var/lib/dpkg/info/libc6:amd64.preinst").Mode == 0o755, "maintainer script, executable")
	check("./var/lib/dpkg/info/base-files.postinst", hdrs["./var/lib/dpkg/info/base-files.postinst"] != nil, "maintainer script")
	for _, n := range []string{"./var/lib/dpkg/info/libc6:amd64.md5sums", "./var/lib/dpkg/info/libc6:amd64.conffiles", "./var/lib/dpkg/available", "./var/lib/dpkg/info/format"} {
		check(n, hdrs[n] != nil, "dpkg database file")
	}
	check("./var/lib/dpkg/arch", data["./var/lib/dpkg/arch"] == "amd64\n", "dpkg arch")
	check("./etc/apt/sources.list", data["./etc/apt/sources.list"] == "deb "+m.URL+" bookworm main\n", "apt source")
	ss := data["./.actiond/second-stage"]
	check("./.actiond/second-stage", h("./.actiond/second-stage").Mode == 0o755 && strings.HasPrefix(ss, "#!/bin/sh\n") &&
		strings.Contains(ss, "preinst libc6 libc6:amd64 amd64\n") && strings.Contains(ss, "dpkg --force-confdef --force-confold --configure -a"), "second stage")
}

// A corrupted .deb from the mirror fails the build with the file and both
// hashes named, nothing of it is cached (no .deb, no runtime member), and
// the next run against the good mirror succeeds.
func TestRuntimeCorruptDebRefused(t *testing.T) {
	m := runtimeMirror(t)
	dir := t.TempDir()
	b := testBuilder(t, m, dir)
	path := m.DebPath("base-files", "12.4", "amd64")
	bad := bytes.Clone(m.File(path))
	bad[100] ^= 1
	m.Tamper(path, bad)
	_, err := b.runtime(context.Background(), testSpec)
	var hm *debian.HashMismatchError
	if !errors.As(err, &hm) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), hm.WantSHA256) || !strings.Contains(err.Error(), hm.GotSHA256) {
		t.Fatalf("corrupt .deb: %v", err)
	}
	debs, _ := filepath.Glob(filepath.Join(dir, "work", "debs", "base-files*"))
	members, _ := filepath.Glob(filepath.Join(dir, "work", "runtimes", "*"))
	if len(debs) != 0 || len(members) != 0 {
		t.Fatalf("kept after the failure: %v %v", debs, members)
	}
	m.Tamper(path, nil)
	b = testBuilder(t, m, dir)
	if _, err := b.runtime(context.Background(), testSpec); err != nil {
		t.Fatalf("good run after the corrupt one: %v", err)
	}
}

// runtimes.tar: a POSIX tar whose first member is the index, padded to a
// MiB, each member's hash and size as the index says.
func TestRuntimesTarLayout(t *testing.T) {
	m := runtimeMirror(t)
	dir := t.TempDir()
	b := testBuilder(t, m, dir)
	e, err := b.runtime(context.Background(), testSpec)
	if err != nil {
		t.Fatal(err)
	}
	idx := RuntimesIndex{Format: RuntimesFormat, Arch: "amd64", Runtimes: []RuntimeEntry{*e}}
	js, _ := json.Marshal(idx)
	out := filepath.Join(dir, "runtimes.tar")
	if err := writeRuntimesTar(out, js, idx, []string{b.work("runtimes/glibc2.36.tar.zst")}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(data)%(1<<20) != 0 || string(data[257:262]) != "ustar" {
		t.Fatalf("size %d, magic %q", len(data), data[257:263])
	}
	tr := tar.NewReader(bytes.NewReader(data))
	h, err := tr.Next()
	if err != nil || h.Name != RuntimesIndexName {
		t.Fatalf("first member %v %v", h, err)
	}
	var got RuntimesIndex
	if err := json.NewDecoder(tr).Decode(&got); err != nil || got.Format != 1 || got.Arch != "amd64" || got.Runtimes[0].Member != "glibc2.36.tar.zst" || got.Runtimes[0].Glibc != "2.36" {
		t.Fatalf("index %+v %v", got, err)
	}
	h, err = tr.Next()
	if err != nil || h.Name != "glibc2.36.tar.zst" || h.Size != e.Size {
		t.Fatalf("second member %+v %v", h, err)
	}
	body, _ := io.ReadAll(tr)
	if sha := sha256Hex(body); sha != e.SHA256 {
		t.Fatalf("member sha %s, index says %s", sha, e.SHA256)
	}
}
