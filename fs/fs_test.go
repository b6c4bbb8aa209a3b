//go:build linux

package fs_test

import (
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/executor"
	actiondfs "github.com/actiond/actiond/fs"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
)

var sampleTree = map[string]string{
	"a.txt":             "alpha\n",
	"src/main.c":        "int main() { return 0; }\n",
	"src/lib/util.h":    "#define X 1\n",
	"bin/tool*":         "#!/bin/sh\necho tool ran\n",
	"src/link@":         "lib/util.h",
	"dangling@":         "nowhere/at/all",
	"empty/":            "",
	"zero.txt":          "",
	"out/existing.txt":  "already here\n",
	"deep/a/b/c/d.txt":  "deep\n",
	"src/lib/other.txt": "other\n",
}

func TestReadInputs(t *testing.T) {
	e := newEnv(t)
	m := e.mount(e.tree(sampleTree), false)
	dir := m.Dir()

	for p, want := range map[string]string{
		"a.txt": "alpha\n", "src/main.c": "int main() { return 0; }\n", "src/link": "#define X 1\n",
		"deep/a/b/c/d.txt": "deep\n", "zero.txt": "", "bin/tool": "#!/bin/sh\necho tool ran\n",
	} {
		if got := readFile(t, filepath.Join(dir, p)); got != want {
			t.Errorf("%s = %q, want %q", p, got, want)
		}
	}
	for p, want := range map[string]os.FileMode{
		"a.txt": 0o444, "bin/tool": 0o555, "src": os.ModeDir | 0o755, "src/link": os.ModeSymlink | 0o777,
	} {
		fi, err := os.Lstat(filepath.Join(dir, p))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("mode of %s = %v, want %v", p, fi.Mode(), want)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s is owned by %d:%d, want root", p, st.Uid, st.Gid)
		}
	}
	if fi, _ := os.Stat(filepath.Join(dir, "src/main.c")); fi.Size() != int64(len(sampleTree["src/main.c"])) {
		t.Errorf("size of src/main.c = %d", fi.Size())
	}
	if target, err := os.Readlink(filepath.Join(dir, "dangling")); err != nil || target != "nowhere/at/all" {
		t.Errorf("readlink dangling = %q, %v", target, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "dangling")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat through a dangling symlink: %v", err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	want := []string{"a.txt", "bin", "dangling", "deep", "empty", "out", "src", "zero.txt"}
	if !slices.Equal(names, want) {
		t.Errorf("root lists %v, want %v", names, want)
	}
	if ents, err := os.ReadDir(filepath.Join(dir, "empty")); err != nil || len(ents) != 0 {
		t.Errorf("empty dir lists %v, %v", ents, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat missing: %v", err)
	}
	// Executable bits are honoured by exec (by a shell: see shellIn).
	out, err := exec.Command("/bin/sh", "-c", `exec "$0"`, filepath.Join(dir, "bin/tool")).Output()
	if err != nil || string(out) != "tool ran\n" {
		t.Errorf("running bin/tool: %q, %v", out, err)
	}
	if err := exec.Command(filepath.Join(dir, "a.txt")).Run(); !errors.Is(err, os.ErrPermission) {
		t.Errorf("running a non-executable input: %v, want permission denied", err)
	}
	// Directory link counts: 2 + subdirectories.
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, "src"), &st); err != nil || st.Nlink != 3 {
		t.Errorf("nlink of src = %d (%v), want 3", st.Nlink, err)
	}
	if len(m.Report()) != 0 {
		t.Errorf("report after reads only: %q", m.Report())
	}
}

