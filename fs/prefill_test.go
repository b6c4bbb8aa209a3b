//go:build linux

package fs_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// residentPages opens p and reports how many of its pages are in the page
// cache before anything reads it, and its content read afterwards.
func residentPages(t *testing.T, p string) (resident, pages int, content []byte) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	size := int(fi.Size())
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	pages = (size + os.Getpagesize() - 1) / os.Getpagesize()
	vec := make([]byte, pages)
	_, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0])))
	unix.Munmap(m)
	if errno != 0 {
		t.Fatalf("mincore: %v", errno)
	}
	for _, v := range vec {
		resident += int(v & 1)
	}
	content = make([]byte, size+1)
	n, _ := f.ReadAt(content, 0)
	return resident, pages, content[:n]
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
// reader a READ round trip); larger ones are not. What reads return is the
// file's bytes either way, also once the kernel dropped the stored pages,
// and never a neighbouring blob's (small blobs lie next to each other in a
// pack).
func TestPrefilledInputs(t *testing.T) {
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
			if size > 64<<10 {
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
