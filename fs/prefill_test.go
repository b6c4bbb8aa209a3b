//go:build linux

package fs_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	actiondfs "github.com/actiond/actiond/fs"
)

// residentPages reports how many of p's pages are in the page cache once
// it is open, before anything reads it, and p's content read afterwards.
// It also checks that what mmap(2) shows past the end of the file, in its
// last page, is zeros, as for any file. The mapping is made by a child
// (mmapProbe): this process serves the mount, and must not fault on it.
func residentPages(t *testing.T, p string) (resident, pages int, content []byte) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$", p)
	cmd.Env = append(os.Environ(), "ACTIOND_FS_HELPER=mmap-probe")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("mmap probe of %s: %v: %s", p, err, out)
	}
	var tail int
	if _, err := fmt.Sscan(string(out), &resident, &pages, &tail); err != nil {
		t.Fatalf("mmap probe of %s printed %q: %v", p, out, err)
	}
	if tail >= 0 {
		t.Errorf("%s: byte %d past the end of the file is not zero in its mapping", p, tail)
	}
	if content, err = os.ReadFile(p); err != nil {
		t.Fatal(err)
	}
	return resident, pages, content
}

// mmapProbe opens path, maps it and prints how many of its pages are in
// the page cache before it touches any, how many it has, and the offset
// past the end of the first non-zero byte of its last page (-1: none).
func mmapProbe(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	size, page := int(fi.Size()), os.Getpagesize()
	pages := (size + page - 1) / page
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	defer unix.Munmap(m)
	vec := make([]byte, pages)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		return fmt.Errorf("mincore: %w", errno)
	}
	resident := 0
	for _, v := range vec {
		resident += int(v & 1)
	}
	tail := -1
	whole := unsafe.Slice(&m[0], pages*page)
	for i := size; i < len(whole); i++ {
		if whole[i] != 0 {
			tail = i - size
			break
		}
	}
	fmt.Println(resident, pages, tail)
	return nil
}

// pattern is n bytes that differ from any other pattern's (seed).
func pattern(seed, n int) string {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(uint64(seed), uint64(n)))
	for i := range b {
		b[i] = byte('a' + r.IntN(26))
	}
	return string(b)
}

// Small inputs are in the page cache as soon as they are open, before the
// first read (the server stored them while answering the OPEN, saving the
// reader a READ round trip), on kernels that zero the rest of a stored
// file's last page; larger ones are not, nor anything on older kernels.
// What reads return is the file's bytes either way, also once the kernel
// dropped the stored pages, and never a neighbouring blob's (small blobs
// lie next to each other in a pack); what a mapping shows past the end is
// zeros.
func TestPrefilledInputs(t *testing.T) {
	stores := actiondfs.StoresSmallInputs()
	t.Logf("kernel zeroes the tail of stored pages (stores made): %v", stores)
	e := newEnv(t)
	files := map[string]int{"tiny.txt": 1, "small.txt": 1000, "pages.bin": 3*4096 + 17, "limit.bin": 64 << 10, "big.bin": 64<<10 + 1}
	spec := map[string]string{}
	for name, size := range files {
		spec[name] = pattern(len(spec), size)
	}
	tree := e.tree(spec)
	for round := range 2 { // a second mount stores its own inodes' pages again
		dir := e.mount(tree, false).Dir()
		for name, size := range files {
			p := filepath.Join(dir, name)
			resident, pages, got := residentPages(t, p)
			want := pages
			if size > 64<<10 || !stores {
				want = 0
			}
			if resident != want {
				t.Errorf("mount %d: %s (%d bytes): %d of %d pages cached at open, want %d", round, name, size, resident, pages, want)
			}
			if string(got) != spec[name] {
				t.Errorf("mount %d: %s reads %d bytes, not its content", round, name, len(got))
			}
			// Dropped from the cache, the file is read through READs.
			f, err := os.Open(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, size+10)
			n, _ := f.ReadAt(buf, 0)
			f.Close()
			if string(buf[:n]) != spec[name] {
				t.Errorf("mount %d: %s after FADV_DONTNEED reads %d bytes, not its content", round, name, n)
			}
		}
	}
}

// Many readers opening the same and different small inputs at once (first
// opens racing with reads of other opens) all read the right bytes, and
// nothing deadlocks.
func TestPrefillConcurrentOpens(t *testing.T) {
	e := newEnv(t)
	spec := map[string]string{}
	for i := range 50 {
		spec[fmt.Sprintf("d%d/f%d.txt", i%5, i)] = pattern(i, 100+i*97)
	}
	for round := range 3 {
		dir := e.mount(e.tree(spec), false).Dir()
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Go(func() {
				r := rand.New(rand.NewPCG(uint64(g), uint64(round)))
				for range 200 {
					i := r.IntN(50)
					name := fmt.Sprintf("d%d/f%d.txt", i%5, i)
					got, err := os.ReadFile(filepath.Join(dir, name))
					if err != nil {
						t.Error(err)
						return
					}
					if !bytes.Equal(got, []byte(spec[name])) {
						t.Errorf("%s: read %d bytes, not its content", name, len(got))
						return
					}
				}
			})
		}
		wg.Wait()
	}
}
