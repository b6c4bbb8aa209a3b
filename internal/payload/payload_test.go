package payload

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"testing/fstest"

	"github.com/klauspost/compress/zstd"
)

func zst(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	enc, err := zstd.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	enc.Write(b)
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestExtract: files are decoded with their manifest; a second extraction
// writes nothing; a changed embedded file or a damaged extracted one is
// written again; names select files.
func TestExtract(t *testing.T) {
	kernel := bytes.Repeat([]byte("kernel"), 100000)
	initrd := []byte("initramfs bytes")
	manifest := []byte(`{"arch":"amd64","kernel":"vmlinux","initramfs":"initramfs.cpio.zst","runtimes":"runtimes.squashfs","runtime_names":["glibc2.36"]}`)
	fsys := fstest.MapFS{
		"files/manifest.json":          {Data: manifest},
		"files/vmlinux.zst":            {Data: zst(t, kernel)},
		"files/initramfs.cpio.zst.zst": {Data: zst(t, initrd)},
		"files/runtimes.squashfs.zst":  {Data: zst(t, []byte("squashfs"))},
		"files/README":                 {Data: []byte("not a payload file")},
	}
	dir := filepath.Join(t.TempDir(), "payload", "amd64")
	check := func(name string, want []byte) {
		t.Helper()
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: got %d bytes (%v), want %d", name, len(got), err, len(want))
		}
	}

	res, err := extract(fsys, dir)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(res.Written)
	if want := []string{"initramfs.cpio.zst", "runtimes.squashfs", "vmlinux"}; !slices.Equal(res.Written, want) || len(res.Unchanged) != 0 {
		t.Fatalf("first extraction: written %v unchanged %v, want written %v", res.Written, res.Unchanged, want)
	}
	if res.Manifest.Arch != "amd64" || res.Manifest.Runtimes != "runtimes.squashfs" {
		t.Fatalf("manifest: %+v", res.Manifest)
	}
	check("vmlinux", kernel)
	check("initramfs.cpio.zst", initrd)
	check(ManifestName, manifest)
	if _, err := os.Stat(filepath.Join(dir, "README")); err == nil {
		t.Fatal("README was extracted")
	}

	res, err = extract(fsys, dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Written) != 0 || len(res.Unchanged) != 3 {
		t.Fatalf("second extraction: written %v unchanged %v, want nothing written", res.Written, res.Unchanged)
	}

	// A changed payload is written again; so is a damaged file.
	kernel2 := append(kernel, "v2"...)
	fsys["files/vmlinux.zst"] = &fstest.MapFile{Data: zst(t, kernel2)}
	if err := os.WriteFile(filepath.Join(dir, "initramfs.cpio.zst"), []byte("short"), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err = extract(fsys, dir)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(res.Written)
	if want := []string{"initramfs.cpio.zst", "vmlinux"}; !slices.Equal(res.Written, want) {
		t.Fatalf("after changes: written %v, want %v", res.Written, want)
	}
	check("vmlinux", kernel2)
	check("initramfs.cpio.zst", initrd)

	// Only the named files.
	dir2 := filepath.Join(t.TempDir(), "rt")
	res, err = extract(fsys, dir2, "runtimes.squashfs")
	if err != nil || !slices.Equal(res.Written, []string{"runtimes.squashfs"}) {
		t.Fatalf("named extraction: %v %v", res.Written, err)
	}
	if _, err := os.Stat(filepath.Join(dir2, "vmlinux")); err == nil {
		t.Fatal("named extraction wrote vmlinux")
	}
	if _, err := extract(fsys, dir2, "../x"); err == nil {
		t.Fatal("a name with a slash was accepted")
	}
	if _, err := extract(fsys, dir2, "missing"); err == nil {
		t.Fatal("a missing file was not an error")
	}
}

// TestStage: Stage writes what extract reads back.
func TestStage(t *testing.T) {
	src := t.TempDir()
	files := map[string][]byte{
		"vmlinux":            bytes.Repeat([]byte{1, 2, 3}, 50000),
		"initramfs.cpio.zst": []byte("initrd"),
		"runtimes.squashfs":  []byte("rt"),
		ManifestName:         []byte(`{"arch":"arm64","kernel":"vmlinux","initramfs":"initramfs.cpio.zst","runtimes":"runtimes.squashfs"}`),
	}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(src, n), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	stage := filepath.Join(t.TempDir(), "files")
	if err := os.MkdirAll(stage, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(stage, "stale.zst"), []byte("x"), 0o644)
	if err := Stage(src, stage); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(stage, "stale.zst")); err == nil {
		t.Fatal("Stage left a stale .zst file")
	}
	dst := t.TempDir()
	if _, err := extract(os.DirFS(filepath.Dir(stage)), dst); err != nil {
		t.Fatal(err)
	}
	for n, b := range files {
		got, err := os.ReadFile(filepath.Join(dst, n))
		if err != nil || !bytes.Equal(got, b) {
			t.Fatalf("%s: round trip through Stage and extract differs (%v)", n, err)
		}
	}
}
