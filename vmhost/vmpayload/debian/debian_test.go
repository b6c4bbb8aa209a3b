package debian_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/actiond/actiond/vmhost/vmpayload/debian"
	"github.com/actiond/actiond/vmhost/vmpayload/debian/debtest"
)

// Debian's real InRelease files (testdata, fetched from deb.debian.org)
// verify against the keys actiond carries.
func TestArchiveKeysVerifyRealInRelease(t *testing.T) {
	kr, err := debian.ArchiveKeyring()
	if err != nil {
		t.Fatal(err)
	}
	for _, suite := range []string{"bullseye", "bookworm", "trixie"} {
		data, err := os.ReadFile(filepath.Join("testdata", suite+".InRelease"))
		if err != nil {
			t.Fatal(err)
		}
		rel, err := debian.VerifyInRelease(suite, data, kr)
		if err != nil {
			t.Fatalf("%s: %v", suite, err)
		}
		if rel.Codename != suite || rel.Files["main/binary-arm64/Packages.xz"].SHA256 == "" || rel.Files["main/binary-amd64/Packages"].Size == 0 {
			t.Errorf("%s: parsed %+v", suite, rel.Codename)
		}
		if !strings.Contains(rel.Signer, "Debian") {
			t.Errorf("%s: signer %q", suite, rel.Signer)
		}
	}
}

// One changed byte in the signed text, or a signature by a key Debian's
// keyring lacks, is refused.
func TestInReleaseTamperedOrForeign(t *testing.T) {
	kr, err := debian.ArchiveKeyring()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join("testdata", "bookworm.InRelease"))
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(data, []byte("main/binary-amd64/Packages.xz"))
	// Change a hash digit on the line before (what an attacker would do).
	j := bytes.LastIndexByte(data[:i], '\n') + 2
	bad := bytes.Clone(data)
	if bad[j] == 'a' {
		bad[j] = 'b'
	} else {
		bad[j] = 'a'
	}
	_, err = debian.VerifyInRelease("http://m/dists/bookworm/InRelease", bad, kr)
	if err == nil || !strings.Contains(err.Error(), "bad OpenPGP signature") || !strings.Contains(err.Error(), "http://m/dists/bookworm/InRelease") {
		t.Fatalf("tampered InRelease: %v", err)
	}
	m := debtest.NewMirror(t, "bookworm", "amd64", nil)
	_, err = debian.VerifyInRelease("x/InRelease", m.File("dists/bookworm/InRelease"), kr)
	if err == nil || !strings.Contains(err.Error(), "no key Debian's archive keyring knows") {
		t.Fatalf("foreign key: %v", err)
	}
	if _, err := debian.VerifyInRelease("x", []byte("Suite: x\n"), kr); err == nil {
		t.Fatal("unsigned InRelease accepted")
	}
}

func testPackages() []debtest.Package {
	return []debtest.Package{
		{Name: "libc6", Version: "2.36-9", Priority: "required", MultiArch: "same"},
		{Name: "base-files", Version: "12.4", Priority: "required", Depends: "mawk | awk"},
		{Name: "mawk", Version: "1.3.4", Priority: "required", Provides: "awk", Depends: "libc6 (>= 2.34)"},
		{Name: "gawk", Version: "5.2", Priority: "optional", Provides: "awk", Depends: "libc6, libsigsegv2"},
		{Name: "libsigsegv2", Version: "2.14", Priority: "optional"},
		{Name: "bash", Version: "5.2", Priority: "optional", PreDepends: "libc6, libtinfo6", Depends: "base-files"},
		{Name: "libtinfo6", Version: "6.4", Priority: "optional", Depends: "libc6:any"},
		{Name: "zstd", Version: "1.5", Priority: "optional", Depends: "libzstd1 | libzstd-virtual"},
		{Name: "libzstd-impl", Version: "1.5", Priority: "optional", Provides: "libzstd-virtual (= 1.5)"},
		{Name: "otherarch", Version: "1", Arch: "arm64", Priority: "required"},
	}
}

func openMirror(t *testing.T, m *debtest.Mirror, dir string) (*debian.Client, *debian.Archive) {
	t.Helper()
	c := &debian.Client{Mirror: m.URL, Dir: dir, Keyring: m.Keyring()}
	a, err := c.Open(context.Background(), "bookworm", "amd64", false)
	if err != nil {
		t.Fatal(err)
	}
	return c, a
}

