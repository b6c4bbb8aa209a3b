//go:build linux

package vmtest

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestCopySparseKeepsDataAndHoles: the copy has the same bytes and no
// more allocated blocks than the data needs.
func TestCopySparseKeepsDataAndHoles(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	const size = 1 << 30
	f.Truncate(size)
	chunks := map[int64][]byte{0: bytes.Repeat([]byte("a"), 8192), 300 << 20: bytes.Repeat([]byte("b"), 1<<20), size - 4096: bytes.Repeat([]byte("c"), 4096)}
	for off, data := range chunks {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	dst := filepath.Join(dir, "dst")
	if err := CopySparse(src, dst); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(dst)
	if err != nil || fi.Size() != size {
		t.Fatalf("copy: %v, size %d", err, fi.Size())
	}
	g, _ := os.Open(dst)
	defer g.Close()
	for off, data := range chunks {
		got := make([]byte, len(data))
		if _, err := g.ReadAt(got, off); err != nil || !bytes.Equal(got, data) {
			t.Errorf("bytes at %d differ in the copy (%v)", off, err)
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(dst, &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 16<<20 {
		t.Errorf("the copy of a 1 GiB file with ~1 MiB of data takes %d bytes: holes were filled", used)
	}
}
