//go:build linux

package fs_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/actiond/actiond/cas"
	"github.com/actiond/actiond/cas/castest"
	"github.com/actiond/actiond/executor"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
)

// benchTree stores a tree of n distinct small files, 100 per directory
// (like executor's BenchmarkStageInputs), and returns its root digest.
func benchTree(b *testing.B, e *env, n int) cas.Digest {
	b.Helper()
	ctx := context.Background()
	root := &repb.Directory{}
	for d := 0; d*100 < n; d++ {
		dir := &repb.Directory{}
		var blobs []cas.Blob
		for i := d * 100; i < min(n, (d+1)*100); i++ {
			data := fmt.Appendf(nil, "file %d\n", i)
			fd := cas.DigestOf(data)
			blobs = append(blobs, cas.Blob{Digest: fd, Data: data})
			dir.Files = append(dir.Files, &repb.FileNode{Name: fmt.Sprintf("f%05d", i), Digest: fd.Proto(), IsExecutable: i%50 == 0})
		}
		for _, err := range e.store.PutBatch(ctx, blobs) {
			if err != nil {
				b.Fatal(err)
			}
		}
		root.Directories = append(root.Directories, &repb.DirectoryNode{Name: fmt.Sprintf("d%05d", d), Digest: e.putProto(dir).Proto()})
	}
	return e.putProto(root)
}