// TestStrictRefusals checks every way of changing an input: each fails
// with EROFS, leaves the input as it was and is reported by path.
func TestStrictRefusals(t *testing.T) {
	e := newEnv(t)
	tree := e.tree(sampleTree)
	m := e.mount(tree, false)
	dir := m.Dir()
	p := func(rel string) string { return filepath.Join(dir, rel) }
	writeFile(t, p("staged.txt"), "staged\n")

	cases := []struct {
		name   string
		op     string // in the report
		path   string
		change func() error
	}{
		{"open O_WRONLY", "open for writing", "a.txt", func() error { return openClose(p("a.txt"), os.O_WRONLY) }},
		{"open O_RDWR", "open for writing", "src/main.c", func() error { return openClose(p("src/main.c"), os.O_RDWR) }},
		{"open O_APPEND", "open for writing", "a.txt", func() error { return openClose(p("a.txt"), os.O_WRONLY|os.O_APPEND) }},
		{"open O_TRUNC", "truncate", "a.txt", func() error { return openClose(p("a.txt"), os.O_RDONLY|os.O_TRUNC) }},
		{"create over", "open for writing", "a.txt", func() error { return os.WriteFile(p("a.txt"), []byte("x"), 0o644) }},
		{"truncate", "truncate", "a.txt", func() error { return os.Truncate(p("a.txt"), 0) }},
		{"chmod", "chmod", "bin/tool", func() error { return os.Chmod(p("bin/tool"), 0o777) }},
		{"chown", "chown", "a.txt", func() error { return os.Chown(p("a.txt"), 65534, 65534) }},
		{"lchown symlink", "chown", "src/link", func() error { return os.Lchown(p("src/link"), 65534, 65534) }},
		{"utimes", "set times of", "a.txt", func() error { return os.Chtimes(p("a.txt"), time.Now(), time.Now()) }},
		{"unlink", "remove", "src/main.c", func() error { return os.Remove(p("src/main.c")) }},
		{"unlink symlink", "remove", "src/link", func() error { return os.Remove(p("src/link")) }},
		{"rmdir", "remove directory", "empty", func() error { return os.Remove(p("empty")) }},
		{"rename", "rename", "a.txt", func() error { return os.Rename(p("a.txt"), p("b.txt")) }},
		{"rename dir", "rename", "src", func() error { return os.Rename(p("src"), p("src2")) }},
		{"rename over", "replace", "a.txt", func() error { return os.Rename(p("staged.txt"), p("a.txt")) }},
		{"fallocate via write open", "open for writing", "zero.txt", func() error { return openClose(p("zero.txt"), os.O_WRONLY) }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before, beforeErr := os.ReadFile(p(c.path))
			err := c.change()
			if !errors.Is(err, syscall.EROFS) {
				t.Errorf("%s: got %v, want EROFS", c.name, err)
			}
			after, afterErr := os.ReadFile(p(c.path))
			if string(before) != string(after) || (beforeErr == nil) != (afterErr == nil) {
				t.Errorf("%s changed the input %s", c.name, c.path)
			}
			if !reported(m.Report(), c.op, c.path) {
				t.Errorf("report does not name %s %s:\n%s", c.op, c.path, strings.Join(m.Report(), "\n"))
			}
		})
	}
	// Everything is as it was.
	for path, content := range map[string]string{"a.txt": "alpha\n", "src/main.c": sampleTree["src/main.c"], "staged.txt": "staged\n"} {
		if got := readFile(t, p(path)); got != content {
			t.Errorf("%s = %q after the refusals, want %q", path, got, content)
		}
	}
	if fi, err := os.Stat(p("bin/tool")); err != nil || fi.Mode() != 0o555 {
		t.Errorf("bin/tool mode after refusals: %v %v", fi.Mode(), err)
	}
	// The CAS blobs are untouched.
	for _, path := range []string{"a.txt", "src/main.c"} {
		d := cas.DigestOf([]byte(sampleTree[path]))
		if data, err := cas.ReadAll(context.Background(), e.store, d); err != nil || string(data) != sampleTree[path] {
			t.Errorf("CAS blob of %s: %q, %v", path, data, err)
		}
	}
	report := strings.Join(m.Report(), "\n")
	if !strings.Contains(report, "mutates_inputs") {
		t.Errorf("report does not mention mutates_inputs:\n%s", report)
	}
	// Names that exist cannot be created again, inputs or not.
	for _, f := range []func() error{
		func() error { return os.Mkdir(p("src"), 0o755) },
		func() error { return os.Symlink("x", p("a.txt")) },
		func() error { return os.Link(p("staged.txt"), p("a.txt")) },
		func() error { return openClose(p("a.txt"), os.O_WRONLY|os.O_CREATE|os.O_EXCL) },
	} {
		if err := f(); !errors.Is(err, os.ErrExist) {
			t.Errorf("creating over an input: %v, want EEXIST", err)
		}
	}
}

