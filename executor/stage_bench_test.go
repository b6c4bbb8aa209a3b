package executor

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/actiond/actiond/cas"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// inputTreeOf builds a tree of n distinct small files, 100 per directory.
func inputTreeOf(b *testing.B, s *cas.DiskStore, n int) *InputTree {
	b.Helper()
	root := &repb.Directory{}
	for d := 0; d*100 < n; d++ {
		dir := &repb.Directory{}
		for i := d * 100; i < min(n, (d+1)*100); i++ {
			fd := putBlobB(b, s, fmt.Appendf(nil, "file %d\n", i))
			dir.Files = append(dir.Files, &repb.FileNode{Name: fmt.Sprintf("f%05d", i), Digest: fd.Proto(), IsExecutable: i%50 == 0})
		}
		dd := putDirB(b, s, dir)
		root.Directories = append(root.Directories, &repb.DirectoryNode{Name: fmt.Sprintf("d%05d", d), Digest: dd.Proto()})
	}
	rd := putDirB(b, s, root)
	tree, err := LoadInputTree(context.Background(), s, rd)
	if err != nil {
		b.Fatal(err)
	}
	return tree
}

// BenchmarkStageInputs measures input root setup per strategy and size;
// the ms/op figure is what an action with that many inputs pays up front.
func BenchmarkStageInputs(b *testing.B) {
	for _, n := range []int{1000, 10000, 100000} {
		s, err := cas.NewDiskStore(filepath.Join(b.TempDir(), "cas"), cas.WithFsync(false))
		if err != nil {
			b.Fatal(err)
		}
		tree := inputTreeOf(b, s, n)
		for _, ir := range []InputRoot{LinkInputRoot{Store: s}, CopyInputRoot{Store: s}} {
			b.Run(fmt.Sprintf("%s/%dk", ir.Name(), n/1000), func(b *testing.B) {
				base := b.TempDir()
				for i := 0; b.Loop(); i++ {
					dir := filepath.Join(base, fmt.Sprint(i))
					if _, err := ir.Stage(context.Background(), tree, dir); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					os.RemoveAll(dir)
					b.StartTimer()
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/float64(n), "µs/file")
			})
		}
	}
}

func putBlobB(b *testing.B, s cas.Store, data []byte) cas.Digest {
	d := cas.DigestOf(data)
	if err := s.Put(context.Background(), d, bytesReader(data)); err != nil {
		b.Fatal(err)
	}
	return d
}