// BenchmarkStageInputs measures input root setup per strategy and size:
// LoadInputTree (the executor's validation and FindMissing, paid by every
// strategy), then staging by hardlinks and by an actiondfs mount.
// Cleanup (removal, unmount) is not timed; it is reported as cleanup-µs.
func BenchmarkStageInputs(b *testing.B) {
	ctx := context.Background()
	for _, n := range []int{1000, 10000, 100000} {
		e := newEnv(b)
		rd := benchTree(b, e, n)
		tree, err := executor.LoadInputTree(ctx, e.store, rd)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("load-tree/%dk", n/1000), func(b *testing.B) {
			for b.Loop() {
				if _, err := executor.LoadInputTree(ctx, e.store, rd); err != nil {
					b.Fatal(err)
				}
			}
		})
		// With the executor's TreeCache: the same root again, and a root
		// that differs from it in one file (one new directory).
		cache := executor.NewTreeCache(executor.DefaultTreeCacheDirBytes, executor.DefaultTreeCacheFiles)
		if _, err := cache.LoadInputTree(ctx, e.store, rd); err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("load-tree-cached/%dk", n/1000), func(b *testing.B) {
			for b.Loop() {
				if _, err := cache.LoadInputTree(ctx, e.store, rd); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("load-tree-similar/%dk", n/1000), func(b *testing.B) {
			for i := 0; b.Loop(); i++ {
				b.StopTimer()
				root := similarRoot(b, e, tree, i)
				b.StartTimer()
				if _, err := cache.LoadInputTree(ctx, e.store, root); err != nil {
					b.Fatal(err)
				}
			}
		})
		for _, ir := range []executor.InputRoot{executor.LinkInputRoot{Store: e.store}, e.root} {
			b.Run(fmt.Sprintf("%s/%dk", ir.Name(), n/1000), func(b *testing.B) {
				base := b.TempDir()
				var cleanupTime int64
				for i := 0; b.Loop(); i++ {
					dir := filepath.Join(base, fmt.Sprint(i))
					cleanup, err := ir.Stage(ctx, tree, dir)
					if err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					start := nowMicros()
					if err := cleanup(); err != nil {
						b.Fatal(err)
					}
					os.RemoveAll(dir)
					cleanupTime += nowMicros() - start
					b.StartTimer()
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/float64(n), "µs/file")
				b.ReportMetric(float64(cleanupTime)/float64(b.N), "cleanup-µs")
			})
		}
		// What the executor gets: a spare mount made ahead of time (the
		// timer stops while the spare is made again).
		b.Run(fmt.Sprintf("fuse-spare/%dk", n/1000), func(b *testing.B) {
			base := b.TempDir()
			for i := 0; b.Loop(); i++ {
				b.StopTimer()
				for e.root.SpareMounts() == 0 {
					time.Sleep(100 * time.Microsecond)
				}
				b.StartTimer()
				staged, err := e.root.StageWithOptions(ctx, tree, filepath.Join(base, fmt.Sprint(i)), executor.StageOptions{})
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if staged.Dir == "" {
					b.Fatal("no spare mount used")
				}
				if err := staged.Cleanup(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

// similarRoot stores a root like tree's with one more file (named after
// i) in its first directory.
func similarRoot(b *testing.B, e *env, tree *executor.InputTree, i int) cas.Digest {
	root := proto.Clone(tree.Dirs[tree.Root]).(*repb.Directory)
	first, _ := cas.FromProto(root.Directories[0].Digest)
	dir := proto.Clone(tree.Dirs[first]).(*repb.Directory)
	dir.Files = append(dir.Files, &repb.FileNode{Name: fmt.Sprintf("zz%08d", i), Digest: castest.Put(e.t, e.store, []byte("new")).Proto()})
	root.Directories[0].Digest = e.putProto(dir).Proto()
	return e.putProto(root)
}

// BenchmarkFirstTouch is staging plus what an action pays to open and read
// one input of a 100k-file root through actiondfs.
func BenchmarkFirstTouch(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b)
	rd := benchTree(b, e, 100000)
	tree, err := executor.LoadInputTree(ctx, e.store, rd)
	if err != nil {
		b.Fatal(err)
	}
	base := b.TempDir()
	for i := 0; b.Loop(); i++ {
		dir := filepath.Join(base, fmt.Sprint(i))
		cleanup, err := e.root.Stage(ctx, tree, dir)
		if err != nil {
			b.Fatal(err)
		}
		if data, err := os.ReadFile(filepath.Join(dir, "d00500/f50042")); err != nil || string(data) != "file 50042\n" {
			b.Fatalf("read %q, %v", data, err)
		}
		b.StopTimer()
		cleanup()
		b.StartTimer()
	}
}

// BenchmarkSequentialRead reads a 256 MiB input start to end with 1 MiB
// reads: from the CAS file directly (native), through a fresh actiondfs
// mount (every byte goes through the server), and again through the same
// mount (the kernel's page cache of the mount).
func BenchmarkSequentialRead(b *testing.B) {
	const size = 256 << 20
	ctx := context.Background()
	e := newEnv(b)
	src := filepath.Join(e.dir, "big")
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i * 7 / 4096)
	}
	if err := os.WriteFile(src, data, 0o644); err != nil {
		b.Fatal(err)
	}
	d, err := e.store.PutFile(ctx, src)
	if err != nil {
		b.Fatal(err)
	}
	rd := e.putProto(&repb.Directory{Files: []*repb.FileNode{{Name: "big.bin", Digest: d.Proto()}}})
	tree, err := executor.LoadInputTree(ctx, e.store, rd)
	if err != nil {
		b.Fatal(err)
	}
	blobPath, err := e.store.BlobPath(d, false)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	readAll := func(b *testing.B, p string) {
		f, err := os.Open(p)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		n, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{f}, buf)
		if err != nil || n != size {
			b.Fatalf("read %d bytes, %v", n, err)
		}
	}
	readAll(b, blobPath) // warm the CAS file's page cache
	b.Run("native", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			readAll(b, blobPath)
		}
	})
	b.Run("fuse-fresh-mount", func(b *testing.B) {
		base := b.TempDir()
		b.SetBytes(size)
		for i := 0; b.Loop(); i++ {
			b.StopTimer()
			dir := filepath.Join(base, fmt.Sprint("fresh", i))
			cleanup, err := e.root.Stage(ctx, tree, dir)
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			readAll(b, filepath.Join(dir, "big.bin"))
			b.StopTimer()
			cleanup()
			b.StartTimer()
		}
	})
	b.Run("fuse-reread", func(b *testing.B) {
		dir := filepath.Join(b.TempDir(), "reread")
		cleanup, err := e.root.Stage(ctx, tree, dir)
		if err != nil {
			b.Fatal(err)
		}
		defer cleanup()
		readAll(b, filepath.Join(dir, "big.bin"))
		b.SetBytes(size)
		for b.Loop() {
			readAll(b, filepath.Join(dir, "big.bin"))
		}
	})
}

func nowMicros() int64 { return time.Now().UnixMicro() }
