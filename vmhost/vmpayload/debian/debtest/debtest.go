// Package debtest makes Debian packages and signed archives for tests of
// the payload builder: real .deb files (ar, control.tar, data.tar with xz,
// zstd or gzip) and a mirror served over HTTP whose InRelease is signed
// with a key generated for the test.
package debtest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/clearsign"
	"github.com/ProtonMail/go-crypto/openpgp/packet"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// Entry is one member of a data.tar.
type Entry struct {
	Name     string // "./usr/bin/x"
	Type     byte   // tar.TypeReg (default), TypeDir, TypeSymlink, TypeLink, TypeChar
	Mode     int64
	Uid, Gid int
	Link     string
	Data     string
	Major    int64
	Minor    int64
}

// Deb describes a package.
type Deb struct {
	Control      string            // the control file, e.g. "Package: a\nVersion: 1\nArchitecture: amd64\n"
	ControlFiles map[string]string // conffiles, md5sums, preinst, ...
	Data         []Entry
	Compression  string // "xz" (default), "zst", "gz"
}

// Build returns the .deb file's bytes.
func (d Deb) Build(t testing.TB) []byte {
	t.Helper()
	comp := d.Compression
	if comp == "" {
		comp = "xz"
	}
	var ctl []Entry
	ctl = append(ctl, Entry{Name: "./control", Data: d.Control, Mode: 0o644})
	names := make([]string, 0, len(d.ControlFiles))
	for n := range d.ControlFiles {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		mode := int64(0o644)
		if strings.HasSuffix(n, "inst") || strings.HasSuffix(n, "rm") {
			mode = 0o755
		}
		ctl = append(ctl, Entry{Name: "./" + n, Data: d.ControlFiles[n], Mode: mode})
	}
	var ar bytes.Buffer
	ar.WriteString("!<arch>\n")
	member := func(name string, data []byte) {
		fmt.Fprintf(&ar, "%-16s%-12d%-6d%-6d%-8o%-10d`\n", name, 0, 0, 0, 0o100644, len(data))
		ar.Write(data)
		if len(data)%2 == 1 {
			ar.WriteByte('\n')
		}
	}
	member("debian-binary", []byte("2.0\n"))
	member("control.tar."+comp, compress(t, tarball(t, ctl), comp))
	member("data.tar."+comp, compress(t, tarball(t, d.Data), comp))
	return ar.Bytes()
}