func openClose(p string, flags int) error {
	f, err := os.OpenFile(p, flags, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

func reported(lines []string, op, path string) bool {
	for _, l := range lines {
		if strings.TrimSpace(l) == op+": "+path {
			return true
		}
	}
	return false
}

// TestStagedWrites covers what actions may do: create files and
// directories anywhere (inside input directories too), rename, overwrite,
// link and remove what they created. Outputs are found in the stage.
func TestStagedWrites(t *testing.T) {
	e := newEnv(t)
	m := e.mount(e.tree(sampleTree), false)
	dir := m.Dir()
	p := func(rel string) string { return filepath.Join(dir, rel) }

	writeFile(t, p("src/new.o"), "object\n")                       // new file in an input directory
	if err := os.MkdirAll(p("src/lib/gen/x"), 0o755); err != nil { // mkdir inside input dirs
		t.Fatal(err)
	}
	writeFile(t, p("src/lib/gen/x/y.h"), "generated\n")
	writeFile(t, p("tmp.txt"), "first version, longer\n")
	writeFile(t, p("tmp.txt"), "second\n")                               // overwrite (O_TRUNC) a staged file
	if err := os.Rename(p("tmp.txt"), p("out/result.txt")); err != nil { // rename a staged file into an input dir
		t.Fatal(err)
	}
	writeFile(t, p("other.txt"), "other\n")
	if err := os.Rename(p("other.txt"), p("src/new.o")); err != nil { // rename over a staged file
		t.Fatal(err)
	}
	if err := os.Rename(p("src/lib/gen"), p("gen2")); err != nil { // rename a staged directory
		t.Fatal(err)
	}
	if err := os.Symlink("../a.txt", p("out/alink")); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(p("out/result.txt"), p("out/hard.txt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(p("a.txt"), p("out/input-link.txt")); err != nil { // a new name for an input
		t.Fatal(err)
	}
	f, err := os.OpenFile(p("append.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("one\n")
	f.WriteString("two\n")
	f.Close()
	writeFile(t, p("gone.txt"), "x")
	if err := os.Remove(p("gone.txt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(p("gonedir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(p("gonedir")); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p("src/new.o"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(p("src/new.o"), time.Unix(1e9, 0), time.Unix(1e9, 0)); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p("append.log"), 4); err != nil {
		t.Fatal(err)
	}

	for rel, want := range map[string]string{
		"src/new.o": "other\n", "gen2/x/y.h": "generated\n", "out/result.txt": "second\n",
		"out/hard.txt": "second\n", "out/alink": "alpha\n", "out/input-link.txt": "alpha\n", "append.log": "one\n",
		"out/existing.txt": "already here\n",
	} {
		if got := readFile(t, p(rel)); got != want {
			t.Errorf("%s = %q, want %q", rel, got, want)
		}
	}
	for _, rel := range []string{"tmp.txt", "other.txt", "src/lib/gen", "gone.txt", "gonedir"} {
		if _, err := os.Lstat(p(rel)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists: %v", rel, err)
		}
	}
	if fi, err := os.Stat(p("src/new.o")); err != nil || fi.Mode() != 0o755 || !fi.ModTime().Equal(time.Unix(1e9, 0)) {
		t.Errorf("src/new.o: %v %v %v", fi.Mode(), fi.ModTime(), err)
	}
	ents, _ := os.ReadDir(p("out"))
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if want := []string{"alink", "existing.txt", "hard.txt", "input-link.txt", "result.txt"}; !slices.Equal(names, want) {
		t.Errorf("out lists %v, want %v", names, want)
	}
	// Removing the extra name of an input is fine; the input stays.
	if err := os.Remove(p("out/input-link.txt")); err != nil {
		t.Error(err)
	}
	if readFile(t, p("a.txt")) != "alpha\n" {
		t.Error("a.txt changed")
	}
	if r := m.Report(); len(r) != 0 {
		t.Errorf("staged writes were reported: %q", r)
	}

	// Outputs: staged files are found in the stage and move into the CAS.
	phys := m.OutputPath("src/new.o")
	if phys == "" || strings.HasPrefix(phys, dir) {
		t.Fatalf("OutputPath(src/new.o) = %q, want a stage file", phys)
	}
	d, err := e.store.PutFile(context.Background(), phys)
	if err != nil || d != cas.DigestOf([]byte("other\n")) {
		t.Errorf("PutFile of the stage file: %v, %v", d, err)
	}
	for _, rel := range []string{"out/hard.txt", "out/alink", "missing", "src"} {
		if got := m.OutputPath(rel); got != "" {
			t.Errorf("OutputPath(%s) = %q, want \"\" (hard link, symlink, missing, directory)", rel, got)
		}
	}
	// An input declared as an output: a link to its blob, which the CAS
	// copies from (and unlinks) without touching the blob.
	for _, rel := range []string{"a.txt", "bin/tool", "zero.txt"} {
		phys := m.OutputPath(rel)
		if phys == "" {
			t.Fatalf("OutputPath(%s) = \"\"", rel)
		}
		d, err := e.store.PutFile(context.Background(), phys)
		if err != nil || d != cas.DigestOf([]byte(sampleTree[rel+map[string]string{"bin/tool": "*"}[rel]])) {
			t.Errorf("PutFile of input %s: %v, %v", rel, d, err)
		}
	}
	if got := readFile(t, p("bin/tool")); got != sampleTree["bin/tool*"] {
		t.Errorf("bin/tool after collection = %q", got)
	}
	if fi, err := os.Stat(m.OutputPath("bin/tool")); err != nil || fi.Mode() != 0o444 {
		t.Errorf("the CAS blob of bin/tool: %v, %v", fi.Mode(), err)
	}
}

// TestMmapWrites checks that bytes written through a shared mapping are in
// the stage file once the mapping is gone (a linker writing its output).
func TestMmapWrites(t *testing.T) {
	e := newEnv(t)
	m := e.mount(e.tree(sampleTree), false)
	cmd := exec.Command(os.Args[0], "-test.run=^$", filepath.Join(m.Dir(), "out/mapped.bin"))
	cmd.Env = append(os.Environ(), "ACTIOND_FS_HELPER=mmap-write")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mmap writer: %v\n%s", err, out)
	}
	data, err := os.ReadFile(m.OutputPath("out/mapped.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if len(data) != mmapSize {
		t.Fatalf("stage file has %d bytes, want %d", len(data), mmapSize)
	}
	for i, b := range data {
		if b != mmapPattern(i) {
			t.Fatalf("stage file byte %d = %d, want %d", i, b, mmapPattern(i))
		}
	}
}

// TestSandboxUser checks the directory permission rules the executor and
// the sandbox rely on: root may make input and staged directories 1777,
// after which uid 65534 can create files there; elsewhere it cannot, and
// it can never change inputs.
func TestSandboxUser(t *testing.T) {
	e := newEnv(t)
	m := e.mount(e.tree(sampleTree), false)
	dir := m.Dir()
	p := func(rel string) string { return filepath.Join(dir, rel) }
	// What the executor does for output directories.
	if err := unix.Chmod(p("out"), 0o1777); err != nil { // an input directory
		t.Fatalf("chmod of an input directory: %v", err)
	}
	if err := os.MkdirAll(p("bazel-out/bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Chmod(p("bazel-out/bin"), 0o1777); err != nil { // a staged directory
		t.Fatal(err)
	}
	if err := os.Chown(p("bazel-out/bin"), 0, 0); err != nil {
		t.Fatal(err)
	}
	asNobody := func(script string) (string, error) {
		cmd := shellIn(dir, script)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := asNobody(`set -e; cat a.txt; echo made > out/new.txt; echo made > bazel-out/bin/new.txt; mkdir out/sub; echo x > out/sub/f; mv out/sub/f out/sub/g; rm out/sub/g; rmdir out/sub`); err != nil || out != "alpha\n" {
		t.Fatalf("sandbox user in writable dirs: %q, %v", out, err)
	}
	if fi, err := os.Stat(p("out/new.txt")); err != nil || fi.Sys().(*syscall.Stat_t).Uid != 65534 {
		t.Errorf("out/new.txt: %v (owner should be 65534)", err)
	}
	for script, want := range map[string]string{
		`echo x > src/new.txt`:            "Permission denied", // an input directory that is not writable
		`mkdir src/newdir`:                "Permission denied",
		`echo x >> out/existing.txt`:      "Read-only file system",
		`rm -f out/existing.txt`:          "Read-only file system",
		`mv out/existing.txt out/moved`:   "Read-only file system",
		`chmod 777 out/existing.txt`:      "Read-only file system",
		`touch out/existing.txt`:          "Read-only file system",
		`chmod 755 out`:                   "Operation not permitted", // not the owner
		`echo x > bazel-out/bin/../x.txt`: "Permission denied",
	} {
		out, err := asNobody(script)
		if err == nil || !strings.Contains(out, want) {
			t.Errorf("%s as nobody: %q, %v; want %q", script, out, err, want)
		}
	}
	// Sticky directories: nobody cannot remove root's staged files.
	writeFile(t, p("out/roots.txt"), "root's\n")
	if out, err := asNobody(`rm -f out/roots.txt`); err == nil {
		t.Errorf("nobody removed root's file from a sticky directory: %q", out)
	}
	if readFile(t, p("out/existing.txt")) != "already here\n" {
		t.Error("out/existing.txt changed")
	}
	if !reported(m.Report(), "open for writing", "out/existing.txt") || !reported(m.Report(), "remove", "out/existing.txt") {
		t.Errorf("report:\n%s", strings.Join(m.Report(), "\n"))
	}
}

// TestLargeFile reads a 1 GiB (sparse) input at offsets beyond 4 GiB/2.
func TestLargeFile(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "big")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	const size = 1<<30 + 12345
	marker := []byte("the end of a big file")
	if _, err := f.WriteAt(marker, size-int64(len(marker))); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("start"), 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	d, err := e.store.PutFile(context.Background(), src)
	if err != nil {
		t.Fatal(err)
	}
	tree := e.tree(map[string]string{"small.txt": "s"})
	rd := e.putProto(&repb.Directory{Files: []*repb.FileNode{
		{Name: "big.bin", Digest: d.Proto()},
		{Name: "small.txt", Digest: cas.DigestOf([]byte("s")).Proto()},
	}})
	tree.Root, tree.Dirs = rd, nil // resolved from the CAS
	m := e.mount(tree, false)

	bf, err := os.Open(filepath.Join(m.Dir(), "big.bin"))
	if err != nil {
		t.Fatal(err)
	}
	defer bf.Close()
	fi, _ := bf.Stat()
	if fi.Size() != size {
		t.Fatalf("size %d, want %d", fi.Size(), size)
	}
	buf := make([]byte, 64<<10)
	n, err := bf.ReadAt(buf, size-int64(len(buf)))
	if err != nil || n != len(buf) {
		t.Fatalf("read at the end: %d, %v", n, err)
	}
	if string(buf[len(buf)-len(marker):]) != string(marker) {
		t.Errorf("end of the file = %q", buf[len(buf)-len(marker):])
	}
	for i := range buf[:len(buf)-len(marker)] {
		if buf[i] != 0 {
			t.Fatalf("hole byte %d = %d", i, buf[i])
		}
	}
	n, err = bf.ReadAt(buf[:5], 0)
	if err != nil || string(buf[:n]) != "start" {
		t.Errorf("read at 0: %q, %v", buf[:n], err)
	}
	n, err = bf.ReadAt(buf, size-10)
	if n != 10 || !errors.Is(err, io.EOF) {
		t.Errorf("read across the end: %d, %v", n, err)
	}
}

// TestConcurrentActions mounts one tree many times at once: each action
// reads the shared directories and writes the same names, and sees only
// its own files.
func TestConcurrentActions(t *testing.T) {
	e := newEnv(t)
	spec := map[string]string{}
	for i := range 200 {
		spec[path.Join("shared", "d"+strconv.Itoa(i%10), "f"+strconv.Itoa(i))] = "content " + strconv.Itoa(i)
	}
	tree := e.tree(spec)
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for a := range 8 {
		m := e.mount(tree, false)
		wg.Go(func() {
			for i := range 200 {
				rel := path.Join("shared", "d"+strconv.Itoa(i%10), "f"+strconv.Itoa(i))
				b, err := os.ReadFile(filepath.Join(m.Dir(), rel))
				if err != nil || string(b) != "content "+strconv.Itoa(i) {
					errs <- errors.New("action " + strconv.Itoa(a) + " read " + rel + ": " + string(b))
					return
				}
			}
			for i := range 10 {
				p := filepath.Join(m.Dir(), "shared", "d"+strconv.Itoa(i), "out.txt")
				if err := os.WriteFile(p, []byte("action "+strconv.Itoa(a)), 0o644); err != nil {
					errs <- err
					return
				}
			}
			for i := range 10 {
				p := filepath.Join(m.Dir(), "shared", "d"+strconv.Itoa(i), "out.txt")
				if b, _ := os.ReadFile(p); string(b) != "action "+strconv.Itoa(a) {
					errs <- errors.New("action " + strconv.Itoa(a) + " sees " + string(b))
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestOverlay is the mutates_inputs path: inputs can be rewritten,
// removed and renamed in the action's view; the CAS and other actions
// see nothing of it.
func TestOverlay(t *testing.T) {
	e := newEnv(t)
	tree := e.tree(sampleTree)
	m := e.mount(tree, true)
	strict := e.mount(tree, false)
	dir := m.Dir()
	p := func(rel string) string { return filepath.Join(dir, rel) }

	f, err := os.OpenFile(p("a.txt"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatalf("open an input for writing: %v", err)
	}
	f.WriteString("more\n")
	f.Close()
	if err := os.Remove(p("src/main.c")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(p("src/lib/util.h"), p("src/lib/util2.h")); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p("bin/tool"), 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, p("src/new.txt"), "new\n")
	if err := os.RemoveAll(p("deep")); err != nil {
		t.Fatal(err)
	}

	if got := readFile(t, p("a.txt")); got != "alpha\nmore\n" {
		t.Errorf("a.txt = %q", got)
	}
	for _, rel := range []string{"src/main.c", "src/lib/util.h", "deep"} {
		if _, err := os.Lstat(p(rel)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists: %v", rel, err)
		}
	}
	if got := readFile(t, p("src/lib/util2.h")); got != "#define X 1\n" {
		t.Errorf("util2.h = %q", got)
	}
	// The sandbox user may change inputs too, even after the sandbox made
	// the root sticky.
	if err := unix.Chmod(dir, 0o1777); err != nil {
		t.Fatal(err)
	}
	cmd := shellIn(dir, "echo nobody >> src/lib/other.txt && rm zero.txt && mkdir out/d && echo x > out/d/f")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("sandbox user changing inputs in the overlay: %q, %v", out, err)
	}
	// Another action and the CAS see the originals.
	for rel, want := range map[string]string{"a.txt": "alpha\n", "src/main.c": sampleTree["src/main.c"], "src/lib/util.h": "#define X 1\n", "src/lib/other.txt": "other\n"} {
		if got := readFile(t, filepath.Join(strict.Dir(), rel)); got != want {
			t.Errorf("other action: %s = %q, want %q", rel, got, want)
		}
		if data, err := cas.ReadAll(context.Background(), e.store, cas.DigestOf([]byte(want))); err != nil || string(data) != want {
			t.Errorf("CAS blob of %s = %q, %v", rel, data, err)
		}
	}
	// Outputs are taken from the upper directory.
	phys := m.OutputPath("a.txt")
	if phys == "" || readFile(t, phys) != "alpha\nmore\n" {
		t.Errorf("OutputPath(a.txt) = %q", phys)
	}
	if m.OutputPath("src/lib/other.txt") == "" || m.OutputPath("out/d/f") == "" {
		t.Error("OutputPath misses files written by the sandbox user")
	}
	// An untouched input: a link to its blob. A removed one: nothing.
	if got := m.OutputPath("out/existing.txt"); got == "" || readFile(t, got) != "already here\n" {
		t.Errorf("OutputPath of an untouched input = %q", got)
	}
	if got := m.OutputPath("src/main.c"); got != "" {
		t.Errorf("OutputPath of a removed input = %q", got)
	}
	if len(m.Report()) != 0 {
		t.Errorf("overlay reported refusals: %q", m.Report())
	}
}

// TestStaleMounts leaves mounts behind (as a crash would) and checks that
// a new InputRoot on the same state dir removes them.
func TestStaleMounts(t *testing.T) {
	e := newEnv(t, actiondfs.WithSpareMounts(0))
	tree := e.tree(sampleTree)
	strict := e.mount(tree, false)
	overlay := e.mount(tree, true)
	mounted := func() []string {
		data, _ := os.ReadFile("/proc/self/mountinfo")
		var out []string
		for _, l := range strings.Split(string(data), "\n") {
			if strings.Contains(l, e.dir) {
				out = append(out, l)
			}
		}
		return out
	}
	if n := len(mounted()); n != 3 {
		t.Fatalf("%d mounts under the test dir, want 3:\n%s", n, strings.Join(mounted(), "\n"))
	}
	r2, err := actiondfs.NewInputRoot(e.store, filepath.Join(e.dir, "fs"), actiondfs.WithSpareMounts(0))
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if left := mounted(); len(left) != 0 {
		t.Errorf("mounts left after start-up:\n%s", strings.Join(left, "\n"))
	}
	// The old mounts' own cleanup now finds them gone.
	strict.Unmount()
	overlay.Unmount()
}

// TestSpareMounts: strict input roots come from mounts made ahead of time
// under the state dir; each shows its own tree with the usual rules, is
// removed by its cleanup, and the spares are made again; Close removes the
// spares.
func TestSpareMounts(t *testing.T) {
	e := newEnv(t, actiondfs.WithSpareMounts(2))
	mntDir := filepath.Join(e.dir, "fs", "mnt")
	waitSpares := func(want int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for e.root.SpareMounts() != want || mountsBelow(mntDir) != want {
			if time.Now().After(deadline) {
				t.Fatalf("%d spares ready, %d mounts under %s; want %d spares", e.root.SpareMounts(), mountsBelow(mntDir), mntDir, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitSpares(2)

	ctx := context.Background()
	treeA := e.tree(sampleTree)
	treeB := e.tree(map[string]string{"a.txt": "other tree\n", "b/c.txt": "c\n"})
	asked := [3]string{}
	var staged [3]*executor.StagedRoot
	for i, tree := range []*executor.InputTree{treeA, treeB, treeA} {
		asked[i] = filepath.Join(e.dir, "action"+strconv.Itoa(i))
		s, err := e.root.StageWithOptions(ctx, tree, asked[i], executor.StageOptions{})
		if err != nil {
			t.Fatal(err)
		}
		staged[i] = s
	}
	dirOf := func(i int) string {
		if staged[i].Dir != "" {
			return staged[i].Dir
		}
		return asked[i]
	}
	for i := 0; i < 2; i++ {
		if !strings.HasPrefix(staged[i].Dir, mntDir+"/") {
			t.Errorf("root %d staged at %q, want a spare mount under %s", i, staged[i].Dir, mntDir)
		}
		if _, err := os.Stat(asked[i]); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("root %d: the directory asked for was made although a spare was used: %v", i, err)
		}
	}
	if got := readFile(t, filepath.Join(dirOf(0), "a.txt")); got != "alpha\n" {
		t.Errorf("spare 0 a.txt = %q", got)
	}
	if got := readFile(t, filepath.Join(dirOf(1), "a.txt")); got != "other tree\n" {
		t.Errorf("spare 1 a.txt = %q", got)
	}
	if got := readFile(t, filepath.Join(dirOf(2), "src/lib/util.h")); got != "#define X 1\n" {
		t.Errorf("root 2 src/lib/util.h = %q", got)
	}
	if _, err := os.Stat(filepath.Join(dirOf(1), "src")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("spare 1 shows src/ of another tree: %v", err)
	}
	// The strict rules hold on a spare.
	if err := os.WriteFile(filepath.Join(dirOf(0), "a.txt"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("writing an input of a spare: %v, want EROFS", err)
	}
	writeFile(t, filepath.Join(dirOf(0), "src", "new.txt"), "new\n")
	if p := staged[0].OutputPath("src/new.txt"); p == "" || readFile(t, p) != "new\n" {
		t.Errorf("OutputPath of a staged file = %q", p)
	}
	if r := staged[0].Report(); len(r) == 0 || !strings.Contains(strings.Join(r, "\n"), "a.txt") {
		t.Errorf("report %q", r)
	}
	for i := range staged {
		if err := staged[i].Cleanup(); err != nil {
			t.Fatal(err)
		}
		if staged[i].Dir != "" {
			if _, err := os.Stat(staged[i].Dir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("spare mount point %s left after cleanup: %v", staged[i].Dir, err)
			}
		}
	}
	waitSpares(2)
	if err := e.root.Close(); err != nil {
		t.Fatal(err)
	}
	if n := mountsBelow(e.dir); n != 0 {
		t.Errorf("%d mounts left after Close", n)
	}
	if ents, _ := os.ReadDir(mntDir); len(ents) != 0 {
		t.Errorf("mount points left after Close: %v", ents)
	}
}

// shellIn runs script with sh in dir, a directory of a mount this process
// serves. The shell changes into dir itself: os/exec starts a child with
// vfork, which stops the forking thread until the child execs, and a child
// that touched the mount before its exec (a chdir there for cmd.Dir, or
// an exec of a program on it) would wait for this process's FUSE server,
// which cannot run if the Go runtime is stopping the world for the GC at
// that moment: it waits for the stopped thread forever (seen as a CI hang
// with the garbage collector in mark termination for minutes).
func shellIn(dir, script string) *exec.Cmd {
	return exec.Command("/bin/sh", "-c", `cd "$0" && `+script, dir)
}
