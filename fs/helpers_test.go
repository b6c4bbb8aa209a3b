//go:build linux

package fs_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/cas/castest"
	"github.com/actiond/actiond/executor"
	actiondfs "github.com/actiond/actiond/fs"
	"github.com/actiond/actiond/internal/testutil"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// requireFUSE skips (or fails under CI) unless real mounts work here.
func requireFUSE(t testing.TB) {
	t.Helper()
	testutil.RequireRoot(t)
	err := actiondfs.Available()
	reason := "FUSE works"
	if err != nil {
		reason = err.Error()
	}
	testutil.Require(t, err == nil, reason)
}

type env struct {
	t     testing.TB
	store *cas.DiskStore
	root  *actiondfs.InputRoot
	dir   string
}

func newEnv(t testing.TB, opts ...actiondfs.Option) *env {
	t.Helper()
	requireFUSE(t)
	dir := t.TempDir()
	// The sandbox user must be able to reach the mounts.
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	store, err := cas.NewDiskStore(filepath.Join(dir, "cas"), cas.WithFsync(false))
	if err != nil {
		t.Fatal(err)
	}
	r, err := actiondfs.NewInputRoot(store, filepath.Join(dir, "fs"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("close input root: %v", err)
		}
	})
	return &env{t: t, store: store, root: r, dir: dir}
}

func (e *env) putProto(m proto.Message) cas.Digest {
	e.t.Helper()
	return castest.PutProto(e.t, e.store, m)
}

// tree stores an input tree described by paths: "a/b.txt" is a file with
// the given content, "bin/tool*" an executable file, "link@" a symlink to
// the content, "empty/" an empty directory.
func (e *env) tree(spec map[string]string) *executor.InputTree {
	e.t.Helper()
	type dir struct {
		files    map[string]*repb.FileNode
		symlinks map[string]string
		dirs     map[string]*dir
	}
	newDir := func() *dir {
		return &dir{files: map[string]*repb.FileNode{}, symlinks: map[string]string{}, dirs: map[string]*dir{}}
	}
	root := newDir()
	for p, content := range spec {
		parts := strings.Split(strings.TrimSuffix(p, "/"), "/")
		d := root
		last := len(parts) - 1
		if strings.HasSuffix(p, "/") {
			last = len(parts)
		}
		for _, c := range parts[:last] {
			if d.dirs[c] == nil {
				d.dirs[c] = newDir()
			}
			d = d.dirs[c]
		}
		if last == len(parts) {
			continue
		}
		name := parts[last]
		switch {
		case strings.HasSuffix(name, "@"):
			d.symlinks[strings.TrimSuffix(name, "@")] = content
		case strings.HasSuffix(name, "*"):
			name = strings.TrimSuffix(name, "*")
			d.files[name] = &repb.FileNode{Name: name, Digest: castest.Put(e.t, e.store, []byte(content)).Proto(), IsExecutable: true}
		default:
			d.files[name] = &repb.FileNode{Name: name, Digest: castest.Put(e.t, e.store, []byte(content)).Proto()}
		}
	}
	var store func(d *dir) cas.Digest
	store = func(d *dir) cas.Digest {
		pb := &repb.Directory{}
		for _, n := range sortedKeys(d.files) {
			pb.Files = append(pb.Files, d.files[n])
		}
		for _, n := range sortedKeys(d.dirs) {
			pb.Directories = append(pb.Directories, &repb.DirectoryNode{Name: n, Digest: store(d.dirs[n]).Proto()})
		}
		for _, n := range sortedKeys(d.symlinks) {
			pb.Symlinks = append(pb.Symlinks, &repb.SymlinkNode{Name: n, Target: d.symlinks[n]})
		}
		return e.putProto(pb)
	}
	tree, err := executor.LoadInputTree(context.Background(), e.store, store(root))
	if err != nil {
		e.t.Fatal(err)
	}
	return tree
}

func sortedKeys[V any](m map[string]V) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// mount mounts tree in a fresh directory and unmounts it at the end.
func (e *env) mount(tree *executor.InputTree, writable bool) *actiondfs.Mount {
	e.t.Helper()
	dir, err := os.MkdirTemp(e.dir, "m-")
	if err != nil {
		e.t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	dir = filepath.Join(dir, "root")
	m, err := e.root.Mount(context.Background(), tree.Root, dir, actiondfs.MountOptions{Dirs: tree.Dirs, Writable: writable})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		if err := m.Unmount(); err != nil {
			e.t.Errorf("unmount: %v", err)
		}
	})
	return m
}

func readFile(t testing.TB, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func writeFile(t testing.TB, p, content string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestMain lets the test binary act as a helper process: FUSE files must
// not be mapped by the process serving them (a page fault that waits for
// the server holds a P and blocks garbage collection), so such clients
// run in a child.
func TestMain(m *testing.M) {
	helpers := map[string]func(path string) error{"mmap-write": mmapWrite, "mmap-probe": mmapProbe}
	if helper, ok := helpers[os.Getenv("ACTIOND_FS_HELPER")]; ok {
		if err := helper(os.Args[len(os.Args)-1]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// mmapPattern is what mmapWrite writes at byte i.
func mmapPattern(i int) byte { return byte(i % 251) }

const mmapSize = 3 << 20

// mmapWrite fills path with mmapSize bytes through a shared mapping,
// closing the file before unmapping it.
func mmapWrite(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(mmapSize); err != nil {
		return err
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	f.Close()
	for i := range mem {
		mem[i] = mmapPattern(i)
	}
	return unix.Munmap(mem)
}

func unmarshal(data string, m proto.Message) error { return proto.Unmarshal([]byte(data), m) }