func tarball(t testing.TB, entries []Entry) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range entries {
		typ := e.Type
		if typ == 0 {
			typ = tar.TypeReg
		}
		h := &tar.Header{Typeflag: typ, Name: e.Name, Mode: e.Mode, Uid: e.Uid, Gid: e.Gid, Linkname: e.Link,
			Devmajor: e.Major, Devminor: e.Minor, ModTime: time.Unix(1700000000, 0), Uname: "root", Gname: "root", Format: tar.FormatGNU}
		if typ == tar.TypeReg {
			h.Size = int64(len(e.Data))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if typ == tar.TypeReg {
			tw.Write([]byte(e.Data))
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func compress(t testing.TB, data []byte, comp string) []byte {
	var b bytes.Buffer
	switch comp {
	case "xz":
		w, err := xz.NewWriter(&b)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(data)
		w.Close()
	case "zst":
		w, _ := zstd.NewWriter(&b)
		w.Write(data)
		w.Close()
	case "gz":
		w := gzip.NewWriter(&b)
		w.Write(data)
		w.Close()
	default:
		t.Fatalf("compression %q", comp)
	}
	return b.Bytes()
}

// XZ compresses data as xz (for Packages.xz).
func XZ(t testing.TB, data []byte) []byte { return compress(t, data, "xz") }

// Mirror is a Debian archive with one suite and architecture, served by an
// httptest server and signed with Key.
type Mirror struct {
	URL, Suite, Arch string
	Key              *openpgp.Entity
	Server           *httptest.Server

	mu    sync.Mutex
	files map[string][]byte // path → content
	// Override replaces what is served for a path (tampering tests).
	override map[string][]byte
	// cut makes the next GET of a path stop after n bytes.
	cut      map[string]int
	requests map[string]int
}

// Package is a .deb put into a Mirror.
type Package struct {
	Name, Version, Arch, Priority string
	Depends, PreDepends, Provides string
	MultiArch                     string
	Deb                           []byte // the file; built from Control if nil
}

// NewMirror serves pkgs as suite for arch.
func NewMirror(t testing.TB, suite, arch string, pkgs []Package) *Mirror {
	t.Helper()
	key, err := openpgp.NewEntity("actiond test archive", "", "test@actiond.invalid", &packet.Config{Algorithm: packet.PubKeyAlgoEdDSA})
	if err != nil {
		t.Fatal(err)
	}
	m := &Mirror{Suite: suite, Arch: arch, Key: key, files: map[string][]byte{}, override: map[string][]byte{}, cut: map[string]int{}, requests: map[string]int{}}
	var index bytes.Buffer
	for _, p := range pkgs {
		if p.Arch == "" {
			p.Arch = arch
		}
		if p.Deb == nil {
			p.Deb = Deb{Control: p.control()}.Build(t)
		}
		path := fmt.Sprintf("pool/main/%s/%s_%s_%s.deb", p.Name, p.Name, p.Version, p.Arch)
		m.files[path] = p.Deb
		sum := sha256.Sum256(p.Deb)
		index.WriteString(p.control())
		fmt.Fprintf(&index, "Filename: %s\nSize: %d\nSHA256: %s\n\n", path, len(p.Deb), hex.EncodeToString(sum[:]))
	}
	plain := index.Bytes()
	packagesXZ := XZ(t, plain)
	base := "dists/" + suite + "/"
	m.files[base+"main/binary-"+arch+"/Packages.xz"] = packagesXZ
	var rel bytes.Buffer
	fmt.Fprintf(&rel, "Origin: Test\nSuite: %s\nCodename: %s\nDate: Sat, 11 Jul 2026 10:16:37 UTC\nArchitectures: %s\nComponents: main\nSHA256:\n", suite, suite, arch)
	for _, f := range []struct {
		name string
		data []byte
	}{{"main/binary-" + arch + "/Packages", plain}, {"main/binary-" + arch + "/Packages.xz", packagesXZ}} {
		sum := sha256.Sum256(f.data)
		fmt.Fprintf(&rel, " %s %d %s\n", hex.EncodeToString(sum[:]), len(f.data), f.name)
	}
	var signed bytes.Buffer
	w, err := clearsign.Encode(&signed, key.PrivateKey, nil)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(rel.Bytes())
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	m.files[base+"InRelease"] = signed.Bytes()
	m.Server = httptest.NewServer(http.HandlerFunc(m.serve))
	t.Cleanup(m.Server.Close)
	m.URL = m.Server.URL + "/debian"
	return m
}

func (p Package) control() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Package: %s\nVersion: %s\nArchitecture: %s\n", p.Name, p.Version, p.Arch)
	for _, f := range []struct{ k, v string }{{"Priority", p.Priority}, {"Multi-Arch", p.MultiArch}, {"Pre-Depends", p.PreDepends}, {"Depends", p.Depends}, {"Provides", p.Provides}} {
		if f.v != "" {
			fmt.Fprintf(&b, "%s: %s\n", f.k, f.v)
		}
	}
	return b.String()
}

// Keyring is the mirror's public key as a keyring.
func (m *Mirror) Keyring() openpgp.EntityList { return openpgp.EntityList{m.Key} }

// File returns what the mirror holds at path (relative to the archive root).
func (m *Mirror) File(path string) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.files[path]
}

// Tamper makes the mirror serve data instead of path's content; nil
// restores it.
func (m *Mirror) Tamper(path string, data []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if data == nil {
		delete(m.override, path)
	} else {
		m.override[path] = data
	}
}

// CutNext makes the next GET of path end after n bytes (an interrupted
// download).
func (m *Mirror) CutNext(path string, n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.cut[path] = n
}

// Requests returns how many GETs path got.
func (m *Mirror) Requests(path string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.requests[path]
}

// DebPath is the pool path of a package in the mirror.
func (m *Mirror) DebPath(name, version, arch string) string {
	return fmt.Sprintf("pool/main/%s/%s_%s_%s.deb", name, name, version, arch)
}

func (m *Mirror) serve(w http.ResponseWriter, r *http.Request) {
	path, ok := strings.CutPrefix(r.URL.Path, "/debian/")
	m.mu.Lock()
	data, found := m.files[path]
	if o, ok := m.override[path]; ok {
		data = o
	}
	cut, isCut := m.cut[path]
	delete(m.cut, path)
	m.requests[path]++
	m.mu.Unlock()
	if !ok || !found {
		http.NotFound(w, r)
		return
	}
	if isCut {
		// Promise everything, send part, drop the connection.
		w.Header().Set("Content-Length", fmt.Sprint(len(data)))
		w.WriteHeader(http.StatusOK)
		w.Write(data[:cut])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // the server drops the connection

	}
	http.ServeContent(w, r, path, time.Unix(1700000000, 0), bytes.NewReader(data))
}