func TestResolve(t *testing.T) {
	m := debtest.NewMirror(t, "bookworm", "amd64", testPackages())
	_, a := openMirror(t, m, t.TempDir())
	if _, ok := a.Index.Packages["otherarch"]; ok {
		t.Error("the index kept a package of another architecture")
	}
	res, err := debian.Resolve(a.Index, []string{"bash", "gawk|mawk", "zstd"})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	pos := map[string]int{}
	for i, p := range res.Packages {
		got = append(got, p.Name)
		pos[p.Name] = i
	}
	// Required: libc6, base-files, mawk. gawk|mawk: mawk, already chosen.
	// bash pulls libtinfo6 (":any" qualifier); zstd's libzstd1 does not
	// exist, so the virtual libzstd-virtual's provider is taken.
	want := []string{"base-files", "bash", "libc6", "libtinfo6", "libzstd-impl", "mawk", "zstd"}
	if strings.Join(sorted(got), " ") != strings.Join(want, " ") {
		t.Fatalf("resolved %v, want %v", got, want)
	}
	for _, dep := range [][2]string{{"libc6", "mawk"}, {"mawk", "base-files"}, {"libtinfo6", "bash"}, {"base-files", "bash"}, {"libzstd-impl", "zstd"}} {
		if pos[dep[0]] > pos[dep[1]] {
			t.Errorf("%s comes after %s, which depends on it: %v", dep[0], dep[1], got)
		}
	}
	// Nothing satisfies a missing package.
	if _, err := debian.Resolve(a.Index, []string{"no-such-package"}); err == nil || !strings.Contains(err.Error(), "no-such-package") {
		t.Fatalf("missing package: %v", err)
	}
}

func sorted(s []string) []string {
	out := append([]string(nil), s...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j] < out[i] {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

// A .deb whose bytes differ from what Packages says is refused with both
// hashes and the file named, nothing of it stays in the cache, and the
// next download of the good file succeeds.
func TestDownloadHashMismatchNotCached(t *testing.T) {
	m := debtest.NewMirror(t, "bookworm", "amd64", testPackages())
	dir := t.TempDir()
	c, a := openMirror(t, m, dir)
	p := a.Index.Packages["bash"]
	good := m.File(p.Filename)
	bad := bytes.Clone(good)
	bad[len(bad)-1] ^= 0xFF
	m.Tamper(p.Filename, bad)
	_, err := c.Download(context.Background(), p)
	var hm *debian.HashMismatchError
	if !errors.As(err, &hm) {
		t.Fatalf("tampered .deb: %v", err)
	}
	if !strings.Contains(err.Error(), p.Filename) || !strings.Contains(err.Error(), p.SHA256) || hm.GotSHA256 == p.SHA256 || !strings.Contains(err.Error(), hm.GotSHA256) {
		t.Errorf("error does not name the file and both hashes: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "debs", "*")); len(left) != 0 {
		t.Fatalf("kept after a hash mismatch: %v", left)
	}
	m.Tamper(p.Filename, nil)
	path, err := c.Download(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, good) {
		t.Fatal("cached file differs from the mirror's")
	}
	// Cached: no second request.
	n := m.Requests(p.Filename)
	if _, err := c.Download(context.Background(), p); err != nil || m.Requests(p.Filename) != n {
		t.Fatalf("second download: %v, requests %d → %d", err, n, m.Requests(p.Filename))
	}
}

// A tampered InRelease from the mirror is refused and not cached; so is a
// Packages.xz that does not match InRelease.
func TestOpenTamperedIndexes(t *testing.T) {
	m := debtest.NewMirror(t, "bookworm", "amd64", testPackages())
	dir := t.TempDir()
	c := &debian.Client{Mirror: m.URL, Dir: dir, Keyring: m.Keyring()}
	rel := m.File("dists/bookworm/InRelease")
	m.Tamper("dists/bookworm/InRelease", bytes.Replace(rel, []byte("Suite: bookworm"), []byte("Suite: bookwork"), 1))
	if _, err := c.Open(context.Background(), "bookworm", "amd64", false); err == nil || !strings.Contains(err.Error(), "InRelease") {
		t.Fatalf("tampered InRelease: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "dists", "bookworm", "InRelease")); err == nil {
		t.Fatal("tampered InRelease was cached")
	}
	m.Tamper("dists/bookworm/InRelease", nil)
	pk := "dists/bookworm/main/binary-amd64/Packages.xz"
	m.Tamper(pk, debtest.XZ(t, []byte("Package: evil\n")))
	_, err := c.Open(context.Background(), "bookworm", "amd64", false)
	if err == nil || !strings.Contains(err.Error(), "Packages.xz") || !strings.Contains(err.Error(), "SHA-256") {
		t.Fatalf("tampered Packages.xz: %v", err)
	}
	m.Tamper(pk, nil)
	if _, err := c.Open(context.Background(), "bookworm", "amd64", false); err != nil {
		t.Fatal(err)
	}
}

// An interrupted download resumes where it stopped (a Range request).
func TestDownloadResumes(t *testing.T) {
	big := strings.Repeat("0123456789abcdef", 64<<10) // 1 MiB, poorly compressible enough
	deb := debtest.Deb{Control: "Package: big\nVersion: 1\nArchitecture: amd64\n", Data: []debtest.Entry{{Name: "./big", Data: big, Mode: 0o644}}, Compression: "gz"}
	pkgs := []debtest.Package{{Name: "big", Version: "1", Priority: "required"}}
	pkgs[0].Deb = deb.Build(t)
	m := debtest.NewMirror(t, "bookworm", "amd64", pkgs)
	c, a := openMirror(t, m, t.TempDir())
	p := a.Index.Packages["big"]
	m.CutNext(p.Filename, int(p.Size/2))
	var lines []string
	c.Progress = func(f string, args ...any) { lines = append(lines, f) }
	if _, err := c.Download(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	if m.Requests(p.Filename) != 2 || !strings.Contains(strings.Join(lines, "\n"), "resuming") {
		t.Fatalf("requests %d, progress %q", m.Requests(p.Filename), lines)
	}
}

// An unreachable mirror: the error names the URL.
func TestUnreachableMirror(t *testing.T) {
	m := debtest.NewMirror(t, "bookworm", "amd64", nil)
	url := m.URL
	m.Server.Close()
	c := &debian.Client{Mirror: url, Dir: t.TempDir(), Keyring: m.Keyring()}
	_, err := c.Open(context.Background(), "bookworm", "amd64", false)
	if err == nil || !strings.Contains(err.Error(), url+"/dists/bookworm/InRelease") {
		t.Fatalf("unreachable mirror: %v", err)
	}
}

// OpenDeb and Data read every compression, device nodes and hard links
// included, with owners and modes as in the package.
func TestDebUnpack(t *testing.T) {
	for _, comp := range []string{"xz", "zst", "gz"} {
		t.Run(comp, func(t *testing.T) {
			deb := debtest.Deb{
				Control:      "Package: t\nVersion: 1:2.0-1\nArchitecture: amd64\nDescription: test\n multi-line\n",
				ControlFiles: map[string]string{"conffiles": "/etc/t.conf\n", "postinst": "#!/bin/sh\nexit 0\n", "md5sums": "x  usr/bin/t\n"},
				Data: []debtest.Entry{
					{Name: "./", Type: tar.TypeDir, Mode: 0o755},
					{Name: "./dev/", Type: tar.TypeDir, Mode: 0o755},
					{Name: "./dev/null", Type: tar.TypeChar, Mode: 0o666, Major: 1, Minor: 3},
					{Name: "./usr/bin/t", Data: "#!/bin/sh\n", Mode: 0o4755, Uid: 0, Gid: 42},
					{Name: "./usr/bin/t2", Type: tar.TypeLink, Link: "./usr/bin/t"},
					{Name: "./bin/t", Type: tar.TypeSymlink, Link: "/usr/bin/t"},
					{Name: "./etc/t.conf", Data: "a=1\n", Mode: 0o644},
				},
				Compression: comp,
			}
			path := filepath.Join(t.TempDir(), "t.deb")
			if err := os.WriteFile(path, deb.Build(t), 0o644); err != nil {
				t.Fatal(err)
			}
			d, err := debian.OpenDeb(path)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if d.Control.Get("Version") != "1:2.0-1" || !strings.Contains(d.Control.Get("Description"), "multi-line") {
				t.Errorf("control %v", d.Control)
			}
			if c := d.Conffiles(); len(c) != 1 || c[0] != "/etc/t.conf" {
				t.Errorf("conffiles %v", c)
			}
			if d.ControlFiles["postinst"].Mode&0o111 == 0 {
				t.Error("postinst lost its mode")
			}
			seen := map[string]*tar.Header{}
			err = d.Data(func(h *tar.Header, r io.Reader) error {
				seen[h.Name] = h
				if h.Name == "./usr/bin/t" {
					if b, _ := io.ReadAll(r); string(b) != "#!/bin/sh\n" {
						t.Errorf("content %q", b)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if h := seen["./dev/null"]; h == nil || h.Typeflag != tar.TypeChar || h.Devmajor != 1 || h.Devminor != 3 {
				t.Errorf("device node %+v", h)
			}
			if h := seen["./usr/bin/t2"]; h == nil || h.Typeflag != tar.TypeLink || h.Linkname != "./usr/bin/t" {
				t.Errorf("hard link %+v", h)
			}
			if h := seen["./usr/bin/t"]; h == nil || h.Mode != 0o4755 || h.Gid != 42 {
				t.Errorf("setuid file %+v", h)
			}
		})
	}
	bad := filepath.Join(t.TempDir(), "bad.deb")
	os.WriteFile(bad, []byte("not a deb"), 0o644)
	if _, err := debian.OpenDeb(bad); err == nil || !strings.Contains(err.Error(), bad) {
		t.Fatalf("garbage .deb: %v", err)
	}
}

func TestCompareVersions(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{
		{"1.0", "1.0", 0}, {"1.0", "1.1", -1}, {"1:1.0", "2.0", 1}, {"1.0~rc1", "1.0", -1},
		{"1.0-1", "1.0-1+b1", -1}, {"2.36-9+deb12u14", "2.36-9+deb12u4", 1}, {"1.10", "1.9", 1}, {"1.0a", "1.0", 1},
	} {
		if got := debian.CompareVersions(c.a, c.b); got != c.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", c.a, c.b, got, c.want)
		}
	}
}
